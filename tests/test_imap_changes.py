"""Other sessions' changes reach an IMAP client at the moments RFC 9051 §7.5.1 allows.

Flag changes go out as FETCH at any time (to an idling client at once, from
the change bus, not a poll); EXPUNGE never while answering FETCH, STORE or
SEARCH. Across daemons sharing PostgreSQL the committer's NOTIFYs and each
daemon's relay carry the same events, also after the relay's connection was
cut. Raw transcripts over TLS against real daemons, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from runbox_mta.store import ChangeEvent, ChangeKind, ChangesLost, Mailbox, Store, open_store
from runbox_mta.store.changes import ChangeBus
from runbox_mta.store.notify import APPLICATION_NAME, MAX_ITEMISED, MAX_PAYLOAD_BYTES, decode, encode
from tests.test_imap_server import (  # noqa: F401 (fixtures)
    MESSAGES, Raw, ServingDaemon, certs, daemon, expect, serve, session, shared_certs, tls_client,
)

pytestmark = pytest.mark.timeout(60)

# SPEC §6 allows a second; an event-driven push takes milliseconds, a 1 s poll would not pass.
PUSH_WITHIN = 0.5
# The relay reconnects after RECONNECT_FIRST_DELAY; a loaded test machine gets slack.
RECONNECT_WITHIN = 10.0


def idle(raw: Raw) -> None:
    raw.send(b"i IDLE\r\n")
    assert raw.line() == b"+ idling"


def done(raw: Raw) -> None:
    raw.send(b"DONE\r\n")
    expect(raw.until(b"i"), [r"i OK IDLE terminated\."])


def pushed(raw: Raw, started: float) -> bytes:
    """The next line, which must arrive within PUSH_WITHIN of `started`."""
    line = raw.line()
    assert time.monotonic() - started < PUSH_WITHIN, line
    return line


def highestmodseq(select_reply: list[bytes]) -> int:
    found = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", b"\n".join(select_reply))
    assert found is not None, select_reply
    return int(found.group(1))


# --- one daemon: when each kind of change is told ------------------------------------------------


def test_idle_hears_another_sessions_flag_change_at_once(daemon, tls_client):
    changer, idler = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    idle(idler)
    started = time.monotonic()
    expect(changer.chat(rb"STORE 1 +FLAGS (\Flagged)"),
           [r"\* 1 FETCH \(FLAGS \(\\Flagged\)\)", r"a OK STORE completed\."])
    assert pushed(idler, started) == rb"* 1 FETCH (FLAGS (\Flagged))"
    done(idler)
    expect(changer.chat(b"NOOP"), [r"a OK NOOP completed\."])  # its own change is not told twice
    for raw in (changer, idler):
        raw.close()


def test_a_busy_session_hears_flag_changes_with_its_next_command_with_uid_in_uid_commands(daemon, tls_client):
    changer, other = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    changer.chat(rb"STORE 2 +FLAGS.SILENT (\Seen)")
    expect(other.chat(b"NOOP"), [r"\* 2 FETCH \(FLAGS \(\\Seen\)\)", r"a OK NOOP completed\."])
    changer.chat(rb"STORE 3 +FLAGS.SILENT (\Answered)")
    expect(other.chat(b"UID FETCH 1 (UID)"), [r"\* 1 FETCH \(UID 1\)", r"\* 3 FETCH \(FLAGS \(\\Answered\) UID 3\)",
                                              r"a OK FETCH completed\."])
    expect(other.chat(b"NOOP"), [r"a OK NOOP completed\."])
    for raw in (changer, other):
        raw.close()


def test_expunge_waits_out_fetch_store_and_search_but_not_their_uid_forms(daemon, tls_client):
    expunger, other = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    expunger.chat(rb"STORE 1 +FLAGS.SILENT (\Deleted)")
    expect(expunger.chat(b"EXPUNGE"), [r"\* 1 EXPUNGE", r"a OK EXPUNGE completed\."])
    # RFC 9051 §7.5.1: message numbers must not shift under FETCH, STORE or SEARCH.
    expect(other.chat(b"FETCH 2 (UID)"), [r"\* 2 FETCH \(UID 2\)", r"a OK FETCH completed\."])
    expect(other.chat(rb"STORE 2 +FLAGS (\Seen)"), [r"\* 2 FETCH \(FLAGS \(\\Seen\)\)", r"a OK STORE completed\."])
    expect(other.chat(b"SEARCH ALL"), [r"\* SEARCH 2 3", r"a OK SEARCH completed\."])
    expect(other.chat(b"NOOP"), [r"\* 1 EXPUNGE", r"a OK NOOP completed\."])

    expunger.chat(rb"STORE 1 +FLAGS.SILENT (\Deleted)")
    expect(expunger.chat(b"EXPUNGE"), [r"\* 1 EXPUNGE", r"a OK EXPUNGE completed\."])
    # A UID command names messages by UID: numbers may shift under it.
    expect(other.chat(b"UID FETCH 3 (UID)"), [r"\* 2 FETCH \(UID 3\)", r"\* 1 EXPUNGE", r"a OK FETCH completed\."])
    for raw in (expunger, other):
        raw.close()


def test_idle_hears_expunges_and_new_mail_at_once(daemon, tls_client):
    changer, idler = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    idle(idler)
    started = time.monotonic()
    changer.chat(rb"STORE 1 +FLAGS.SILENT (\Deleted)")
    assert pushed(idler, started) == rb"* 1 FETCH (FLAGS (\Deleted))"
    started = time.monotonic()
    changer.chat(b"EXPUNGE")
    assert pushed(idler, started) == b"* 1 EXPUNGE"
    started = time.monotonic()
    changer.chat(b"APPEND INBOX {%d+}\r\n%s" % (len(MESSAGES[0]), MESSAGES[0]))
    assert pushed(idler, started) == b"* 3 EXISTS"
    done(idler)
    for raw in (changer, idler):
        raw.close()


def test_condstore_sessions_get_uid_and_modseq_with_every_flag_change(daemon, tls_client):
    changer, idler = (session(daemon, tls_client) for _ in range(2))
    base = highestmodseq(idler.chat(b"SELECT INBOX (CONDSTORE)"))
    changer.chat(b"ENABLE CONDSTORE")
    changer.chat(b"SELECT INBOX")
    idle(idler)
    started = time.monotonic()
    # RFC 7162 §3.1.3: .SILENT still reports the new MODSEQ to the session that stored.
    expect(changer.chat(rb"STORE 1 +FLAGS.SILENT (\Flagged)"),
           [rf"\* 1 FETCH \(UID 1 MODSEQ \({base + 1}\)\)", r"a OK STORE completed\."])
    # RFC 7162 §3.1: once CONDSTORE is on, every untagged FETCH carries UID and MODSEQ.
    assert pushed(idler, started) == rb"* 1 FETCH (FLAGS (\Flagged) UID 1 MODSEQ (%d))" % (base + 1)
    done(idler)
    expect(changer.chat(b"NOOP"), [r"a OK NOOP completed\."])
    for raw in (changer, idler):
        raw.close()


async def test_a_subscriber_told_of_lost_events_hears_new_ones_after_clearing() -> None:
    bus = ChangeBus(max_pending=2)
    with bus.subscribe(mailbox_id=1) as flooded:
        bus.publish([ChangeEvent(1, 1, uid, uid + 1, ChangeKind.FLAGS) for uid in (1, 2, 3)])
        with pytest.raises(ChangesLost):
            await flooded.get()
        flooded.clear()  # the subscriber re-reads the mailbox instead
        bus.publish([ChangeEvent(1, 1, 4, 5, ChangeKind.APPEND)])
        assert await flooded.get() == ChangeEvent(1, 1, 4, 5, ChangeKind.APPEND)


# --- NOTIFY payloads -----------------------------------------------------------------------------


def test_notify_payloads_round_trip_and_stay_under_postgresqls_limit() -> None:
    kinds = (ChangeKind.APPEND, ChangeKind.FLAGS, ChangeKind.EXPUNGE)
    events = [ChangeEvent(7, mailbox, uid, 1000 + uid, kinds[uid % 3])
              for mailbox in range(1, 101) for uid in range(1, MAX_ITEMISED + 1)]
    payloads = encode("d1", events)
    assert len(payloads) > 1 and all(len(payload.encode()) <= MAX_PAYLOAD_BYTES for payload in payloads)
    decoded = [decode(payload) for payload in payloads]
    assert {origin for origin, _ in decoded} == {"d1"}
    assert [event for _, batch in decoded for event in batch] == events
    assert encode("d1", [ChangeEvent(7, 3, 9, 12, ChangeKind.FLAGS)]) == ["d1 f7.3.9.12"]


def test_a_burst_in_one_mailbox_is_notified_as_one_resync() -> None:
    burst = [ChangeEvent(7, 3, uid, 50, ChangeKind.FLAGS) for uid in range(1, MAX_ITEMISED + 2)]
    other = ChangeEvent(7, 4, 1, 9, ChangeKind.EXPUNGE)
    assert [decode(payload) for payload in encode("d1", [*burst, other])] == [
        ("d1", [ChangeEvent(7, 3, 0, 50, ChangeKind.RESYNC), other])]


# --- across daemons on PostgreSQL ----------------------------------------------------------------


def postgresql_only(database_url: str) -> None:
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("SQLite: one daemon per database file, nothing to relay")


async def query(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """`sql` on a connection of its own to the test's database."""
    conn = await asyncpg.connect(make_url(database_url).set(drivername="postgresql")
                                 .render_as_string(hide_password=False))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def relay_backends(database_url: str) -> list[int]:
    """Server pids of the relays LISTENing on this database."""
    rows = asyncio.run(query(database_url, "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                             "AND application_name = $2 AND query LIKE 'LISTEN%'",
                             make_url(database_url).database, APPLICATION_NAME))
    return sorted(row["pid"] for row in rows)


def wait_for_relays(database_url: str, count: int, not_in: Sequence[int] = ()) -> list[int]:
    deadline = time.monotonic() + RECONNECT_WITHIN
    while time.monotonic() < deadline:
        pids = relay_backends(database_url)
        if len(pids) == count and not set(pids) & set(not_in):
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} relays not listening: {pids}")


@pytest.fixture
def two_daemons(tmp_path: Path, database_url: str, certs: Path) -> Iterator[tuple[ServingDaemon, ServingDaemon]]:
    """Two daemons on one PostgreSQL database, each with its own state directory, both relays listening."""
    postgresql_only(database_url)
    started = []
    for name in ("one", "two"):
        shutil.copytree(certs, tmp_path / name / "certs")
        started.append(ServingDaemon(tmp_path / name, database_url, asyncio.new_event_loop, ""))
    wait_for_relays(database_url, 2)
    yield started[0], started[1]
    for daemon_ in started:
        assert daemon_.stop() == 0, "a connection handler crashed"


def test_idle_on_one_daemon_hears_appends_flags_and_expunges_made_on_another(two_daemons, tls_client):
    one, two = two_daemons
    one.populate()
    changer, idler = session(one, tls_client, b"INBOX"), session(two, tls_client, b"INBOX")
    idle(idler)
    started = time.monotonic()
    changer.chat(b"APPEND INBOX {%d+}\r\n%s" % (len(MESSAGES[0]), MESSAGES[0]))
    assert pushed(idler, started) == b"* 4 EXISTS"
    started = time.monotonic()
    changer.chat(rb"STORE 2 +FLAGS (\Flagged \Deleted)")
    assert pushed(idler, started) == rb"* 2 FETCH (FLAGS (\Flagged \Deleted))"
    started = time.monotonic()
    changer.chat(b"EXPUNGE")
    assert pushed(idler, started) == b"* 2 EXPUNGE"
    done(idler)
    for raw in (changer, idler):
        raw.close()


def test_a_relay_whose_connection_is_cut_reconnects_and_catches_up(two_daemons, tls_client, database_url):
    one, two = two_daemons
    _, inbox = one.populate()
    idler = session(two, tls_client, b"INBOX")
    idle(idler)
    before = wait_for_relays(database_url, 2)
    asyncio.run(query(database_url, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", before))
    # Committed while no relay listens: its NOTIFY reaches nobody; the reconnect's re-read finds it.
    one.call(one.store.append(inbox, MESSAGES[1]))
    assert idler.line() == b"* 4 EXISTS"
    wait_for_relays(database_url, 2, not_in=before)
    changer = session(one, tls_client, b"INBOX")
    started = time.monotonic()
    changer.chat(rb"STORE 4 +FLAGS (\Seen)")
    assert pushed(idler, started) == rb"* 4 FETCH (FLAGS (\Seen))"
    done(idler)
    for raw in (changer, idler):
        raw.close()


async def test_the_relay_publishes_other_stores_commits_once_and_resyncs_on_connecting(
        store: Store, inbox: Mailbox, database_url: str) -> None:
    postgresql_only(database_url)
    other = await open_store(database_url)
    relays = [asyncio.create_task(opened.relay.run()) for opened in (store, other)]
    try:
        with store.subscribe(mailbox_id=inbox.id) as here, other.subscribe(mailbox_id=inbox.id) as there:
            # Connected and listening: each relay tells its subscribers to re-read, as after any reconnect.
            for events in (here, there):
                assert (await asyncio.wait_for(events.get(), RECONNECT_WITHIN)).kind is ChangeKind.RESYNC
            failed, appended = await asyncio.gather(store.append(999_999, b"lost"), store.append(inbox.id, b"x"),
                                                    return_exceptions=True)
            assert isinstance(failed, Exception)
            expected = ChangeEvent(inbox.account_id, inbox.id, appended.uid, appended.modseq, ChangeKind.APPEND)
            assert await asyncio.wait_for(there.get(), 5) == expected  # by NOTIFY, sent on COMMIT
            assert await here.get() == expected  # published locally ...
            with pytest.raises(TimeoutError):  # ... and not again by its own relay; the failed job sent nothing
                await asyncio.wait_for(asyncio.gather(here.get(), there.get()), 0.3)
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await other.close()
