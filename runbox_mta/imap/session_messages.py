"""Selected-state commands (RFC 9051 §6.4) and the untagged updates about others' changes.

A mixin of `Session`. The selected mailbox is a `MailboxView`: UIDs in
message-number order plus a MODSEQ watermark. `sync` reads what changed in
the store since the watermark (any session, any daemon) and tells the
client: `* n EXISTS` for new messages, `* n FETCH (FLAGS ...)` for flag
changes, `* n EXPUNGE` for removals. RFC 9051 §7.5.1: no EXPUNGE while
answering FETCH, STORE or SEARCH (their UID forms excepted), because the
client could not know which message numbers its command meant; those
removals wait in `pending_expunges` for the next command that may send them.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runbox_mta.errors import NotFound, RunboxError
from runbox_mta.imap import commands as c
from runbox_mta.imap.dates import format_date_time
from runbox_mta.imap.fetch import (
    UnknownCte, needs_data, needs_structure, render_envelope_fields, render_fetch_item, sets_seen,
)
from runbox_mta.imap.mime import Envelope, MessageStructure, parse_structure
from runbox_mta.imap.responses import flag_list, status, untagged
from runbox_mta.imap.search import Candidate, Scope, matches, needs_body, uses_modseq
from runbox_mta.imap.search_keys import HasFlag
from runbox_mta.imap.sequence import format_uid_set
from runbox_mta.imap.session_state import Authenticated, MailboxGone, MailboxView, Refused, Selected
from runbox_mta.store.blobs import STRUCTURE_KEY
from runbox_mta.store.index import FlagChange
from runbox_mta.store.mailstore import MessageRow

if TYPE_CHECKING:
    from runbox_mta.imap.session import Session

    _Base = Session
else:
    _Base = object

# FETCH reads this many messages per query: bounded memory for BODY[] of a
# large mailbox, few round trips for FLAGS of a large one.
FETCH_BATCH_WITH_DATA = 20
FETCH_BATCH = 1000
# Structure parsing of a big message stalls other connections: it runs in a thread.
INLINE_PARSE_LIMIT = 64 * 1024
# SEARCH parses message text in Python, about a millisecond a message: more than this
# many (or bytes past INLINE_PARSE_LIMIT) are scanned in a thread, not on the event loop.
# Header keys match the stored searchable header instead, in microseconds.
INLINE_SCAN_MESSAGES = 4
# Rendering FETCH items of a big message (copies, NUL scans, BINARY decoding) runs in a thread too.
INLINE_RENDER_LIMIT = 1024 * 1024
# A FETCH response at least this large goes out in slices of it, each drained before the next.
STREAM_CHUNK = 64 * 1024
_ITEMS_FROM_ROW = frozenset({c.FetchItem.FLAGS, c.FetchItem.UID, c.FetchItem.INTERNALDATE, c.FetchItem.MODSEQ,
                             c.FetchItem.RFC822_SIZE})
# What the mailbox's index in memory (store/index.py) answers without reading the messages.
_ITEMS_FROM_INDEX = frozenset({c.FetchItem.FLAGS, c.FetchItem.UID, c.FetchItem.MODSEQ})


class MessageCommands(_Base):
    def _view(self) -> MailboxView:
        assert isinstance(self.state, Selected)
        return self.state.view

    def _writable(self) -> MailboxView:
        view = self._view()
        if view.readonly:
            raise Refused("Mailbox is read-only.", "READ-ONLY")  # RFC 9051 §6.3.3
        return view

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    # --- untagged updates ----------------------------------------------------------------------

    async def sync(self, *, expunges: bool, uid: bool = False) -> None:
        """Tell the client what changed since the watermark (RFC 9051 §7.4.1, §7.5).

        Flag changes go out as FETCH at any time (RFC 9051 §7.5.1 allows it),
        with UID during a UID command, and UID and MODSEQ once CONDSTORE is
        on (RFC 7162 §3.1); the session's own changes were reported already.
        """
        view = self._view()
        try:
            changes = await self.services.store.changes_since(view.mailbox_id, view.highestmodseq)
        except NotFound:
            raise MailboxGone from None
        view.highestmodseq = changes.highestmodseq
        view.pending_expunges.update(uid for uid in changes.expunged if view.number(uid) is not None)
        new = [change for change in changes.changed if not view.uids or change.uid > view.uids[-1]]
        for change in changes.changed:
            if change in new or (change.uid, change.modseq) in view.own_changes:
                continue
            number = view.number(change.uid)
            if number is not None and change.uid not in view.pending_expunges:
                self._write_fetch_flags(number, change, uid=uid)
        view.own_changes.clear()
        if expunges and view.pending_expunges:
            self._announce_expunges(view)
        if new:
            view.uids.extend(change.uid for change in new)
            self.out.write(untagged(f"{len(view.uids)} EXISTS"))
            self._announce_keywords(view, new)

    async def resync(self, view: MailboxView, params: c.QresyncParams) -> None:
        """SELECT (QRESYNC ...): what vanished and what changed since the client's MODSEQ (RFC 7162 §3.2.5.2)."""
        changes = await self.services.store.changes_since(view.mailbox_id, params.modseq)
        largest = view.uids[-1] if view.uids else 0
        vanished = [uid for uid in changes.expunged if view.number(uid) is None
                    and (params.known_uids is None or params.known_uids.contains(uid, largest))]
        if vanished:
            self.out.write(untagged(f"VANISHED (EARLIER) {format_uid_set(vanished)}"))
        for change in changes.changed:
            number = view.number(change.uid)
            if number is not None and change.modseq <= view.highestmodseq:
                self._write_fetch_flags(number, change, uid=True)

    def _announce_expunges(self, view: MailboxView) -> None:
        view.saved -= view.pending_expunges
        if self.qresync:  # RFC 7162 §3.2.10: VANISHED replaces EXPUNGE once QRESYNC is enabled
            gone = [uid for uid in view.pending_expunges if view.number(uid) is not None]
            if gone:
                self.out.write(untagged(f"VANISHED {format_uid_set(gone)}"))
                view.uids = [uid for uid in view.uids if uid not in view.pending_expunges]
            view.pending_expunges.clear()
            return
        # Highest number first: each EXPUNGE renumbers only the messages after it.
        for uid in sorted(view.pending_expunges, reverse=True):
            index = bisect_left(view.uids, uid)
            if index < len(view.uids) and view.uids[index] == uid:
                del view.uids[index]
                self.out.write(untagged(f"{index + 1} EXPUNGE"))
        view.pending_expunges.clear()

    def _announce_keywords(self, view: MailboxView, changes: Sequence[FlagChange]) -> None:
        fresh = {flag for change in changes for flag in change.flags if not flag.startswith("\\")} - view.keywords
        if fresh:
            view.keywords |= fresh
            self._write_flags(view)  # RFC 9051 §7.3.5: FLAGS when the set of keywords grows

    def _write_fetch_flags(self, number: int, change: FlagChange, *, uid: bool, flags: bool = True) -> None:
        items = [f"FLAGS {flag_list(change.flags)}"] if flags else []
        if uid or self.condstore:
            items.append(f"UID {change.uid}")
        if self.condstore:
            items.append(f"MODSEQ ({change.modseq})")  # RFC 7162 §3.1.4.1
        self.out.write(untagged(f"{number} FETCH ({' '.join(items)})"))

    # --- CLOSE, UNSELECT, EXPUNGE (RFC 9051 §6.4.1, §6.4.2, §6.4.3, RFC 4315 §2.1) -------------

    async def _close(self, command: c.Close) -> None:
        view = self._view()
        if not view.readonly:  # RFC 9051 §6.4.1: silently expunge \Deleted messages
            await self.services.store.expunge(view.mailbox_id, await self._deleted_uids(view, view.uids))
        self._deselect()
        await self.done(command.tag, "CLOSE completed.")

    async def _unselect(self, command: c.Unselect) -> None:
        self._deselect()
        await self.done(command.tag, "UNSELECT completed.")

    def _deselect(self) -> None:
        state = self.state
        assert isinstance(state, Selected)
        self.state = Authenticated(state.account_id, state.address)

    async def _expunge(self, command: c.Expunge) -> None:
        view = self._writable()
        uids = view.uids if command.uid_set is None else view.select(command.uid_set, uid=True)
        await self.services.store.expunge(view.mailbox_id, await self._deleted_uids(view, uids))
        await self.done(command.tag, "EXPUNGE completed.", uid=command.uid_set is not None)  # sync announces them

    async def _deleted_uids(self, view: MailboxView, uids: Sequence[int]) -> list[int]:
        if not uids:
            return []
        deleted = await self.services.store.search_uids(view.mailbox_id, HasFlag("\\Deleted"), up_to_uid=max(uids))
        assert deleted is not None  # a system flag is decided by SQL
        wanted = set(uids)
        return [uid for uid in deleted[0] if uid in wanted]

    # --- FETCH (RFC 9051 §6.4.5, RFC 3516, RFC 7162 §3.1.4) ------------------------------------

    async def _fetch(self, command: c.Fetch) -> None:
        view = self._view()
        uids = view.select(command.sequence_set, command.uid)
        attributes = list(command.attributes)
        if command.uid and c.FetchItem.UID not in attributes:
            attributes.insert(0, c.FetchItem.UID)  # RFC 9051 §6.4.9: UID FETCH always includes UID
        if command.changedsince is not None and c.FetchItem.MODSEQ not in attributes:
            attributes.append(c.FetchItem.MODSEQ)  # RFC 7162 §3.1.4.1: CHANGEDSINCE implies MODSEQ
        if command.changedsince is not None or c.FetchItem.MODSEQ in attributes:
            self.enabled.add("CONDSTORE")  # RFC 7162 §3.1: a CONDSTORE-enabling command
        if command.vanished:
            await self._vanished_since(view, command)
        seen_now: set[int] = set()
        if not view.readonly and any(sets_seen(attribute) for attribute in attributes):
            seen_now = await self._mark_seen(view, uids)
        if all(attribute in _ITEMS_FROM_INDEX for attribute in attributes):
            await self._fetch_from_index(view, uids, attributes, command.changedsince)
            await self.done(command.tag, "FETCH completed.", expunges=command.uid, uid=command.uid)
            return
        with_data = any(needs_data(attribute) for attribute in attributes if attribute not in _ITEMS_FROM_ROW)
        # FLAGS, UID, MODSEQ ... come from the row, BODY[] is the bytes: the stored structure
        # would only be decoded for nothing; for ENVELOPE alone, only its part of it is.
        needed = {attribute for attribute in attributes
                  if attribute not in _ITEMS_FROM_ROW and needs_structure(attribute)}
        envelope = needed == {c.FetchItem.ENVELOPE}
        batch = FETCH_BATCH_WITH_DATA if with_data else FETCH_BATCH
        try:
            for start in range(0, len(uids), batch):
                if start:
                    await self.out.flush()  # as in _fetch_from_index; the last goes out with the OK
                rows = await self.services.store.message_rows(
                    view.mailbox_id, uids[start:start + batch], data=with_data, structure=bool(needed) and not envelope,
                    envelope=envelope, changedsince=command.changedsince)
                for row in rows:
                    await self._write_fetch(view, row, attributes, row.uid in seen_now)
        except UnknownCte:
            raise Refused("Unknown Content-Transfer-Encoding.", "UNKNOWN-CTE") from None  # RFC 3516 §4.2
        await self.done(command.tag, "FETCH completed.", expunges=command.uid, uid=command.uid)

    async def _fetch_from_index(self, view: MailboxView, uids: list[int], attributes: list[c.FetchAttribute],
                                changedsince: int | None) -> None:
        for start in range(0, len(uids), FETCH_BATCH):
            if start:
                await self.out.flush()  # the batch before goes out first: bounded memory for a slow client
            rows = await self.services.store.flag_rows(view.mailbox_id, uids[start:start + FETCH_BATCH],
                                                       changedsince=changedsince)
            for row in rows:
                number = view.number(row.uid)
                if number is not None:
                    items = b" ".join(_row_item(row, attribute) for attribute in attributes)
                    self.out.write(b"* %d FETCH (%s)\r\n" % (number, items))

    async def _vanished_since(self, view: MailboxView, command: c.Fetch) -> None:
        """UID FETCH ... (CHANGEDSINCE m VANISHED): expunged UIDs of the set first (RFC 7162 §3.2.6)."""
        if not self.qresync:
            raise Refused("ENABLE QRESYNC first.", status="BAD")  # RFC 7162 §3.2.6 MUST
        assert command.changedsince is not None  # the parser requires it with VANISHED
        changes = await self.services.store.changes_since(view.mailbox_id, command.changedsince)
        largest = view.uids[-1] if view.uids else 0
        gone = [uid for uid in changes.expunged if command.sequence_set.contains(uid, largest)]
        if gone:
            self.out.write(untagged(f"VANISHED (EARLIER) {format_uid_set(gone)}"))

    async def _mark_seen(self, view: MailboxView, uids: list[int]) -> set[int]:
        update = await self.services.store.update_flags(view.mailbox_id, uids, "+", ["\\Seen"])
        view.own_changes.update((change.uid, change.modseq) for change in update.changed)
        return {change.uid for change in update.changed}

    async def _write_fetch(self, view: MailboxView, row: MessageRow, attributes: list[c.FetchAttribute],
                           seen_now: bool) -> None:
        number = view.number(row.uid)
        if number is None:
            return
        structure = None
        if row.envelope is None and any(
                needs_structure(attribute) for attribute in attributes if attribute not in _ITEMS_FROM_ROW):
            structure = await self._structure(view, row)
        if row.data is not None and len(row.data) > INLINE_RENDER_LIMIT:
            items = await asyncio.to_thread(_render_items, row, structure, attributes)
        else:
            items = _render_items(row, structure, attributes)
        if seen_now and c.FetchItem.FLAGS not in attributes:
            items.append(_row_item(row, c.FetchItem.FLAGS))  # RFC 9051 §6.4.5: report the implicit \Seen
        head = b"* %d FETCH (" % number
        if sum(map(len, items)) < STREAM_CHUNK:
            self.out.write(head + b" ".join(items) + b")\r\n")
            return
        pieces = [head]
        for index, item in enumerate(items):
            pieces += [b" ", item] if index else [item]
        await self._stream([*pieces, b")\r\n"])

    async def _stream(self, pieces: list[bytes]) -> None:
        """Write `pieces` in STREAM_CHUNK slices, draining after each: a slow client holds back
        the server's writes instead of making it buffer a whole message (as POP3 RETR does)."""
        chunk = bytearray()
        for piece in pieces:
            view = memoryview(piece)
            while view:
                room = STREAM_CHUNK - len(chunk)
                chunk += view[:room]
                view = view[room:]
                if len(chunk) == STREAM_CHUNK:
                    self.out.write(bytes(chunk))
                    chunk.clear()
                    await self.out.flush()
        if chunk:
            self.out.write(bytes(chunk))

    async def _structure(self, view: MailboxView, row: MessageRow) -> MessageStructure:
        stored = (row.parsed or {}).get(STRUCTURE_KEY)
        if stored is not None:
            return MessageStructure.from_json(stored)
        # Stored before structures were kept: parse the bytes now.
        data = row.data if row.data is not None else await self.services.store.read_message(view.mailbox_id, row.uid)
        if len(data) > INLINE_PARSE_LIMIT:
            return await asyncio.to_thread(parse_structure, data)
        return parse_structure(data)

    # --- STORE (RFC 9051 §6.4.6, RFC 7162 §3.1.3) ----------------------------------------------

    async def _store(self, command: c.Store) -> None:
        view = self._writable()
        uids = view.select(command.sequence_set, command.uid)
        if command.unchangedsince is not None:
            self.enabled.add("CONDSTORE")
        try:
            update = await self.services.store.update_flags(
                view.mailbox_id, uids, command.mode, command.flags, command.unchangedsince)
        except ValueError:
            raise Refused("Invalid flag.", status="BAD") from None
        view.own_changes.update((change.uid, change.modseq) for change in update.changed)
        self._announce_keywords(view, update.changed)
        # .SILENT: no FLAGS for our own change (RFC 9051 §6.4.6), but with CONDSTORE the new
        # MODSEQ of each changed message (RFC 7162 §3.1.3); otherwise every matched message.
        if command.silent:
            reported = update.changed if self.condstore else ()
        else:
            reported = tuple(sorted((*update.changed, *update.unchanged), key=lambda change: change.uid))
        for change in reported:
            number = view.number(change.uid)
            if number is not None:
                self._write_fetch_flags(number, change, uid=command.uid, flags=not command.silent)
        code = None
        if update.modified:
            numbers = update.modified if command.uid else [view.number(uid) or 0 for uid in update.modified]
            code = f"MODIFIED {format_uid_set(numbers)}"  # RFC 7162 §3.1.3
        await self.done(command.tag, "STORE completed.", code, expunges=command.uid, uid=command.uid)

    # --- SEARCH (RFC 9051 §6.4.4, RFC 4731 ESEARCH) --------------------------------------------

    async def _search(self, command: c.Search) -> None:
        view = self._view()
        options = command.return_options
        if options is not None and "SAVE" in options:
            view.saved = set()  # RFC 5182 §2.1: a failed SEARCH leaves "$" empty
        found, modseq = await self._matching(view, command)
        if options is not None and "SAVE" in options:
            view.saved = _saved_uids(view, command, found, options)
            options = tuple(option for option in options if option != "SAVE")
            if not options:  # RFC 5182 §2.4: SAVE alone returns no ESEARCH
                await self.done(command.tag, "SEARCH completed, result saved.", expunges=command.uid,
                                uid=command.uid)
                return
        if options is None and not self.rev2:
            # RFC 7162 §3.1.5: a search by MODSEQ reports the highest MODSEQ of the matches.
            suffix = [f"(MODSEQ {modseq})"] if modseq and found else []
            self.out.write(untagged(" ".join(["SEARCH", *map(str, found), *suffix])))
        else:
            self.out.write(untagged(_esearch(command, found, options or ("ALL",), modseq)))
        await self.done(command.tag, "SEARCH completed.", expunges=command.uid, uid=command.uid)

    async def _matching(self, view: MailboxView, command: c.Search) -> tuple[list[int], int | None]:
        """The matching numbers (UIDs for UID SEARCH), and their highest MODSEQ when the key names MODSEQ.
        Messages the view does not have yet (not announced) or no more (expunged) never match."""
        store = self.services.store
        found: list[int] = []
        modseq = 0
        # Up to the view's last UID: every message stored up to it is in the view (UIDs are
        # committed in order), and those after it are not announced yet.
        with_modseq = uses_modseq(command.key)
        exact = await store.search_uids(view.mailbox_id, command.key, up_to_uid=view.uids[-1] if view.uids else 0,
                                        modseq=with_modseq)
        if exact is not None:  # the store decided it: flags, sizes, internal dates, MODSEQ, header words
            uids, modseq = exact
            return (uids if command.uid else view.numbers(uids)), modseq if with_modseq else None
        with_body = needs_body(command.key)
        scope = Scope(len(view.uids), view.uids[-1] if view.uids else 0, frozenset(view.saved))
        after = 0
        while rows := await store.search_candidates(view.mailbox_id, command.key, after_uid=after, data=with_body,
                                                    limit=FETCH_BATCH_WITH_DATA if with_body else FETCH_BATCH):
            after = rows[-1].uid
            candidates = [Candidate(number, row) for row in rows if (number := view.number(row.uid)) is not None]
            # Rows with data are parsed: their body is searched, or their header was not stored.
            parsed = [row for row in rows if row.data is not None]
            if len(parsed) > INLINE_SCAN_MESSAGES or sum(len(row.data or b"") for row in parsed) > INLINE_PARSE_LIMIT:
                matched = await asyncio.to_thread(_matching_candidates, command.key, candidates, scope)
            else:
                matched = _matching_candidates(command.key, candidates, scope)
            for candidate in matched:
                found.append(candidate.row.uid if command.uid else candidate.number)
                modseq = max(modseq, candidate.row.modseq)
        return found, modseq if with_modseq else None

    # --- COPY, MOVE (RFC 9051 §6.4.7, §6.4.8, RFC 4315 §3, RFC 6851) ---------------------------

    async def _copy(self, command: c.Copy | c.Move) -> None:
        move = isinstance(command, c.Move)
        view = self._writable() if move else self._view()
        uids = view.select(command.sequence_set, command.uid)
        try:
            target = await self.services.store.get_mailbox(self._account().account_id, command.mailbox)
        except RunboxError:  # NotFound, or a name the store would never hold
            raise Refused("Mailbox does not exist.", "TRYCREATE") from None  # RFC 9051 §6.4.7 MUST
        copied = await self.services.store.copy_messages(view.mailbox_id, uids, target.id, move=move)
        code = None
        if copied.source_uids:
            code = (f"COPYUID {copied.uidvalidity} {format_uid_set(copied.source_uids)} "
                    f"{format_uid_set(copied.target_uids)}")
        if move:
            if code:
                self.out.write(status("OK", "Moved.", code))  # RFC 6851 §4.3: before the EXPUNGEs
            await self.done(command.tag, "MOVE completed.", uid=command.uid)
        else:
            await self.done(command.tag, "COPY completed.", code, uid=command.uid)


def _matching_candidates(key: c.SearchKey, candidates: list[Candidate], scope: Scope) -> list[Candidate]:
    return [candidate for candidate in candidates if matches(key, candidate, scope)]


def _render_items(row: MessageRow, structure: MessageStructure | None,
                  attributes: list[c.FetchAttribute]) -> list[bytes]:
    items: list[bytes] = []
    for attribute in attributes:
        if attribute in _ITEMS_FROM_ROW:
            items.append(_row_item(row, attribute))
        elif attribute is c.FetchItem.ENVELOPE and structure is None:
            assert row.envelope is not None  # asked for instead of the structure
            items.append(b"ENVELOPE " + render_envelope_fields(Envelope.from_json(row.envelope)))
        else:
            items.append(render_fetch_item(row.data, structure, attribute))
    return items


def _row_item(row: MessageRow | FlagChange, item: c.FetchAttribute) -> bytes:
    """FLAGS, UID and MODSEQ of either; INTERNALDATE and RFC822.SIZE of a MessageRow."""
    if item is c.FetchItem.FLAGS:
        return f"FLAGS {flag_list(row.flags)}".encode()
    if item is c.FetchItem.UID:
        return b"UID %d" % row.uid
    if item is c.FetchItem.MODSEQ:
        return b"MODSEQ (%d)" % row.modseq
    assert isinstance(row, MessageRow)
    if item is c.FetchItem.INTERNALDATE:
        return f'INTERNALDATE "{format_date_time(row.internal_date)}"'.encode()
    return b"RFC822.SIZE %d" % row.size


def _saved_uids(view: MailboxView, command: c.Search, found: list[int], options: tuple[str, ...]) -> set[int]:
    """RFC 5182 §2.4: SAVE keeps all matches, or only MIN and/or MAX when those are the only other options."""
    if found and not {"ALL", "COUNT"} & set(options) and {"MIN", "MAX"} & set(options):
        found = [value for value, wanted in ((min(found), "MIN" in options), (max(found), "MAX" in options))
                 if wanted]
    return set(found) if command.uid else {view.uids[number - 1] for number in found}


def _esearch(command: c.Search, found: list[int], options: tuple[str, ...], modseq: int | None = None) -> str:
    """RFC 4731 §3.1 / RFC 9051 §7.3.4: ESEARCH (TAG "t") [UID] MIN MAX COUNT ALL."""
    parts = [f'ESEARCH (TAG "{command.tag}")']
    if command.uid:
        parts.append("UID")
    if found and "MIN" in options:
        parts.append(f"MIN {min(found)}")
    if found and "MAX" in options:
        parts.append(f"MAX {max(found)}")
    if "COUNT" in options:
        parts.append(f"COUNT {len(found)}")
    if found and "ALL" in options:
        parts.append(f"ALL {format_uid_set(found)}")
    if found and modseq:
        parts.append(f"MODSEQ {modseq}")  # RFC 7162 §3.1.5
    return " ".join(parts)
