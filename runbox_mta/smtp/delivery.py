"""From an accepted transaction to stored mail: who gets which copy, then one durable commit.

All local recipients share one stored copy (with Return-Path, added at
final delivery, RFC 5321 §4.4); remote recipients (alias forwarding, or a
submission to other domains) share one queued copy without it. Both go to
the store in ONE transaction, and the 250 goes out only after that commit
returned: "250 means stored" (SPEC §5). A failed commit answers 451, so the
client keeps the message and retries: nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from runbox_mta.errors import RunboxError
from runbox_mta.smtp import codes, headers
from runbox_mta.smtp.address import NULL_REVERSE_PATH, normalised
from runbox_mta.store import QuotaExceeded, Resolution, Store

log = logging.getLogger(__name__)

# The store's ways of failing that are the database's fault, not a bug: the
# client gets a temporary error and tries again later.
STORAGE_ERRORS = (RunboxError, SQLAlchemyError, OSError)


@dataclass(frozen=True)
class Delivery:
    queue_id: str
    sender: str  # as the queue stores it: normalised, "" for the null reverse-path
    mailbox_ids: tuple[int, ...]
    local_data: bytes
    remote_recipients: tuple[str, ...]
    remote_data: bytes
    # Some recipient had a quota when RCPT looked: only then is it checked again at commit.
    quota: bool = True


def plan(mail_from: str, resolutions: Sequence[Resolution], message: bytes, queue_id: str, *,
         quarantine: bool = False) -> Delivery:
    """One copy per account (an account named twice, by alias or +tag, still gets one), into
    INBOX, or Junk when `quarantine` (DMARC p=quarantine, RFC 7489 §6.3) and it has one."""
    accounts = {local.account_id: local for resolution in resolutions for local in resolution.local}
    mailbox_ids = tuple((local.junk_id if quarantine and local.junk_id is not None else local.inbox_id)
                        for local in accounts.values())
    remote = tuple(dict.fromkeys(address for resolution in resolutions for address in resolution.remote))
    local_data = headers.prepend(message, headers.return_path(mail_from)) if mailbox_ids else b""
    # A sender the queue cannot store as an address (a quoted local part, say)
    # is queued as the null sender: its forwarded copy bounces to nobody.
    sender = "" if mail_from == NULL_REVERSE_PATH else normalised(mail_from) or ""
    quota = any(local.quota_bytes is not None for local in accounts.values())
    return Delivery(queue_id, sender, mailbox_ids, local_data, remote, message if remote else b"", quota)


async def deliver(store: Store, delivery: Delivery) -> str:
    """Store `delivery` durably; the reply for the end of DATA."""
    try:
        await store.accept_message(
            delivery.sender, mailbox_ids=delivery.mailbox_ids, local_data=delivery.local_data,
            remote_recipients=delivery.remote_recipients, remote_data=delivery.remote_data, quota=delivery.quota,
        )
    except QuotaExceeded:
        return codes.MAILBOX_FULL_AT_DATA
    except STORAGE_ERRORS as error:
        log.error("storing message %s failed: %s", delivery.queue_id, error)
        return codes.STORAGE_FAILURE
    log.debug("stored message %s: %d local, %d remote", delivery.queue_id, len(delivery.mailbox_ids),
              len(delivery.remote_recipients))
    return codes.QUEUED.format(queue_id=delivery.queue_id)
