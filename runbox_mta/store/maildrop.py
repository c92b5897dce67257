"""What POP3 needs from the store: the locked maildrop and its snapshot (RFC 1939 §8).

`MaildropStore` is mixed into `Store` (api.py). POP3 reads messages with
`Store.read_message` and deletes them at QUIT with `Store.expunge`, the same
call IMAP uses, so a POP3 deletion leaves tombstones and change events and
IMAP sessions report it as EXPUNGE.

The lock (RFC 1939 §8: the server acquires an exclusive-access lock on the
maildrop): on SQLite one daemon serves the file, so a set of open mailboxes
in memory is the whole lock. On PostgreSQL, where several daemons share the
store, each open maildrop also holds a session-level advisory lock, taken on
ONE connection per daemon (not one per POP3 session, which would empty the
pool). A lock never outlives its holder: a session gives it back however it
ends (QUIT, drop, idle timeout, crash); a daemon that dies closes its
connection and PostgreSQL drops its locks (a vanished host: once TCP
keepalive notices). A schema-less lock needs no migration and leaves no stale
rows behind. If that connection breaks, the sessions already open keep
going without the cross-daemon lock: at worst two sessions delete the same
message, which `expunge` tolerates.

Sizes: POP3 announces the exact octets RETR sends (pop3.message). Counting
them needs the message bytes, so the result is kept in the blob's parsed
metadata (`POP3_SIZE_KEY`) on the first POP3 login and read from there after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.errors import NotFound, RunboxError
from runbox_mta.pop3.message import transmitted_size
from runbox_mta.store import models as m
from runbox_mta.store.changes import ChangeEvent
from runbox_mta.store.db import MAX_IN_LIST, connect
from runbox_mta.store.names import INBOX

if TYPE_CHECKING:
    from runbox_mta.store.committer import Job

T = TypeVar("T")

log = logging.getLogger(__name__)

# Key in blobs.parsed: pop3.message.transmitted_size of the blob's bytes.
POP3_SIZE_KEY = "pop3_size"
# A first login to a big mailbox reads its messages this many bytes at a time.
SIZE_BATCH_BYTES = 8 * 1024 * 1024
# Counting more bytes than this stalls other connections: it runs in a thread.
INLINE_COUNT_LIMIT = 64 * 1024
# pg_try_advisory_lock(int4, int4): first key "pop3", second the mailbox.
LOCK_SPACE = int.from_bytes(b"pop3", "big")


class MaildropInUse(RunboxError):
    """Another POP3 session has this maildrop open (RFC 2449 [IN-USE])."""


@dataclass(frozen=True)
class MaildropMessage:
    uid: int
    size: int  # octets RETR sends before its terminating ".CRLF"


@dataclass(frozen=True)
class Maildrop:
    """The INBOX at login; message number n (RFC 1939 §5) is messages[n - 1]."""

    mailbox_id: int
    uidvalidity: int
    messages: tuple[MaildropMessage, ...]  # UID order


class MaildropLock:
    """Exclusive POP3 access to one mailbox, until `release`."""

    def __init__(self, table: _LockTable, mailbox_id: int) -> None:
        self._table = table
        self.mailbox_id = mailbox_id
        self._released = False

    async def release(self) -> None:
        """Give the lock back; a second call does nothing."""
        if not self._released:
            self._released = True
            await self._table.release(self.mailbox_id)


class MaildropStore:
    """The POP3 part of `Store`."""

    if TYPE_CHECKING:
        _engine: AsyncEngine

        async def _write(self, job: Job[T]) -> T: ...

    @cached_property
    def _maildrop_locks(self) -> _LockTable:
        return _LockTable(self._engine)

    async def open_maildrop(self, account_id: int) -> tuple[MaildropLock, Maildrop]:
        """Lock the account's INBOX for POP3, then snapshot it; MaildropInUse if it is locked."""
        mailbox_id, uidvalidity = await self._inbox(account_id)
        if not await self._maildrop_locks.acquire(mailbox_id):
            raise MaildropInUse(f"mailbox {mailbox_id} is open in another POP3 session")
        lock = MaildropLock(self._maildrop_locks, mailbox_id)
        try:
            messages = await self._maildrop_messages(mailbox_id)
        except BaseException:
            await lock.release()
            raise
        return lock, Maildrop(mailbox_id, uidvalidity, messages)

    async def _inbox(self, account_id: int) -> tuple[int, int]:
        async with connect(self._engine) as conn:
            row = (await conn.execute(
                select(m.Mailbox.id, m.Mailbox.uidvalidity)
                .where(m.Mailbox.account_id == account_id, m.Mailbox.name == INBOX)
            )).one_or_none()
        if row is None:
            raise NotFound(f"account {account_id} has no INBOX")
        return row.id, row.uidvalidity

    async def _maildrop_messages(self, mailbox_id: int) -> tuple[MaildropMessage, ...]:
        async with connect(self._engine) as conn:
            rows = (await conn.execute(
                select(m.Message.uid, m.Message.blob_id, m.Blob.size, m.Blob.parsed)
                .join(m.Blob, m.Blob.id == m.Message.blob_id)
                .where(m.Message.mailbox_id == mailbox_id).order_by(m.Message.uid)
            )).all()
            parsed = {row.blob_id: row.parsed or {} for row in rows}
            sizes = {blob_id: meta[POP3_SIZE_KEY] for blob_id, meta in parsed.items() if POP3_SIZE_KEY in meta}
            unmeasured = {row.blob_id: row.size for row in rows if row.blob_id not in sizes}
            measured = await _measure(conn, list(unmeasured.items()))
        if measured:
            await self._remember_sizes({blob_id: {**parsed[blob_id], POP3_SIZE_KEY: size}
                                        for blob_id, size in measured.items()})
        sizes.update(measured)
        # A blob that vanished meanwhile went with its message, expunged by another session.
        return tuple(MaildropMessage(row.uid, sizes[row.blob_id]) for row in rows if row.blob_id in sizes)

    async def _remember_sizes(self, parsed: dict[int, dict[str, Any]]) -> None:
        """Best effort: if this fails the sizes are counted again at the next login."""
        statement = (update(m.Blob).where(m.Blob.id == bindparam("blob_id"))
                     .values(parsed=bindparam("new_parsed", type_=m.Blob.parsed.type)))

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            await conn.execute(statement, [{"blob_id": blob_id, "new_parsed": meta}
                                           for blob_id, meta in parsed.items()])

        try:
            await self._write(job)
        except (RunboxError, SQLAlchemyError):
            log.warning("could not store POP3 message sizes", exc_info=True)


async def _measure(conn: AsyncConnection, blobs: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Count transmitted sizes of (blob id, stored size) blobs, reading a bounded batch at a time."""
    sizes: dict[int, int] = {}
    for batch in _batches(blobs):
        rows = (await conn.execute(select(m.Blob.id, m.Blob.data).where(m.Blob.id.in_(batch)))).all()
        contents = [(row.id, row.data) for row in rows]
        if sum(len(data) for _, data in contents) > INLINE_COUNT_LIMIT:
            sizes.update(await asyncio.to_thread(_count, contents))
        else:
            sizes.update(_count(contents))
    return sizes


def _count(contents: list[tuple[int, bytes]]) -> dict[int, int]:
    return {blob_id: transmitted_size(data) for blob_id, data in contents}


def _batches(blobs: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
    """Blob ids in batches of at most SIZE_BATCH_BYTES (or one bigger blob) and MAX_IN_LIST ids."""
    batch: list[int] = []
    total = 0
    for blob_id, size in blobs:
        if batch and (total + size > SIZE_BATCH_BYTES or len(batch) >= MAX_IN_LIST):
            yield batch
            batch, total = [], 0
        batch.append(blob_id)
        total += size
    if batch:
        yield batch


class _LockTable:
    """The maildrops this daemon has open; on PostgreSQL mirrored in advisory locks."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._shared = engine.dialect.name == "postgresql"
        self._held: set[int] = set()
        self._conn: AsyncConnection | None = None  # holds the advisory locks while any is held
        self._guard = asyncio.Lock()  # one statement at a time on _conn

    async def acquire(self, mailbox_id: int) -> bool:
        if mailbox_id in self._held:
            return False
        self._held.add(mailbox_id)  # claimed before any await: a second local session sees it
        try:
            taken = not self._shared or await self._advisory("pg_try_advisory_lock", mailbox_id)
        except BaseException:
            self._held.discard(mailbox_id)
            raise
        if not taken:
            self._held.discard(mailbox_id)
            await self._close_if_idle()
        return taken

    async def release(self, mailbox_id: int) -> None:
        self._held.discard(mailbox_id)
        if self._shared:
            # Shielded: a session cancelled at shutdown still gives its lock back.
            await asyncio.shield(self._unlock(mailbox_id))

    async def _unlock(self, mailbox_id: int) -> None:
        try:
            await self._advisory("pg_advisory_unlock", mailbox_id)
        except (SQLAlchemyError, RunboxError, OSError):
            log.warning("POP3 lock connection lost; its locks went with it", exc_info=True)
        await self._close_if_idle()

    async def _advisory(self, function: str, mailbox_id: int) -> bool:
        statement = text(f"SELECT {function}(CAST(:space AS integer), CAST(:key AS integer))")
        async with self._guard:
            try:
                conn = await self._connection()
                return bool(await conn.scalar(statement, {"space": LOCK_SPACE, "key": _lock_key(mailbox_id)}))
            except BaseException:
                await self._discard()  # in an unknown state: its locks cannot be trusted
                raise

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect().start()
            # Autocommit: the connection sits idle for whole sessions, never inside a transaction.
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    async def _close_if_idle(self) -> None:
        """Return the connection to the pool once it holds no lock."""
        async with self._guard:
            if self._conn is not None and not self._held:
                conn, self._conn = self._conn, None
                await conn.close()

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.invalidate()
            await conn.close()
        except (SQLAlchemyError, OSError):
            pass  # already broken: invalidating is all that was left to do


def _lock_key(mailbox_id: int) -> int:
    # Folded into int4: ids 2**32 apart share a key, which at worst makes one
    # report "in use" while the other is open; it never lets two sessions in.
    return (mailbox_id + 2**31) % 2**32 - 2**31
