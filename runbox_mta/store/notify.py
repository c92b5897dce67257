"""Change events across daemons sharing PostgreSQL: LISTEN/NOTIFY.

Sending: the committer hands each batch's events to `notify` inside the
batch's transaction, so PostgreSQL delivers the notifications exactly when
(and only if) the transaction commits. A payload is text under PostgreSQL's
8000-byte limit: `<origin> <entry> <entry> ...`, one entry per event,
`<kind><account>.<mailbox>.<uid>.<modseq>`; a mailbox with more than
MAX_ITEMISED events in one batch (STORE 1:* on a big mailbox) gets one
RESYNC entry instead, and entries that do not fit one payload go into the next.

Receiving: `ChangeRelay.run` (a daemon background service) keeps one
dedicated asyncpg connection LISTENing and publishes other daemons' events
on the local change bus; events carrying this daemon's origin were
published locally already. After every (re)connect it publishes a RESYNC
for each mailbox someone here listens to, since notifications sent while
it was away are lost for good. A dead connection is noticed at once when the
server closes it, or by a periodic ping when the network silently drops it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterator, Sequence

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.store import models as m
from runbox_mta.store.changes import ChangeBus, ChangeEvent, ChangeKind
from runbox_mta.store.db import connect, in_chunks

log = logging.getLogger(__name__)

CHANNEL = "runbox_changes"
# PostgreSQL refuses a payload of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7999
# Beyond this many events for one mailbox in one batch, one RESYNC entry says
# "re-read it": subscribers read the state from the database anyway.
MAX_ITEMISED = 100
# The listening connection: reconnect after this long, doubling up to the max.
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 30.0
# A silently dropped connection (no FIN, no RST) is found by a ping this often.
PING_INTERVAL = 30.0
PING_TIMEOUT = 10.0
# Shown in pg_stat_activity, so an operator (or a test) can find the connection.
APPLICATION_NAME = "runbox-mta change relay"

_KIND_LETTERS = {ChangeKind.APPEND: "a", ChangeKind.EXPUNGE: "e", ChangeKind.FLAGS: "f", ChangeKind.RESYNC: "r"}
_LETTER_KINDS = {letter: kind for kind, letter in _KIND_LETTERS.items()}


def new_origin() -> str:
    """An id for one store instance (one daemon): its own notifications come back to it too."""
    return secrets.token_hex(8)


def encode(origin: str, events: Sequence[ChangeEvent]) -> list[str]:
    """NOTIFY payloads for `events`, each under MAX_PAYLOAD_BYTES."""
    by_mailbox: defaultdict[int, list[ChangeEvent]] = defaultdict(list)
    for event in events:
        by_mailbox[event.mailbox_id].append(event)
    entries: list[str] = []
    for mailbox_events in by_mailbox.values():
        if len(mailbox_events) > MAX_ITEMISED:
            last = mailbox_events[-1]
            mailbox_events = [ChangeEvent(last.account_id, last.mailbox_id, 0,
                                          max(event.modseq for event in mailbox_events), ChangeKind.RESYNC)]
        entries += (f"{_KIND_LETTERS[event.kind]}{event.account_id}.{event.mailbox_id}.{event.uid}.{event.modseq}"
                    for event in mailbox_events)
    return list(_pack(origin, entries))


def _pack(origin: str, entries: list[str]) -> Iterator[str]:
    payload = origin
    for entry in entries:
        if len(payload) + 1 + len(entry) > MAX_PAYLOAD_BYTES:  # ASCII: characters are bytes
            yield payload
            payload = origin
        payload += " " + entry
    if payload != origin:
        yield payload


def decode(payload: str) -> tuple[str, list[ChangeEvent]]:
    """(origin, events) of a payload; ValueError if it is not one `encode` makes."""
    origin, *entries = payload.split(" ")
    events = []
    for entry in entries:
        account_id, mailbox_id, uid, modseq = (int(number) for number in entry[1:].split("."))
        events.append(ChangeEvent(account_id, mailbox_id, uid, modseq, _LETTER_KINDS[entry[:1]]))
    return origin, events


async def notify(conn: AsyncConnection, origin: str, events: Sequence[ChangeEvent]) -> None:
    """Queue NOTIFYs for `events` in the caller's transaction: sent on COMMIT, dropped on rollback."""
    payloads = encode(origin, events)
    if payloads:
        await conn.execute(text("SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) "
                                "AS payload"), {"channel": CHANNEL, "payloads": payloads})


class ChangeRelay:
    """Publishes other daemons' committed changes on this daemon's bus (PostgreSQL only)."""

    def __init__(self, engine: AsyncEngine, bus: ChangeBus, origin: str) -> None:
        self._engine = engine
        self._bus = bus
        self._origin = origin

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with back-off whenever the connection is lost."""
        delay = RECONNECT_FIRST_DELAY
        while True:
            # Any failure is retried: a relay that stopped would silently end cross-daemon pushes.
            try:
                conn = await self._listen()
            except Exception as error:
                log.warning("change relay: cannot listen, retrying in %.1f s: %s", delay, error)
            else:
                delay = RECONNECT_FIRST_DELAY
                try:
                    await self._resync()
                    await self._watch(conn)
                    log.warning("change relay: connection lost, reconnecting")
                except Exception as error:
                    log.warning("change relay: connection failed, reconnecting: %s", error)
                finally:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _listen(self) -> asyncpg.Connection:
        _, options = self._engine.dialect.create_connect_args(self._engine.url)
        for sqlalchemy_only in ("prepared_statement_cache_size", "prepared_statement_name_func"):
            options.pop(sqlalchemy_only, None)
        conn = await asyncpg.connect(**options, server_settings={"application_name": APPLICATION_NAME})
        try:
            await conn.add_listener(CHANNEL, self._received)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return once the connection is gone."""
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _: closed.set())
        while not conn.is_closed():
            try:
                await asyncio.wait_for(closed.wait(), PING_INTERVAL)
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=PING_TIMEOUT)

    def _received(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            origin, events = decode(payload)
        except (ValueError, KeyError):
            log.warning("change relay: ignoring a notification it cannot read")
            return
        if origin != self._origin:
            self._bus.publish(events)

    async def _resync(self) -> None:
        """A RESYNC for every mailbox listened to here: what was sent while we were away is lost."""
        mailbox_ids, account_ids = self._bus.subscribed()
        if not mailbox_ids and not account_ids:
            return
        boxes: dict[int, ChangeEvent] = {}
        async with connect(self._engine) as conn:
            for column, ids in ((m.Mailbox.id, mailbox_ids), (m.Mailbox.account_id, account_ids)):
                for chunk in in_chunks(sorted(ids)):
                    rows = await conn.execute(select(m.Mailbox.id, m.Mailbox.account_id, m.Mailbox.highestmodseq)
                                              .where(column.in_(chunk)))
                    boxes.update((row.id, ChangeEvent(row.account_id, row.id, 0, row.highestmodseq,
                                                      ChangeKind.RESYNC)) for row in rows)
        self._bus.publish(boxes.values())
