"""What `runbox-mta import` and `export` need from the store: bulk appends that
keep flags and internal dates, and a mailbox's messages read in UID order.

`TransferStore` is mixed into `Store` (api.py). An import batch is one
committer job: its messages get consecutive UIDs in the order given, one
MODSEQ (as a COPY does), one blob each, and an APPEND change event each, so
open IMAP sessions see them like any APPEND. A message already in the
mailbox (same internal date, size and Message-ID; without a Message-ID, the
same internal date and bytes) is skipped, which makes importing the same
source twice harmless; the account's quota is checked in the same
transaction, and the batch stores only what fits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import BigInteger, cast, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.errors import NotFound
from runbox_mta.store import models as m
from runbox_mta.store.blobs import STRUCTURE_KEY, BlobStore
from runbox_mta.store.changes import ChangeEvent, ChangeKind
from runbox_mta.store.db import connect, in_chunks
from runbox_mta.store.flags import decode_flags
from runbox_mta.store.names import HIERARCHY_DELIMITER, normalise_mailbox_name
from runbox_mta.store.writes import NewCopy, insert_mailbox, new_copy, next_modseq, no_mailbox, parse_message

if TYPE_CHECKING:
    from runbox_mta.store.committer import Job

T = TypeVar("T")

# Rows per read when exporting: bounds memory to this many messages' bytes.
EXPORT_BATCH = 64
# Where blobs.parsed keeps the Message-ID: imap.mime's structure JSON, the root part's envelope.
_MESSAGE_ID = (STRUCTURE_KEY, "root", "envelope", "message_id")


@dataclass(frozen=True)
class ImportMessage:
    data: bytes
    flags: frozenset[str]
    internal_date: datetime  # timezone-aware


@dataclass(frozen=True)
class ImportResult:
    uids: tuple[int, ...]  # of the messages stored, ascending in the order given
    duplicates: int  # already in the mailbox, skipped
    over_quota: int  # this many from the first that did not fit on were not stored


@dataclass(frozen=True)
class StoredMessage:
    uid: int
    flags: frozenset[str]
    internal_date: datetime  # in the zone it was stored with
    data: bytes


class TransferStore:
    """The import/export part of `Store`."""

    if TYPE_CHECKING:
        _engine: AsyncEngine
        _blobs: BlobStore

        async def _write(self, job: Job[T]) -> T: ...

    async def ensure_mailbox(self, account_id: int, name: str) -> int:
        """The id of the mailbox `name`, created (with missing parents) if needed."""
        name = normalise_mailbox_name(name)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> int:
            parts = name.split(HIERARCHY_DELIMITER)
            box_id = 0
            for depth in range(1, len(parts) + 1):
                path = HIERARCHY_DELIMITER.join(parts[:depth])
                found = await conn.scalar(select(m.Mailbox.id).where(
                    m.Mailbox.account_id == account_id, m.Mailbox.name == path))
                box_id = found if found is not None else (await insert_mailbox(conn, account_id, path, None)).id
            return box_id

        return await self._write(job)

    async def import_messages(self, mailbox_id: int, messages: Sequence[ImportMessage]) -> ImportResult:
        """Append `messages` in order, skipping those already there, up to the account's quota."""
        copies = [new_copy(message.data, message.flags, message.internal_date) for message in messages]
        parsed = [await parse_message(message.data) for message in messages]

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> ImportResult:
            present = _Present(self._blobs, conn)
            await present.load(mailbox_id, copies)
            room = await _room(conn, mailbox_id)
            fresh: list[int] = []
            duplicates = over_quota = 0
            for index, (message, copy) in enumerate(zip(messages, copies)):
                message_id = _message_id(parsed[index].parsed)
                if await present.contains(copy, message_id, message.data):
                    duplicates += 1
                    continue
                if room is not None and copy.size > room:
                    over_quota = len(messages) - index
                    break
                present.add(copy, message_id, message.data)
                fresh.append(index)
                if room is not None:
                    room -= copy.size
            if not fresh:
                return ImportResult((), duplicates, over_quota)
            box = await next_modseq(conn, mailbox_id, new_uids=len(fresh))
            first = box.uidnext - len(fresh)
            rows = []
            for uid, index in enumerate(fresh, start=first):
                copy = copies[index]
                blob_id = await self._blobs.put(conn, messages[index].data, parsed[index])
                rows.append({"mailbox_id": mailbox_id, "uid": uid, "modseq": box.highestmodseq,
                             "blob_id": blob_id, "system_flags": copy.system_flags, "keywords": copy.keywords,
                             "internal_date": copy.internal_date, "internal_date_offset": copy.offset_minutes,
                             "size": copy.size})
            await conn.execute(insert(m.Message), rows)
            uids = tuple(range(first, box.uidnext))
            events.extend(ChangeEvent(box.account_id, mailbox_id, uid, box.highestmodseq, ChangeKind.APPEND)
                          for uid in uids)
            return ImportResult(uids, duplicates, over_quota)

        return await self._write(job)

    async def stored_messages(self, mailbox_id: int) -> AsyncIterator[list[StoredMessage]]:
        """The mailbox's messages with their bytes, in UID order, a batch at a time."""
        async with connect(self._engine) as conn:
            if await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.id == mailbox_id)) is None:
                raise NotFound(no_mailbox(mailbox_id))
        after = 0
        while True:
            async with connect(self._engine) as conn:
                rows = (await conn.execute(
                    select(m.Message.uid, m.Message.system_flags, m.Message.keywords, m.Message.internal_date,
                           m.Message.internal_date_offset, m.Blob.data)
                    .join(m.Blob, m.Blob.id == m.Message.blob_id)
                    .where(m.Message.mailbox_id == mailbox_id, m.Message.uid > after)
                    .order_by(m.Message.uid).limit(EXPORT_BATCH))).all()
            if not rows:
                return
            yield [StoredMessage(row.uid, decode_flags(row.system_flags, row.keywords),
                                 row.internal_date.astimezone(timezone(timedelta(minutes=row.internal_date_offset))),
                                 row.data) for row in rows]
            after = rows[-1].uid


@dataclass
class _Present:
    """What of the mailbox a new message could duplicate: one with the same internal date, size
    and Message-ID, or, for a message without a Message-ID, the same internal date and bytes.

    Size and date narrow the candidates in SQL and the Message-ID comes out of
    the stored parse, so only messages without one are read, and only when a
    new one without one matches their date and size.
    """

    blobs: BlobStore
    conn: AsyncConnection
    identified: set[tuple[datetime, int, str]] = field(default_factory=set)
    anonymous: dict[tuple[datetime, int], list[int | bytes]] = field(default_factory=dict)  # blob ids, bytes

    async def load(self, mailbox_id: int, copies: Sequence[NewCopy]) -> None:
        wanted = {(copy.internal_date, copy.size) for copy in copies}
        message_id = m.Blob.parsed[_MESSAGE_ID].as_string()
        for chunk in in_chunks(sorted({size for _, size in wanted})):
            rows = (await self.conn.execute(
                select(m.Message.internal_date, m.Message.size, m.Message.blob_id, message_id.label("message_id"))
                .join(m.Blob, m.Blob.id == m.Message.blob_id)
                .where(m.Message.mailbox_id == mailbox_id, m.Message.size.in_(chunk)))).all()
            for row in rows:
                if (row.internal_date, row.size) in wanted:
                    self._add(row.internal_date, row.size, row.message_id, row.blob_id)

    async def contains(self, copy: NewCopy, message_id: str | None, data: bytes) -> bool:
        if message_id is not None:
            return (copy.internal_date, copy.size, message_id) in self.identified
        entries = self.anonymous.get((copy.internal_date, copy.size), [])
        for index, entry in enumerate(entries):
            if isinstance(entry, int):
                entry = entries[index] = await self.blobs.get(self.conn, entry)
            if entry == data:
                return True
        return False

    def add(self, copy: NewCopy, message_id: str | None, data: bytes) -> None:
        self._add(copy.internal_date, copy.size, message_id, data)

    def _add(self, when: datetime, size: int, message_id: str | None, content: int | bytes) -> None:
        if message_id is not None:
            self.identified.add((when, size, message_id))
        else:
            self.anonymous.setdefault((when, size), []).append(content)


def _message_id(parsed: dict[str, Any]) -> str | None:
    value: Any = parsed
    for key in _MESSAGE_ID:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


async def _room(conn: AsyncConnection, mailbox_id: int) -> int | None:
    """Bytes the mailbox's account may still store; None without a quota."""
    account = (await conn.execute(
        select(m.Account.id, m.Account.quota_bytes).join(m.Mailbox, m.Mailbox.account_id == m.Account.id)
        .where(m.Mailbox.id == mailbox_id))).one_or_none()
    if account is None:
        raise NotFound(no_mailbox(mailbox_id))
    if account.quota_bytes is None:
        return None
    # SUM of BIGINT is NUMERIC on PostgreSQL: cast back to an integer.
    used = await conn.scalar(
        select(cast(func.coalesce(func.sum(m.Message.size), 0), BigInteger))
        .join(m.Mailbox, m.Mailbox.id == m.Message.mailbox_id).where(m.Mailbox.account_id == account.id))
    return max(account.quota_bytes - int(used or 0), 0)
