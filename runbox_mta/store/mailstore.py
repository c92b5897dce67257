"""What IMAP needs from the store: mailbox snapshots, changes since a MODSEQ,
flag updates, copies and moves, and mailbox management.

`MailStore` is mixed into `Store` (api.py). Every write is a committer job
that takes the mailbox's next MODSEQ first (`writes.next_modseq` row-locks the
mailbox), so MODSEQs stay strictly increasing per mailbox, across daemons.

Cross-session updates are computed from the database, not from events:
`changes_since(mailbox, modseq)` reads the rows whose MODSEQ grew (index
mailbox_id, modseq) and the expunge tombstones, so a session learns what any
session on any daemon changed. The change bus (APPEND, EXPUNGE and FLAGS
events, relayed across daemons on PostgreSQL) tells an idling session when
to look.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sqlalchemy import BigInteger, Row, Select, bindparam, case, cast, delete, func, insert, null, select, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.expression import ColumnElement

from runbox_mta.errors import AlreadyExists, NotFound, RunboxError
from runbox_mta.imap.mime import ENVELOPE_JSON_PATH
from runbox_mta.imap.search_keys import HeaderContains, SearchKey
from runbox_mta.imap.search_text import field_contains, searchable_header
from runbox_mta.store import models as m
from runbox_mta.store import search
from runbox_mta.store.blobs import STRUCTURE_KEY, BlobStore
from runbox_mta.store.changes import ChangeBus, ChangeEvent, ChangeKind
from runbox_mta.store.db import in_chunks, scrub_freed_pages
from runbox_mta.store.flags import SYSTEM_FLAGS, decode_flags, encode_flags
from runbox_mta.store.index import Changes, FlagChange, MailboxIndex
from runbox_mta.store.names import HIERARCHY_DELIMITER, INBOX, normalise_mailbox_name
from runbox_mta.store.recipients import check_quota
from runbox_mta.store.writes import SPECIAL_USES, insert_mailbox, insert_messages, new_copy, next_modseq, parse_message

if TYPE_CHECKING:
    from runbox_mta.store.api import Mailbox
    from runbox_mta.store.committer import Job

T = TypeVar("T")

_SEEN = SYSTEM_FLAGS["\\Seen"]
_DELETED = SYSTEM_FLAGS["\\Deleted"]
# changes_since trusts what it last read of a mailbox this long when nothing was published for it.
HEAD_TRUST = 1.0
MAX_MAILBOX_HEADS = 100_000
PRUNE_SHARED_READS = 1024
# Messages the mailbox indexes in memory hold together (about 100 bytes each), and how
# often one caller reads changes for an index other callers keep bringing further.
INDEXED_MESSAGES = 2_000_000
INDEX_CATCH_UP_TRIES = 3
# SEARCH of a message stored before its searchable header was kept reads this much of it.
UNSTORED_HEADER_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Snapshot:
    """A mailbox as SELECT sees it: its counters and the UIDs, ascending."""

    mailbox_id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: list[int]
    keywords: frozenset[str]


@dataclass(frozen=True)
class MailboxHead:
    """A mailbox's counters as a read found them, with the change-bus generation and the
    monotonic time at which that read began (see changes_since)."""

    highestmodseq: int
    uidnext: int
    generation: int
    read_at: float


@dataclass(frozen=True)
class SharedRead:
    """A changes_since read others may share: the generation and time it began at."""

    generation: int
    read_at: float
    task: asyncio.Future[Changes]


class MessageRow(NamedTuple):  # a tuple: FETCH and SEARCH make thousands a second
    uid: int
    modseq: int
    flags: frozenset[str]
    internal_date: datetime
    size: int
    parsed: dict[str, Any] | None
    data: bytes | None  # only when asked for (see message_rows)
    search_header: str | None = None  # imap.search_text's form, when asked for and stored
    envelope: dict[str, Any] | None = None  # the stored structure's ENVELOPE part, when asked for instead of it


@dataclass(frozen=True)
class FlagUpdate:
    changed: tuple[FlagChange, ...]
    modified: tuple[int, ...]  # UIDs refused by UNCHANGEDSINCE (RFC 7162 §3.1.3)
    unchanged: tuple[FlagChange, ...]  # matched, flags already as asked


@dataclass(frozen=True)
class AppendUids:
    """APPENDUID (RFC 4315 §3) of an APPEND."""

    uidvalidity: int
    uids: tuple[int, ...]  # consecutive, in the order the messages were given


@dataclass(frozen=True)
class Copied:
    uidvalidity: int
    source_uids: tuple[int, ...]
    target_uids: tuple[int, ...]


@dataclass(frozen=True)
class MailboxCounts:
    messages: int
    unseen: int
    deleted: int
    size: int
    deleted_size: int  # octets of the messages flagged \Deleted


class _Nothing(Exception):
    """Rolls a job's savepoint back when it changed nothing (no MODSEQ is spent)."""


class MailStore:
    """The IMAP part of `Store`."""

    if TYPE_CHECKING:
        _engine: AsyncEngine
        _blobs: BlobStore
        _changes: ChangeBus
        _changes_reads: dict[tuple[int, int], SharedRead]
        _mailbox_heads: dict[int, MailboxHead]
        _indexes: OrderedDict[int, MailboxIndex]
        _index_builds: dict[int, asyncio.Future[MailboxIndex]]

        async def get_mailbox(self, account_id: int, name: str) -> Mailbox: ...

        async def _write(self, job: Job[T]) -> T: ...

        async def _read(self, read: Callable[[AsyncConnection], Awaitable[T]], *, snapshot: bool = True) -> T: ...

    # --- reading --------------------------------------------------------------------------

    async def snapshot(self, account_id: int, name: str) -> Snapshot:
        """The mailbox's counters and UIDs as of one MODSEQ (from its index, see index.py)."""
        box = await self.get_mailbox(account_id, name)
        index = await self._index(box.id, box.uidvalidity)
        return Snapshot(box.id, box.name, box.uidvalidity, index.uidnext, index.highestmodseq, list(index.uids),
                        frozenset(index.keywords))

    async def flag_rows(self, mailbox_id: int, uids: Sequence[int], *,
                        changedsince: int | None = None) -> list[FlagChange]:
        """UID, MODSEQ and flags of the messages among `uids` (ascending) that still exist, from
        the mailbox's index: FETCH FLAGS without reading the messages."""
        return (await self._index(mailbox_id)).messages(uids, changedsince)

    async def _index(self, mailbox_id: int, uidvalidity: int | None = None) -> MailboxIndex:
        """The mailbox's index, up to date with what changes_since finds (NotFound once it is gone)."""
        index = self._indexes.get(mailbox_id)
        if index is None or (uidvalidity is not None and index.uidvalidity != uidvalidity):
            index = await self._build_index(mailbox_id)
        else:
            self._indexes.move_to_end(mailbox_id)  # (a build puts its index last)
        for _ in range(INDEX_CATCH_UP_TRIES):
            modseq = index.highestmodseq
            try:
                changes = await self.changes_since(mailbox_id, modseq)
            except NotFound:
                self._indexes.pop(mailbox_id, None)
                raise
            if changes.highestmodseq < modseq:  # not the mailbox indexed (its id was reused): start over
                return await self._build_index(mailbox_id)
            if index.highestmodseq == modseq:  # else another caller brought it further meanwhile: ask again
                index.apply(changes)
                break
        return index

    async def _build_index(self, mailbox_id: int) -> MailboxIndex:
        """Read the whole index of the mailbox, once for all the callers that want it meanwhile."""
        build = self._index_builds.get(mailbox_id)
        if build is None:
            build = self._index_builds[mailbox_id] = asyncio.ensure_future(self._read(
                lambda conn: _read_index(conn, mailbox_id)))
            build.add_done_callback(lambda _: self._index_builds.pop(mailbox_id, None))
        index = await asyncio.shield(build)
        if self._indexes.get(mailbox_id) is not index:
            self._indexes[mailbox_id] = index
            self._evict_indexes()
        return index

    def _evict_indexes(self) -> None:
        """Least recently used first, down to INDEXED_MESSAGES (the newest stays, however large)."""
        total = sum(map(len, self._indexes.values()))
        while total > INDEXED_MESSAGES and len(self._indexes) > 1:
            _, oldest = self._indexes.popitem(last=False)
            total -= len(oldest)

    async def changes_since(self, mailbox_id: int, modseq: int) -> Changes:
        """What changed in the mailbox after `modseq`.

        Reads are shared, as long as this daemon published no change to the mailbox since the
        read began (the read then saw every change the caller can know of) and for at most
        HEAD_TRUST seconds (a change by another process, the CLI or a daemon whose NOTIFY is on
        its way, shows within that):
        - every IMAP command asks, and mostly nothing changed: a caller as far as the last read
          of the mailbox got gets "nothing" without a query;
        - one APPEND wakes every IDLE session on the mailbox: they share one read of it."""
        generation = self._changes.generation(mailbox_id)
        now = time.monotonic()
        head = self._mailbox_heads.get(mailbox_id)
        if (head is not None and head.generation == generation and head.highestmodseq <= modseq
                and now - head.read_at < HEAD_TRUST):
            return Changes(head.highestmodseq, head.uidnext, (), ())
        key = (mailbox_id, modseq)
        shared = self._changes_reads.get(key)
        if shared is None or shared.generation != generation or now - shared.read_at >= HEAD_TRUST:
            if len(self._changes_reads) >= PRUNE_SHARED_READS:
                # Finished reads are only shared for HEAD_TRUST: let the older ones go.
                self._changes_reads = {key: read for key, read in self._changes_reads.items()
                                       if not read.task.done() or now - read.read_at < HEAD_TRUST}
            task = asyncio.ensure_future(self._read_changes(mailbox_id, modseq, generation, now))
            shared = self._changes_reads[key] = SharedRead(generation, now, task)
            task.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(shared.task)  # one caller giving up does not cancel the others' read

    async def _read_changes(self, mailbox_id: int, modseq: int, generation: int, read_at: float) -> Changes:
        changes = await self._read(lambda conn: _changes_since(conn, mailbox_id, modseq))
        if len(self._mailbox_heads) >= MAX_MAILBOX_HEADS:
            self._mailbox_heads.clear()  # full (a few bytes each): start over rather than grow
        self._mailbox_heads[mailbox_id] = MailboxHead(changes.highestmodseq, changes.uidnext, generation, read_at)
        return changes

    def _read_done(self, key: tuple[int, int], done: asyncio.Future[Changes]) -> None:
        """A failed read is not shared any longer (its callers got the error)."""
        if done.cancelled() or done.exception() is not None:  # retrieved here too: every caller may have left
            shared = self._changes_reads.get(key)
            if shared is not None and shared.task is done:
                del self._changes_reads[key]

    async def message_rows(self, mailbox_id: int, uids: Sequence[int], *, data: bool, structure: bool = True,
                           envelope: bool = False, changedsince: int | None = None) -> list[MessageRow]:
        """The messages among `uids` (ascending) that still exist, optionally with their bytes,
        (`structure`) their parsed metadata or (`envelope`) only the ENVELOPE part of its
        structure: decoding that JSON is most of what a FETCH of row items costs."""
        statement = _rows_by_uid(data=data, structure=structure, envelope=envelope)
        parameters = {"mailbox_id": mailbox_id, "changedsince": -1 if changedsince is None else changedsince}

        async def read(conn: AsyncConnection) -> list[MessageRow]:
            rows: list[Row[Any]] = []
            for chunk in in_chunks(uids):
                rows += (await conn.execute(statement, {**parameters, "uids": chunk})).all()
            return [_message_row(row) for row in rows]

        return await self._read(read)

    async def search_uids(self, mailbox_id: int, key: SearchKey, up_to_uid: int, *,
                          modseq: bool = False) -> tuple[list[int], int] | None:
        """The UIDs up to `up_to_uid` of the messages matching `key`, ascending, and (`modseq`)
        their highest MODSEQ, else 0, if the store decides `key`: SQL exactly (flags, sizes,
        internal dates, MODSEQ; see search.py), or SQL and the stored header (header keys,
        also ANDed with those). None if it cannot."""
        statements = _search_statements(key, self._engine.dialect.name)
        if statements is None:
            return None
        parameters = {"mailbox_id": mailbox_id, "up_to_uid": up_to_uid}
        terms, highest_modseq = statements.header_terms, statements.highest_modseq
        if terms is None:
            assert highest_modseq is not None

            async def read(conn: AsyncConnection) -> tuple[list[int], int]:
                highest = await conn.scalar(highest_modseq, parameters) if modseq else 0
                return _uid_list(await conn.scalar(statements.matching, parameters)), highest

            return await self._read(read)

        async def read_headers(conn: AsyncConnection) -> tuple[list[int], int]:
            # Here, in the worker thread: only the UIDs go back, not a row per candidate.
            uids, highest = [], 0
            for uid, row_modseq, header, start in await conn.execute(statements.matching, parameters):
                text = header if header is not None else searchable_header(start or b"")
                if all(field_contains(text, term.field, term.value) for term in terms):
                    uids.append(uid)
                    highest = max(highest, row_modseq)
            return uids, highest if modseq else 0

        return await self._read(read_headers)

    async def search_candidates(self, mailbox_id: int, key: SearchKey, *, after_uid: int, limit: int,
                                data: bool) -> list[MessageRow]:
        """Up to `limit` messages with UIDs above `after_uid`, ascending, that may match `key` (SQL
        leaves out those that cannot), with their searchable header: for a message stored without
        one, the start of its bytes as `data` instead; with all their bytes if `data`."""
        query = _candidates_query(key, data=data)
        parameters = {"mailbox_id": mailbox_id, "after_uid": after_uid, "limit": limit}

        async def read(conn: AsyncConnection) -> list[MessageRow]:
            return [_message_row(row) for row in await conn.execute(query, parameters)]

        return await self._read(read, snapshot=False)

    async def mailbox_counts(self, mailbox_id: int) -> MailboxCounts:
        """STATUS numbers (RFC 9051 §6.3.11) in one aggregate query."""

        async def read(conn: AsyncConnection) -> Row[Any]:
            return (await conn.execute(select(
                func.count(),
                func.coalesce(func.sum(case(((m.Message.system_flags.op("&")(_SEEN)) == 0, 1), else_=0)), 0),
                func.coalesce(func.sum(case(((m.Message.system_flags.op("&")(_DELETED)) != 0, 1), else_=0)), 0),
                cast(func.coalesce(func.sum(m.Message.size), 0), BigInteger),
                cast(func.coalesce(func.sum(case(((m.Message.system_flags.op("&")(_DELETED)) != 0, m.Message.size),
                                                 else_=0)), 0), BigInteger),
            ).where(m.Message.mailbox_id == mailbox_id))).one()

        return MailboxCounts(*(int(value) for value in await self._read(read, snapshot=False)))

    # --- writing --------------------------------------------------------------------------

    async def update_flags(self, mailbox_id: int, uids: Sequence[int], mode: str, flags: Iterable[str],
                           unchangedsince: int | None = None) -> FlagUpdate:
        """STORE: "+" adds, "-" removes, "" replaces; each changed message gets the new MODSEQ."""
        bits, keyword_text = encode_flags(flags)
        keywords = set(keyword_text.split())

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> FlagUpdate:
            box = await next_modseq(conn, mailbox_id, new_uids=0)
            modseq = box.highestmodseq
            changed, modified, unchanged, updates = [], [], [], []
            for chunk in in_chunks(uids):
                rows = (await conn.execute(_FLAGS_OF, {"mailbox_id": mailbox_id, "uids": chunk})).all()
                for row in rows:
                    if unchangedsince is not None and row.modseq > unchangedsince:
                        modified.append(row.uid)
                        continue
                    new_bits, new_keywords = _apply(mode, row.system_flags, set(row.keywords.split()),
                                                    bits, keywords)
                    if new_bits == row.system_flags and new_keywords == row.keywords:
                        unchanged.append(_change(row))
                        continue
                    updates.append({"target_mailbox": mailbox_id, "row_uid": row.uid, "bits": new_bits,
                                    "words": new_keywords, "new_modseq": modseq})
                    changed.append(FlagChange(row.uid, modseq, decode_flags(new_bits, new_keywords)))
            if not updates:
                raise _Nothing(FlagUpdate((), tuple(modified), tuple(unchanged)))
            await conn.execute(_SET_FLAGS, updates)
            events.extend(ChangeEvent(box.account_id, mailbox_id, change.uid, modseq, ChangeKind.FLAGS)
                          for change in changed)
            return FlagUpdate(tuple(changed), tuple(modified), tuple(unchanged))

        try:
            return await self._write(job)
        except _Nothing as nothing:
            return nothing.args[0]  # type: ignore[no-any-return]

    async def append_messages(self, mailbox_id: int,
                              messages: Sequence[tuple[bytes, Iterable[str], datetime | None]]) -> AppendUids:
        """APPEND of (data, flags, internal date)s: all of them or none (MULTIAPPEND, RFC 3502 §3),
        in one transaction, with the quota checked for their total."""
        copies = [new_copy(data, flags, internal_date) for data, flags, internal_date in messages]
        parsed = [await parse_message(data) for data, _, _ in messages]

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> AppendUids:
            await check_quota(conn, [mailbox_id], sum(copy.size for copy in copies))
            uids, uidvalidity = [], 0
            for (data, _, _), copy, metadata in zip(messages, copies, parsed):
                blob_id = await self._blobs.put(conn, data, metadata)
                appended = (await insert_messages(conn, events, blob_id, [mailbox_id], copy))[0]
                uids.append(appended.uid)
                uidvalidity = appended.uidvalidity
            return AppendUids(uidvalidity, tuple(uids))

        return await self._write(job)

    async def copy_messages(self, source_id: int, uids: Sequence[int], target_id: int, *,
                            move: bool) -> Copied:
        """COPY or MOVE (RFC 4315 §3 COPYUID, RFC 6851): new UIDs in the target, in source UID order."""

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> tuple[Copied, bool]:
            copied = await _copy_rows(conn, events, source_id, uids, target_id)
            scrub = False
            if move and copied.source_uids:
                scrub = await self._expunge_rows(conn, events, source_id, copied.source_uids)
            return copied, scrub

        copied, scrub = await self._write(job)
        if scrub:
            await scrub_freed_pages(self._engine)
        return copied

    async def _expunge_rows(self, conn: AsyncConnection, events: list[ChangeEvent], mailbox_id: int,
                            uids: Sequence[int]) -> bool:
        """Delete messages, leave tombstones, release blobs; True if the account is No Backup.
        An EXPUNGE event per message deleted (none if none was there)."""
        box = await next_modseq(conn, mailbox_id, new_uids=0)
        removed: list[Row[Any]] = []
        for chunk in in_chunks(sorted(uids)):
            removed += await conn.execute(_DELETE_MESSAGES, {"mailbox_id": mailbox_id, "uids": chunk})
        if removed:
            await conn.execute(insert(m.Expunged), [
                {"mailbox_id": mailbox_id, "uid": row.uid, "modseq": box.highestmodseq} for row in removed])
            await self._blobs.release(conn, [row.blob_id for row in removed])
            events.extend(ChangeEvent(box.account_id, mailbox_id, row.uid, box.highestmodseq, ChangeKind.EXPUNGE)
                          for row in sorted(removed, key=lambda row: row.uid))
        return bool(await conn.scalar(select(m.Account.no_backup).where(m.Account.id == box.account_id)))

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        """DELETE (RFC 9051 §6.3.4): messages go at once (scrubbed for No Backup accounts)."""
        name = normalise_mailbox_name(name)
        if name == INBOX:
            raise RunboxError("INBOX cannot be deleted")

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> bool:
            box_id = await _mailbox_id(conn, account_id, name)
            if await _has_children(conn, account_id, name):
                raise RunboxError("mailbox has children, delete them first")
            uids = list(await conn.scalars(select(m.Message.uid).where(m.Message.mailbox_id == box_id)))
            scrub = await self._expunge_rows(conn, events, box_id, uids)
            await conn.execute(delete(m.Mailbox).where(m.Mailbox.id == box_id))
            # Also when it was empty: sessions that selected it must look again, and find it gone.
            events.append(ChangeEvent(account_id, box_id, 0, 0, ChangeKind.RESYNC))
            return scrub

        if await self._write(job):
            await scrub_freed_pages(self._engine)

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        """RENAME with its children; renaming INBOX moves its messages and leaves it empty (RFC 9051 §6.3.6)."""
        old, new = normalise_mailbox_name(old), normalise_mailbox_name(new)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            box_id = await _mailbox_id(conn, account_id, old)
            if await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.account_id == account_id,
                                                           m.Mailbox.name == new)) is not None:
                raise AlreadyExists(f"mailbox {new} already exists")
            await _create_parents(conn, account_id, new)
            if old == INBOX:
                target = await insert_mailbox(conn, account_id, new, None)
                uids = list(await conn.scalars(select(m.Message.uid).where(m.Message.mailbox_id == box_id)))
                copied = await _copy_rows(conn, events, box_id, uids, target.id)
                if copied.source_uids:
                    await self._expunge_rows(conn, events, box_id, copied.source_uids)
                return
            children = (await conn.execute(select(m.Mailbox.id, m.Mailbox.name).where(
                m.Mailbox.account_id == account_id,
                m.Mailbox.name.startswith(old + HIERARCHY_DELIMITER, autoescape=True)))).all()
            await conn.execute(update(m.Mailbox).where(m.Mailbox.id == box_id).values(name=new))
            for child in children:
                await conn.execute(update(m.Mailbox).where(m.Mailbox.id == child.id)
                                   .values(name=new + child.name[len(old):]))

        await self._write(job)

    async def create_mailbox_path(self, account_id: int, name: str, special_use: str | None) -> None:
        """CREATE, with any missing superior names (RFC 9051 §6.3.4 SHOULD)."""
        name = normalise_mailbox_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise RunboxError(f"unsupported special-use attribute {special_use}")

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            if await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.account_id == account_id,
                                                           m.Mailbox.name == name)) is not None:
                raise AlreadyExists(f"mailbox {name} already exists")
            await _create_parents(conn, account_id, name)
            await insert_mailbox(conn, account_id, name, special_use)

        await self._write(job)

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        name = normalise_mailbox_name(name)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            result = await conn.execute(update(m.Mailbox).where(
                m.Mailbox.account_id == account_id, m.Mailbox.name == name).values(subscribed=subscribed))
            if result.rowcount == 0:
                raise NotFound(f"no such mailbox: {name}")

        await self._write(job)


def _uids_query(dialect: str, *conditions: ColumnElement[bool]) -> Select[Any]:
    """The UIDs of the messages meeting `conditions`, aggregated in the database: one row
    instead of one per message (see _uid_list)."""
    if dialect == "postgresql":
        return select(func.array_agg(aggregate_order_by(m.Message.uid, m.Message.uid))).where(*conditions)
    ordered = select(m.Message.uid).where(*conditions).order_by(m.Message.uid).subquery()
    return select(func.group_concat(ordered.c.uid))


def _uid_list(aggregated: str | list[int] | None) -> list[int]:
    """_uids_query's answer as a list, ascending."""
    if not aggregated:
        return []
    uids = list(map(int, aggregated.split(","))) if isinstance(aggregated, str) else list(aggregated)
    uids.sort()  # already in order (linear then); SQLite does not promise group_concat's order
    return uids


@dataclass(frozen=True)
class _SearchStatements:
    """How search_uids decides a key (parameters mailbox_id and up_to_uid)."""

    matching: Select[Any]  # the matching UIDs aggregated; or, with header_terms, the candidates' rows
    highest_modseq: Select[Any] | None  # of the matches, when SQL decides the key alone
    header_terms: tuple[HeaderContains, ...] | None  # left to check in each candidate's stored header


@lru_cache(maxsize=512)
def _search_statements(key: SearchKey, dialect: str) -> _SearchStatements | None:
    """search_uids' statements for `key`, built once while the key is searched again (a
    client's periodic searches, the sessions of one user); None if the store cannot decide it."""
    found = search.condition(key)
    if found is None:
        return None
    where = (m.Message.mailbox_id == bindparam("mailbox_id"), m.Message.uid <= bindparam("up_to_uid"),
             found.condition)
    if found.exact:
        highest_modseq = select(func.coalesce(func.max(m.Message.modseq), 0)).where(*where)
        return _SearchStatements(_uids_query(dialect, *where), highest_modseq, None)
    terms = search.header_terms(key)
    if terms is None:
        return None
    candidates = (select(m.Message.uid, m.Message.modseq, m.Blob.search_header, _UNSTORED_HEADER_START)
                  .join(m.Blob, m.Blob.id == m.Message.blob_id).where(*where).order_by(m.Message.uid))
    return _SearchStatements(candidates, None, terms)


def _apply(mode: str, bits: int, words: set[str], add_bits: int, add_words: set[str]) -> tuple[int, str]:
    if mode == "+":
        bits, words = bits | add_bits, words | add_words
    elif mode == "-":
        bits, words = bits & ~add_bits, words - add_words
    else:
        bits, words = add_bits, set(add_words)
    return bits, " ".join(sorted(words))


# Statements built once (building and keying a statement costs more than running it).
# A message's UID, MODSEQ and flags (see _change), in UID order: all of a mailbox's (the
# index), those of some UIDs (update_flags), those changed after a MODSEQ (changes_since).
_FLAG_ROWS = (select(m.Message.uid, m.Message.modseq, m.Message.system_flags, m.Message.keywords)
              .where(m.Message.mailbox_id == bindparam("mailbox_id")).order_by(m.Message.uid))
_FLAGS_OF = _FLAG_ROWS.where(m.Message.uid.in_(bindparam("uids", expanding=True)))
_CHANGED = _FLAG_ROWS.where(m.Message.modseq > bindparam("modseq"))
_SET_FLAGS = (update(m.Message)
              .where(m.Message.mailbox_id == bindparam("target_mailbox"), m.Message.uid == bindparam("row_uid"))
              .values(system_flags=bindparam("bits"), keywords=bindparam("words"), modseq=bindparam("new_modseq")))
_DELETE_MESSAGES = (delete(m.Message)
                    .where(m.Message.mailbox_id == bindparam("mailbox_id"),
                           m.Message.uid.in_(bindparam("uids", expanding=True)))
                    .returning(m.Message.uid, m.Message.blob_id))
_MAILBOX_HEAD = (select(m.Mailbox.uidvalidity, m.Mailbox.highestmodseq, m.Mailbox.uidnext)
                 .where(m.Mailbox.id == bindparam("mailbox_id")))
_EXPUNGED = (select(m.Expunged.uid)
             .where(m.Expunged.mailbox_id == bindparam("mailbox_id"), m.Expunged.modseq > bindparam("modseq"))
             .order_by(m.Expunged.uid))


async def _changes_since(conn: AsyncConnection, mailbox_id: int, modseq: int) -> Changes:
    parameters = {"mailbox_id": mailbox_id, "modseq": modseq}
    box = (await conn.execute(_MAILBOX_HEAD, parameters)).one_or_none()
    if box is None:
        raise NotFound(f"no such mailbox id: {mailbox_id}")
    _, highestmodseq, uidnext = box
    if highestmodseq <= modseq:
        return Changes(highestmodseq, uidnext, (), ())
    changed = tuple(map(_change, await conn.execute(_CHANGED, parameters)))
    expunged = await conn.scalars(_EXPUNGED, parameters)
    return Changes(highestmodseq, uidnext, changed, tuple(expunged))


async def _read_index(conn: AsyncConnection, mailbox_id: int) -> MailboxIndex:
    parameters = {"mailbox_id": mailbox_id}
    box = (await conn.execute(_MAILBOX_HEAD, parameters)).one_or_none()
    if box is None:
        raise NotFound(f"no such mailbox id: {mailbox_id}")
    rows = await conn.execute(_FLAG_ROWS, parameters)
    return MailboxIndex(mailbox_id, box.uidvalidity, box.highestmodseq, box.uidnext, map(_change, rows))


def _change(row: Row[Any]) -> FlagChange:
    uid, modseq, bits, keywords = row  # unpacked: faster than a Row's attributes
    return FlagChange(uid, modseq, decode_flags(bits, keywords))


@lru_cache(maxsize=None)
def _rows_by_uid(*, data: bool, structure: bool, envelope: bool) -> Select[Any]:
    """message_rows' statement, built once: parameters mailbox_id, uids (a list) and changedsince."""
    return _row_query(data=data, structure=structure, header=False, envelope=envelope).where(
        m.Message.mailbox_id == bindparam("mailbox_id"), m.Message.uid.in_(bindparam("uids", expanding=True)),
        m.Message.modseq > bindparam("changedsince"))


@lru_cache(maxsize=256)
def _candidates_query(key: SearchKey, *, data: bool) -> Select[Any]:
    """search_candidates' statement for `key`, built once while the key is searched again (a
    client's periodic searches, several sessions of one user): parameters mailbox_id, after_uid
    and limit."""
    query = (_row_query(data=data, structure=False, header=True)
             .where(m.Message.mailbox_id == bindparam("mailbox_id"), m.Message.uid > bindparam("after_uid"))
             .limit(bindparam("limit")))
    found = search.condition(key)
    return query if found is None else query.where(found.condition)


# The start of a blob's bytes (where the header is), only if it has no searchable header stored.
_UNSTORED_HEADER_START = case((m.Blob.search_header.is_(None), func.substr(m.Blob.data, 1, UNSTORED_HEADER_LIMIT)),
                              else_=null()).label("data")


def _row_query(*, data: bool, structure: bool, header: bool, envelope: bool = False) -> Select[Any]:
    """Messages joined to their blobs, in UID order, with the columns of a MessageRow."""
    columns = [m.Message.uid, m.Message.modseq, m.Message.system_flags, m.Message.keywords,
               m.Message.internal_date, m.Message.internal_date_offset, m.Message.size,
               m.Blob.parsed if structure else null().label("parsed")]
    if data:
        columns.append(m.Blob.data)
    elif header:
        columns.append(_UNSTORED_HEADER_START)
    else:
        columns.append(null().label("data"))
    columns.append(m.Blob.search_header if header else null().label("search_header"))
    # The database takes the ENVELOPE out of the structure's JSON: a tenth of it to decode.
    columns.append(m.Blob.parsed[(STRUCTURE_KEY, *ENVELOPE_JSON_PATH)].label("envelope") if envelope
                   else null().label("envelope"))
    query = select(*columns)
    if data or structure or header or envelope:  # FLAGS, UID, MODSEQ ... come from messages alone
        query = query.join(m.Blob, m.Blob.id == m.Message.blob_id)
    return query.order_by(m.Message.uid)


def _message_row(row: Row[Any]) -> MessageRow:
    # Unpacked: a Row's attributes cost a lookup each, and FETCH and SEARCH make thousands of these.
    uid, modseq, bits, keywords, internal_date, offset, size, parsed, data, search_header, envelope = row
    return MessageRow(uid, modseq, decode_flags(bits, keywords), internal_date.astimezone(_zone(offset)),
                      size, parsed, data, search_header, envelope)


@lru_cache(maxsize=256)
def _zone(minutes: int) -> timezone:
    return timezone(timedelta(minutes=minutes))


async def _copy_rows(conn: AsyncConnection, events: list[ChangeEvent], source_id: int, uids: Sequence[int],
                     target_id: int) -> Copied:
    rows: list[Row[Any]] = []
    for chunk in in_chunks(sorted(uids)):
        rows += (await conn.execute(
            select(m.Message.uid, m.Message.blob_id, m.Message.system_flags, m.Message.keywords,
                   m.Message.internal_date, m.Message.internal_date_offset, m.Message.size)
            .where(m.Message.mailbox_id == source_id, m.Message.uid.in_(chunk)).order_by(m.Message.uid))).all()
    if not rows:
        target = (await conn.execute(select(m.Mailbox.uidvalidity).where(m.Mailbox.id == target_id))).one()
        return Copied(target.uidvalidity, (), ())
    await check_quota(conn, [target_id], sum(row.size for row in rows))
    box = await next_modseq(conn, target_id, new_uids=len(rows))
    first = box.uidnext - len(rows)
    await conn.execute(insert(m.Message), [
        {"mailbox_id": target_id, "uid": first + index, "modseq": box.highestmodseq, "blob_id": row.blob_id,
         "system_flags": row.system_flags, "keywords": row.keywords, "internal_date": row.internal_date,
         "internal_date_offset": row.internal_date_offset, "size": row.size}
        for index, row in enumerate(rows)])
    target_uids = tuple(range(first, box.uidnext))
    events.extend(ChangeEvent(box.account_id, target_id, uid, box.highestmodseq, ChangeKind.APPEND)
                  for uid in target_uids)
    return Copied(box.uidvalidity, tuple(row.uid for row in rows), target_uids)


async def _mailbox_id(conn: AsyncConnection, account_id: int, name: str) -> int:
    box_id = await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.account_id == account_id,
                                                          m.Mailbox.name == name))
    if box_id is None:
        raise NotFound(f"no such mailbox: {name}")
    return box_id


async def _has_children(conn: AsyncConnection, account_id: int, name: str) -> bool:
    child = select(m.Mailbox.id).where(m.Mailbox.account_id == account_id,
                                       m.Mailbox.name.startswith(name + HIERARCHY_DELIMITER, autoescape=True))
    return await conn.scalar(child.limit(1)) is not None


async def _create_parents(conn: AsyncConnection, account_id: int, name: str) -> None:
    parts = name.split(HIERARCHY_DELIMITER)
    for depth in range(1, len(parts)):
        parent = HIERARCHY_DELIMITER.join(parts[:depth])
        if await conn.scalar(select(m.Mailbox.id).where(m.Mailbox.account_id == account_id,
                                                        m.Mailbox.name == parent)) is None:
            await insert_mailbox(conn, account_id, parent, None)
