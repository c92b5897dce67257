"""The mailbox store: the only code in runbox-mta that knows SQL.

Responsibility: domains, accounts, aliases, app passwords, mailboxes,
messages and the outbound queue, on SQLite (default, one file, WAL) or
PostgreSQL (several daemons sharing it), behind the async `Store` facade;
who receives mail for an address, and quotas (recipients.py).

Invariants:
- Callers see frozen dataclasses (api.py), never ORM objects or sessions.
- A write returns only after its transaction is durably committed (SQLite
  synchronous=FULL, PostgreSQL COMMIT): "250 means stored". Concurrent
  writes share one transaction and one COMMIT (committer.py); one failing
  write fails only its own caller.
- UIDs and MODSEQs are allocated in the transaction that inserts the message,
  under the mailbox's row lock: strictly increasing and gap-free per mailbox,
  across daemons too. UIDVALIDITY strictly increases per account.
- Change events are published only after COMMIT (changes.py).
- `accept_message` stores a message's local copies and its queue entry in
  ONE transaction: a crash cannot keep one and lose the other.
- Message bytes live in blobs shared by all local recipients of a delivery;
  a blob is deleted as soon as no message or queue entry refers to it, with
  SQLite secure_delete overwriting the freed bytes.
- Domains and addresses are stored lowercase (names.py).
- A store opened for serving refuses a schema that is not at the head
  Alembic revision (db.py; `runbox-mta db upgrade` migrates).
"""

from runbox_mta.store.api import (
    UNCHANGED, Accepted, Account, Alias, Appended, AppPassword, AppPasswordCredential, Domain, LoginRecord,
    Mailbox, MessageInfo, QueuedRecipient, QueueEntry, Store, open_store,
)
from runbox_mta.store.changes import ChangeEvent, ChangeKind, ChangesLost, Subscription
from runbox_mta.store.committer import CommitFailed, CommitStats
from runbox_mta.store.db import schema_status, upgrade_schema
from runbox_mta.store.recipients import LocalRecipient, QuotaExceeded, Resolution

__all__ = [
    "UNCHANGED", "Accepted", "Account", "Alias", "AppPassword", "AppPasswordCredential", "Appended",
    "ChangeEvent", "ChangeKind", "ChangesLost", "CommitFailed", "CommitStats", "Domain", "LocalRecipient",
    "LoginRecord", "Mailbox", "MessageInfo", "QueueEntry", "QueuedRecipient", "QuotaExceeded", "Resolution",
    "Store", "Subscription", "open_store", "schema_status", "upgrade_schema",
]
