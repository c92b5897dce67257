"""The store facade: every operation the daemon and the CLI need, as async methods.

Callers get frozen dataclasses, never ORM objects or sessions. Reads run on a
pooled connection; every write is a job for the group committer
(committer.py), so it returns only once durably committed, and change events
reach subscribers only after that.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import BigInteger, Row, Select, bindparam, cast, delete, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.errors import AlreadyExists, NotFound, RunboxError
from runbox_mta.store import models as m
from runbox_mta.store.blobs import BlobStore
from runbox_mta.store.changes import ChangeBus, ChangeEvent, Subscription
from runbox_mta.store.committer import CommitStats, Committer, Job
from runbox_mta.store.db import (
    InThreadConnection, connect, create_engine, lookups, require_current_schema, run_job,
    scrub_freed_pages, thread_reads,
)
from runbox_mta.store.flags import decode_flags
from runbox_mta.store.index import MailboxIndex
from runbox_mta.store.maildrop import MaildropStore
from runbox_mta.store.queue import QueueStore
from runbox_mta.store.mailstore import MailboxHead, MailStore, SharedRead
from runbox_mta.store.notify import ChangeRelay
from runbox_mta.store.transfer import TransferStore
from runbox_mta.store.writes import (
    SPECIAL_USES, Appended, insert_mailbox, insert_messages, insert_queue_entry, new_copy, no_mailbox,
    parse_message, queued_metadata,
)
from runbox_mta.store.recent import Recent
from runbox_mta.store.recipients import Resolution, check_quota, repeatable, resolve, sender_addresses
from runbox_mta.store.names import (
    INBOX, domain_of, normalise_address, normalise_alias_source, normalise_domain,
    normalise_mailbox_name,
)

T = TypeVar("T")

DEFAULT_MAILBOXES = ((INBOX, None), ("Drafts", "\\Drafts"), ("Sent", "\\Sent"),
                     ("Trash", "\\Trash"), ("Junk", "\\Junk"), ("Archive", "\\Archive"))
APP_PASSWORD_SCOPES = ("imap", "pop3", "smtp")


class _Unchanged(Enum):
    TOKEN = "unchanged"


UNCHANGED = _Unchanged.TOKEN  # update_account(quota_bytes=...) default: None means unlimited


# --- what callers get -------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    id: int
    name: str
    dkim_selector: str
    dkim_private_key: str = field(repr=False)
    created_at: datetime


@dataclass(frozen=True)
class Account:
    id: int
    address: str
    domain: str
    app_passwords_only: bool
    no_backup: bool
    quota_bytes: int | None  # None: unlimited
    disabled: bool
    created_at: datetime
    used_bytes: int  # sum of the sizes of its messages


@dataclass(frozen=True)
class Alias:
    source: str  # "sales@example.com", or "@example.com" for a catch-all
    target: str


@dataclass(frozen=True)
class AppPassword:
    id: int
    label: str
    scopes: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True)
class AppPasswordCredential:
    id: int
    label: str
    scopes: tuple[str, ...]
    password_hash: str = field(repr=False)


@dataclass(frozen=True)
class LoginRecord:
    account_id: int
    address: str
    password_hash: str = field(repr=False)
    app_passwords_only: bool
    disabled: bool
    app_passwords: tuple[AppPasswordCredential, ...]


@dataclass(frozen=True)
class Mailbox:
    id: int
    account_id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None
    subscribed: bool


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    modseq: int
    flags: frozenset[str]  # system flags ("\\Seen") and keywords
    internal_date: datetime  # in the zone it was given in (RFC 9051 §2.3.3)
    size: int


@dataclass(frozen=True)
class Accepted:
    """What accept_message stored: the local copies, and the queue entry for remote recipients."""

    appended: tuple[Appended, ...]
    queue_id: int | None


@dataclass(frozen=True)
class QueuedRecipient:
    recipient: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    tls_outcome: str | None = None  # of the last attempt: "TLS1.3 ... unverified", "plaintext (...)"


@dataclass(frozen=True)
class QueueEntry:
    id: int
    sender: str
    size: int
    created_at: datetime
    recipients: tuple[QueuedRecipient, ...]


# --- opening ---------------------------------------------------------------------------


async def open_store(url: str, *, data_dir: Path | None = None) -> Store:
    """Open the store for serving; SchemaOutOfDate unless the schema is exactly at head."""
    engine = create_engine(url, data_dir=data_dir)
    try:
        await require_current_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    return Store(engine)


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _changes_recipients(method: _Method) -> _Method:
    """For Store methods that change who receives or sends what: this store's recent answers go."""
    @functools.wraps(method)
    async def changing(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        finally:
            for recent in (self._recent_resolutions, self._recent_senders, self._recent_domains):
                recent.clear()

    return changing  # type: ignore[return-value]


class Store(MaildropStore, MailStore, QueueStore, TransferStore):
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._thread_reads = thread_reads(engine)  # SQLite: each read in one worker-thread trip
        self._thread_lookups = lookups(self._thread_reads) if self._thread_reads is not None else None
        # Answers of the lookups every message makes, for a few seconds (recent.py).
        self._recent_resolutions: Recent[str, Resolution] = Recent()
        self._recent_senders: Recent[str, frozenset[str]] = Recent()
        self._recent_domains: Recent[str, Domain] = Recent()
        self._blobs = BlobStore()
        self._changes = ChangeBus()
        # See changes_since.
        self._changes_reads: dict[tuple[int, int], SharedRead] = {}
        self._mailbox_heads: dict[int, MailboxHead] = {}
        # See snapshot and index.py.
        self._indexes: OrderedDict[int, MailboxIndex] = OrderedDict()
        self._index_builds: dict[int, asyncio.Future[MailboxIndex]] = {}
        self._committer = Committer(engine, self._changes.publish)
        # Other daemons' changes onto this bus (PostgreSQL; the daemon runs it, see app.py).
        self.relay = ChangeRelay(engine, self._changes, self._committer.origin)

    @property
    def stats(self) -> CommitStats:
        """Commit and job counters (group commit is observable: commits <= jobs)."""
        return self._committer.stats

    @property
    def engine(self) -> AsyncEngine:
        """For diagnostics and tests only: the rest of the daemon goes through the methods."""
        return self._engine

    @property
    def lookup_engine(self) -> Engine:
        """For diagnostics and tests only: the engine store reads and lookups run on (on
        PostgreSQL, the async engine's synchronous side)."""
        return self._thread_reads or self._engine.sync_engine

    @property
    def committing_engine(self) -> Engine:
        """For diagnostics and tests only: the engine whose COMMITs store every write."""
        return self._committer.committing_engine

    async def _read(self, read: Callable[[AsyncConnection], Awaitable[T]], *, snapshot: bool = True) -> T:
        """Run `read`: in one transaction (`snapshot`), or each of its statements on its own (a
        lookup, see db.lookups). On SQLite whole in one worker-thread trip, elsewhere on a pooled
        async connection."""
        if self._thread_reads is None:
            async with connect(self._engine) as conn:
                return await read(conn)  # the connection begins a transaction on its first statement
        engine = self._thread_reads if snapshot else self._thread_lookups
        assert engine is not None

        def in_thread() -> T:
            with engine.connect() as sync_conn:
                conn: Any = InThreadConnection(sync_conn)  # stands in for an AsyncConnection
                if not snapshot:
                    return run_job(read(conn))
                with sync_conn.begin():
                    return run_job(read(conn))

        return await asyncio.to_thread(in_thread)

    async def _lookup(self, read: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        return await self._read(read, snapshot=False)

    async def close(self) -> None:
        """Finish queued writes, then release every connection."""
        await self._committer.close()
        if self._thread_reads is not None:
            self._thread_reads.dispose()
        await self._engine.dispose()

    def subscribe(self, *, account_id: int | None = None, mailbox_id: int | None = None) -> Subscription:
        """Committed changes of one mailbox, one account, or (neither given) everything."""
        return self._changes.subscribe(account_id=account_id, mailbox_id=mailbox_id)

    async def _write(self, job: Job[T]) -> T:
        return await self._committer.submit(job)

    # --- domains ---------------------------------------------------------------------------

    @_changes_recipients
    async def add_domain(self, name: str, dkim_selector: str, dkim_private_key: str) -> Domain:
        name = normalise_domain(name)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Domain:
            if await _domain_id(conn, name) is not None:
                raise AlreadyExists(f"domain {name} is already hosted here")
            row = (await conn.execute(
                insert(m.Domain).values(name=name, dkim_selector=dkim_selector,
                                        dkim_private_key=dkim_private_key).returning(*_columns(m.Domain))
            )).one()
            return _domain(row)

        return await self._write(job)

    async def list_domains(self) -> list[Domain]:
        async with connect(self._engine) as conn:
            rows = await conn.execute(_select_all(m.Domain).order_by(m.Domain.name))
            return [_domain(row) for row in rows]

    async def get_domain(self, name: str) -> Domain:
        name = normalise_domain(name)
        recent = self._recent_domains.get(name)
        if recent is not None:
            return recent

        async def read(conn: AsyncConnection) -> Row[Any] | None:
            return (await conn.execute(_DOMAIN_BY_NAME, {"name": name})).one_or_none()

        row = await self._lookup(read)
        if row is None:
            raise NotFound(_not_hosted(name))
        domain = _domain(row)
        self._recent_domains.put(name, domain)
        return domain

    @_changes_recipients
    async def remove_domain(self, name: str) -> None:
        """Stop hosting `name` (its aliases go too); refused while it has accounts."""
        name = normalise_domain(name)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            domain_id = await _hosted_domain_id(conn, name)
            count = await conn.scalar(
                select(func.count()).select_from(m.Account).where(m.Account.domain_id == domain_id)
            )
            if count:
                raise RunboxError(f"domain {name} still has {count} account{'s' if count != 1 else ''}")
            await conn.execute(delete(m.Domain).where(m.Domain.id == domain_id))

        await self._write(job)

    # --- accounts --------------------------------------------------------------------------

    @_changes_recipients
    async def add_account(self, address: str, password_hash: str,
                          quota_bytes: int | None = None) -> Account:
        """Create an account with the default mailboxes; its domain must be hosted."""
        address = normalise_address(address)
        _check_quota(quota_bytes)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Account:
            domain_id = await _hosted_domain_id(conn, domain_of(address))
            existing = await conn.scalar(select(m.Account.disabled).where(m.Account.address == address))
            if existing is True:
                raise AlreadyExists(f"account {address} was removed but its address stays reserved: "
                                    "purge it first (user remove --purge)")
            if existing is not None:
                raise AlreadyExists(f"account {address} already exists")
            account_id = (await conn.execute(
                insert(m.Account).values(domain_id=domain_id, address=address, password_hash=password_hash,
                                         quota_bytes=quota_bytes).returning(m.Account.id)
            )).scalar_one()
            for name, special_use in DEFAULT_MAILBOXES:
                await insert_mailbox(conn, account_id, name, special_use)
            return await _load_account(conn, address)

        return await self._write(job)

    async def get_account(self, address: str) -> Account:
        address = normalise_address(address)
        async with connect(self._engine) as conn:
            return await _load_account(conn, address)

    async def list_accounts(self) -> list[Account]:
        async with connect(self._engine) as conn:
            rows = await conn.execute(_account_query().order_by(m.Account.address))
            return [_account(row) for row in rows]

    async def set_password_hash(self, address: str, password_hash: str) -> None:
        address = normalise_address(address)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            result = await conn.execute(
                update(m.Account).where(m.Account.address == address).values(password_hash=password_hash)
            )
            if result.rowcount == 0:
                raise NotFound(_no_account(address))

        await self._write(job)

    @_changes_recipients
    async def update_account(self, address: str, *, app_passwords_only: bool | None = None,
                             no_backup: bool | None = None,
                             quota_bytes: int | None | Literal[_Unchanged.TOKEN] = UNCHANGED) -> Account:
        """Change the policies given; quota_bytes=None means unlimited, UNCHANGED leaves it."""
        address = normalise_address(address)
        values: dict[str, Any] = {}
        if app_passwords_only is not None:
            values["app_passwords_only"] = app_passwords_only
        if no_backup is not None:
            values["no_backup"] = no_backup
        if quota_bytes is not UNCHANGED:
            _check_quota(quota_bytes)
            values["quota_bytes"] = quota_bytes

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Account:
            if values:
                await conn.execute(update(m.Account).where(m.Account.address == address).values(**values))
            return await _load_account(conn, address)

        return await self._write(job)

    @_changes_recipients
    async def remove_account(self, address: str, purge: bool) -> None:
        """Disable the account (address stays reserved, data kept), or with purge erase every trace."""
        address = normalise_address(address)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            account_id = await _account_id(conn, address)
            if purge:
                await self._purge(conn, account_id, address)
            else:
                await conn.execute(update(m.Account).where(m.Account.id == account_id).values(disabled=True))

        await self._write(job)
        if purge:
            await scrub_freed_pages(self._engine)

    async def _purge(self, conn: AsyncConnection, account_id: int, address: str) -> None:
        blob_ids = list(await conn.scalars(
            select(m.Message.blob_id).join(m.Mailbox).where(m.Mailbox.account_id == account_id)
        ))
        blob_ids += await conn.scalars(
            delete(m.QueueMessage).where(m.QueueMessage.sender == address).returning(m.QueueMessage.blob_id)
        )
        await conn.execute(delete(m.Alias).where(or_(m.Alias.target == address, m.Alias.source == address)))
        # Cascades to mailboxes (and their messages and tombstones) and app passwords.
        await conn.execute(delete(m.Account).where(m.Account.id == account_id))
        await self._blobs.release(conn, blob_ids)

    # --- aliases ---------------------------------------------------------------------------

    @_changes_recipients
    async def add_alias(self, source: str, target: str) -> Alias:
        """Deliver mail for `source` (an address, or "@domain" for a catch-all) to `target`."""
        source, target = normalise_alias_source(source), normalise_address(target)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Alias:
            domain_id = await _hosted_domain_id(conn, domain_of(source))
            duplicate = select(m.Alias.id).where(m.Alias.source == source, m.Alias.target == target)
            if await conn.scalar(duplicate) is not None:
                raise AlreadyExists(f"alias {source} -> {target} already exists")
            await conn.execute(insert(m.Alias).values(domain_id=domain_id, source=source, target=target))
            return Alias(source, target)

        return await self._write(job)

    async def list_aliases(self) -> list[Alias]:
        async with connect(self._engine) as conn:
            rows = await conn.execute(
                select(m.Alias.source, m.Alias.target).order_by(m.Alias.source, m.Alias.target)
            )
            return [Alias(row.source, row.target) for row in rows]

    @_changes_recipients
    async def remove_alias(self, source: str) -> None:
        """Remove `source` with all its targets."""
        source = normalise_alias_source(source)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            result = await conn.execute(delete(m.Alias).where(m.Alias.source == source))
            if result.rowcount == 0:
                raise NotFound(f"no such alias: {source}")

        await self._write(job)

    # --- app passwords ---------------------------------------------------------------------

    async def add_app_password(self, address: str, label: str, scopes: Sequence[str],
                               password_hash: str) -> AppPassword:
        address = normalise_address(address)
        label = label.strip()
        if not label:
            raise RunboxError("an app password needs a label")
        unknown = [scope for scope in scopes if scope not in APP_PASSWORD_SCOPES]
        if unknown or not scopes:
            raise RunboxError(f"app password scopes must be some of {', '.join(APP_PASSWORD_SCOPES)}, "
                              f"got {','.join(scopes) or 'none'}")
        stored_scopes = ",".join(scope for scope in APP_PASSWORD_SCOPES if scope in scopes)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> AppPassword:
            account_id = await _account_id(conn, address)
            taken = select(m.AppPassword.id).where(m.AppPassword.account_id == account_id,
                                                   m.AppPassword.label == label)
            if await conn.scalar(taken) is not None:
                raise AlreadyExists(f"{address} already has an app password labelled {label!r}")
            row = (await conn.execute(
                insert(m.AppPassword).values(account_id=account_id, label=label, scopes=stored_scopes,
                                             password_hash=password_hash).returning(*_columns(m.AppPassword))
            )).one()
            return _app_password(row)

        return await self._write(job)

    async def list_app_passwords(self, address: str) -> list[AppPassword]:
        address = normalise_address(address)
        async with connect(self._engine) as conn:
            rows = await conn.execute(_app_passwords_of(await _account_id(conn, address)))
            return [_app_password(row) for row in rows]

    async def revoke_app_password(self, address: str, label: str) -> None:
        address = normalise_address(address)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            account_id = await _account_id(conn, address)
            result = await conn.execute(delete(m.AppPassword).where(
                m.AppPassword.account_id == account_id, m.AppPassword.label == label.strip()))
            if result.rowcount == 0:
                raise NotFound(f"{address} has no app password labelled {label!r}")

        await self._write(job)

    # --- authentication lookups ------------------------------------------------------------

    async def get_login(self, address: str) -> LoginRecord | None:
        """Everything a login check needs, or None for an unknown (or malformed) address."""
        try:
            address = normalise_address(address)
        except RunboxError:
            return None

        async def read(conn: AsyncConnection) -> LoginRecord | None:
            account = (await conn.execute(_select_all(m.Account).where(m.Account.address == address))).one_or_none()
            if account is None:
                return None
            rows = await conn.execute(_app_passwords_of(account.id))
            credentials = tuple(_credential(row) for row in rows)
            return LoginRecord(account.id, account.address, account.password_hash, account.app_passwords_only,
                               account.disabled, credentials)

        return await self._read(read)

    async def update_password_hash(self, account_id: int, password_hash: str) -> None:
        """Store a rehashed password (new Argon2 parameters); a vanished account is ignored."""
        await self._update_row(m.Account, account_id, password_hash=password_hash)

    async def update_app_password_hash(self, app_password_id: int, password_hash: str) -> None:
        """Store a rehashed app password; a revoked one is ignored."""
        await self._update_row(m.AppPassword, app_password_id, password_hash=password_hash)

    async def _update_row(self, model: type[m.Account | m.AppPassword], row_id: int, **values: Any) -> None:
        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            await conn.execute(update(model).where(model.id == row_id).values(**values))

        await self._write(job)

    # --- mailboxes -------------------------------------------------------------------------

    async def list_mailboxes(self, account_id: int) -> list[Mailbox]:
        async def read(conn: AsyncConnection) -> list[Mailbox]:
            rows = await conn.execute(_select_all(m.Mailbox).where(m.Mailbox.account_id == account_id)
                                      .order_by(m.Mailbox.name != INBOX, m.Mailbox.name))
            return [_mailbox(row) for row in rows]

        return await self._read(read, snapshot=False)

    async def get_mailbox(self, account_id: int, name: str) -> Mailbox:
        name = normalise_mailbox_name(name)

        async def read(conn: AsyncConnection) -> Row[Any] | None:
            query = _select_all(m.Mailbox).where(m.Mailbox.account_id == account_id, m.Mailbox.name == name)
            return (await conn.execute(query)).one_or_none()

        row = await self._read(read, snapshot=False)
        if row is None:
            raise NotFound(f"no such mailbox: {name}")
        return _mailbox(row)

    async def create_mailbox(self, account_id: int, name: str, special_use: str | None = None) -> Mailbox:
        name = normalise_mailbox_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise RunboxError(f"unknown special-use attribute: {special_use}")

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Mailbox:
            exists = select(m.Mailbox.id).where(m.Mailbox.account_id == account_id, m.Mailbox.name == name)
            if await conn.scalar(exists) is not None:
                raise AlreadyExists(f"mailbox {name} already exists")
            return _mailbox(await insert_mailbox(conn, account_id, name, special_use))

        return await self._write(job)

    # --- messages --------------------------------------------------------------------------

    async def append(self, mailbox_id: int, data: bytes, *, flags: Iterable[str] = (),
                     internal_date: datetime | None = None) -> Appended:
        """Store a message; returns once it is durably committed."""
        return (await self._store_message([mailbox_id], data, flags, internal_date))[0]

    async def deliver(self, mailbox_ids: Sequence[int], data: bytes, *,
                      internal_date: datetime | None = None) -> list[Appended]:
        """One message into each mailbox (one per entry, in order), sharing ONE blob; all or nothing."""
        if not mailbox_ids:
            raise ValueError("deliver() needs at least one mailbox")
        return await self._store_message(mailbox_ids, data, (), internal_date)

    async def _store_message(self, mailbox_ids: Sequence[int], data: bytes, flags: Iterable[str],
                             internal_date: datetime | None) -> list[Appended]:
        copy = new_copy(data, flags, internal_date)
        parsed = await parse_message(data)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> list[Appended]:
            blob_id = await self._blobs.put(conn, data, parsed)
            return await insert_messages(conn, events, blob_id, mailbox_ids, copy)

        return await self._write(job)

    async def read_message(self, mailbox_id: int, uid: int) -> bytes:
        async def read(conn: AsyncConnection) -> bytes:
            blob_id = await conn.scalar(select(m.Message.blob_id)
                                        .where(m.Message.mailbox_id == mailbox_id, m.Message.uid == uid))
            if blob_id is None:
                raise NotFound(f"no message with UID {uid} in mailbox {mailbox_id}")
            return await self._blobs.get(conn, blob_id)

        return await self._read(read)

    async def list_messages(self, mailbox_id: int) -> list[MessageInfo]:
        """The mailbox's messages in UID order."""
        async with connect(self._engine) as conn:
            query = _select_all(m.Message).where(m.Message.mailbox_id == mailbox_id).order_by(m.Message.uid)
            rows = (await conn.execute(query)).all()
            if not rows:
                await _require_mailbox(conn, mailbox_id)
        return [_message_info(row) for row in rows]

    async def expunge(self, mailbox_id: int, uids: Iterable[int]) -> None:
        """Remove messages for good, leaving content-free tombstones for QRESYNC (RFC 7162 §3.2.10).

        A blob goes as soon as no message or queue entry refers to it; for a
        No Backup account the freed bytes are then scrubbed from the files too.
        """
        wanted = sorted(set(uids))
        if not wanted:
            return

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> bool:
            before = len(events)
            no_backup = await self._expunge_rows(conn, events, mailbox_id, wanted)
            if len(events) == before:
                raise _NothingToExpunge
            return no_backup

        try:
            no_backup = await self._write(job)
        except _NothingToExpunge:
            return  # its savepoint rolled back the MODSEQ bump: nothing changed
        if no_backup:
            await scrub_freed_pages(self._engine)

    # --- outbound queue --------------------------------------------------------------------

    async def enqueue(self, sender: str, recipients: Sequence[str], data: bytes) -> int:
        """Queue `data` for remote delivery; returns the queue entry id once durably committed."""
        sender = normalise_address(sender) if sender else ""  # "" is the null reverse-path of bounces
        addresses = [normalise_address(recipient) for recipient in recipients]
        if not addresses:
            raise ValueError("enqueue() needs at least one recipient")
        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> int:
            blob_id = await self._blobs.put(conn, data, queued_metadata(data))
            return await insert_queue_entry(conn, blob_id, sender, addresses)

        return await self._write(job)

    async def list_queue(self) -> list[QueueEntry]:
        async with connect(self._engine) as conn:
            messages = (await conn.execute(
                select(m.QueueMessage.id, m.QueueMessage.sender, m.QueueMessage.created_at, m.Blob.size)
                .join(m.Blob).order_by(m.QueueMessage.id)
            )).all()
            recipients = (await conn.execute(
                _select_all(m.QueueRecipient).order_by(m.QueueRecipient.id)
            )).all()
        by_message: dict[int, list[QueuedRecipient]] = {}
        for row in recipients:
            by_message.setdefault(row.queue_message_id, []).append(QueuedRecipient(
                row.recipient, row.status, row.attempts, row.next_attempt_at, row.last_error, row.tls_outcome))
        return [QueueEntry(row.id, row.sender, row.size, row.created_at, tuple(by_message.get(row.id, ())))
                for row in messages]

    async def remove_queued(self, queue_id: int) -> None:
        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            removed = delete(m.QueueMessage).where(m.QueueMessage.id == queue_id)
            blob_id = await conn.scalar(removed.returning(m.QueueMessage.blob_id))
            if blob_id is None:
                raise NotFound(f"no such queue entry: {queue_id}")
            await self._blobs.release(conn, [blob_id])

        await self._write(job)

    # --- SMTP delivery (recipients.py) -----------------------------------------------------

    async def resolve_recipient(self, address: str) -> Resolution:
        """Who receives mail for `address` (accounts, aliases, plus-addressing, catch-all); RunboxError
        if it is not an address."""
        recent = self._recent_resolutions.get(address)
        if recent is not None:
            return recent
        resolution = await self._lookup(lambda conn: resolve(conn, address))
        if repeatable(resolution):
            self._recent_resolutions.put(address, resolution)
        return resolution

    async def sender_addresses(self, account_address: str) -> frozenset[str]:
        """The addresses an account may send as: its own and the exact aliases delivering to it."""
        address = normalise_address(account_address)
        recent = self._recent_senders.get(address)
        if recent is None:
            recent = await self._lookup(lambda conn: sender_addresses(conn, address))
            self._recent_senders.put(address, recent)
        return recent

    async def accept_message(self, sender: str, *, mailbox_ids: Sequence[int] = (), local_data: bytes = b"",
                             remote_recipients: Sequence[str] = (), remote_data: bytes = b"",
                             quota: bool = True) -> Accepted:
        """Deliver `local_data` into each mailbox (one shared blob) and queue `remote_data` for the
        remote recipients, in ONE transaction: a crash stores both or neither. QuotaExceeded (and
        nothing stored) if a local copy would take an account over its quota; `quota=False` skips
        that check, for a caller that knows no recipient has a quota (quotas are soft limits)."""
        sender = normalise_address(sender) if sender else ""
        addresses = [normalise_address(recipient) for recipient in remote_recipients]
        if not mailbox_ids and not addresses:
            raise ValueError("accept_message() needs a mailbox or a remote recipient")
        copy = new_copy(local_data, (), None)
        local_parsed = await parse_message(local_data) if mailbox_ids else None
        remote_parsed = queued_metadata(remote_data) if addresses else None

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> Accepted:
            appended: list[Appended] = []
            queue_id = None
            if local_parsed is not None:
                if quota:
                    await check_quota(conn, mailbox_ids, len(local_data))
                blob_id = await self._blobs.put(conn, local_data, local_parsed)
                appended = await insert_messages(conn, events, blob_id, mailbox_ids, copy)
            if remote_parsed is not None:
                blob_id = await self._blobs.put(conn, remote_data, remote_parsed)
                queue_id = await insert_queue_entry(conn, blob_id, sender, addresses)
            return Accepted(tuple(appended), queue_id)

        return await self._write(job)


class _NothingToExpunge(Exception):
    """Raised inside an expunge job to roll its savepoint back (no MODSEQ is spent on nothing)."""


# --- queries shared by several methods -----------------------------------------------------


def _columns(model: type[m.Base]) -> list[Any]:
    return list(model.__table__.columns)


def _select_all(model: type[m.Base]) -> Select[Any]:
    """Every column by name: rows then read like the model (row.address)."""
    return select(*_columns(model))


# Built once: submission looks up the signing domain for every message.
_DOMAIN_BY_NAME = _select_all(m.Domain).where(m.Domain.name == bindparam("name"))


async def _domain_id(conn: AsyncConnection, name: str) -> int | None:
    return await conn.scalar(select(m.Domain.id).where(m.Domain.name == name))


async def _hosted_domain_id(conn: AsyncConnection, name: str) -> int:
    domain_id = await _domain_id(conn, name)
    if domain_id is None:
        raise NotFound(_not_hosted(name))
    return domain_id


def _app_passwords_of(account_id: int) -> Select[Any]:
    query = _select_all(m.AppPassword).where(m.AppPassword.account_id == account_id)
    return query.order_by(m.AppPassword.label)


async def _account_id(conn: AsyncConnection, address: str) -> int:
    account_id = await conn.scalar(select(m.Account.id).where(m.Account.address == address))
    if account_id is None:
        raise NotFound(_no_account(address))
    return account_id


def _account_query() -> Select[Any]:
    # SUM of BIGINT is NUMERIC on PostgreSQL: cast back to an integer.
    used = (select(cast(func.coalesce(func.sum(m.Message.size), 0), BigInteger)).join(m.Mailbox)
            .where(m.Mailbox.account_id == m.Account.id).scalar_subquery())
    return (_select_all(m.Account).add_columns(m.Domain.name.label("domain_name"), used.label("used_bytes"))
            .join(m.Domain, m.Domain.id == m.Account.domain_id))


async def _load_account(conn: AsyncConnection, address: str) -> Account:
    row = (await conn.execute(_account_query().where(m.Account.address == address))).one_or_none()
    if row is None:
        raise NotFound(_no_account(address))
    return _account(row)


async def _require_mailbox(conn: AsyncConnection, mailbox_id: int) -> None:
    if await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.id == mailbox_id)) is None:
        raise NotFound(no_mailbox(mailbox_id))


def _check_quota(quota_bytes: int | None) -> None:
    if quota_bytes is not None and (isinstance(quota_bytes, bool) or quota_bytes <= 0):
        raise RunboxError(f"a quota must be a positive number of bytes, got {quota_bytes!r}")


# --- messages for operators ----------------------------------------------------------------


def _not_hosted(domain: str) -> str:
    return f"domain {domain} is not hosted here"


def _no_account(address: str) -> str:
    return f"no such account: {address}"


# --- rows to dataclasses -------------------------------------------------------------------


def _domain(row: Row[Any]) -> Domain:
    return Domain(row.id, row.name, row.dkim_selector, row.dkim_private_key, row.created_at)


def _account(row: Row[Any]) -> Account:
    return Account(row.id, row.address, row.domain_name, row.app_passwords_only, row.no_backup,
                   row.quota_bytes, row.disabled, row.created_at, row.used_bytes)


def _scopes(stored: str) -> tuple[str, ...]:
    return tuple(stored.split(","))


def _app_password(row: Row[Any]) -> AppPassword:
    return AppPassword(row.id, row.label, _scopes(row.scopes), row.created_at)


def _credential(row: Row[Any]) -> AppPasswordCredential:
    return AppPasswordCredential(row.id, row.label, _scopes(row.scopes), row.password_hash)


def _mailbox(row: Row[Any]) -> Mailbox:
    return Mailbox(row.id, row.account_id, row.name, row.uidvalidity, row.uidnext, row.highestmodseq,
                   row.special_use, row.subscribed)


def _message_info(row: Row[Any]) -> MessageInfo:
    zone = timezone(timedelta(minutes=row.internal_date_offset))
    return MessageInfo(row.uid, row.modseq, decode_flags(row.system_flags, row.keywords),
                       row.internal_date.astimezone(zone), row.size)
