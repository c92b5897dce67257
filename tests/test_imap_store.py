"""The IMAP part of the store (store/mailstore.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta, timezone
from random import Random

import pytest
from sqlalchemy import event, func, insert, select, update

from runbox_mta.errors import AlreadyExists, NotFound, RunboxError
from runbox_mta.imap.fetch import render_envelope, render_envelope_fields
from runbox_mta.imap.mime import Envelope, parse_structure
from runbox_mta.imap.search import Candidate, Scope, matches, needs_body
from runbox_mta.imap.search_keys import SearchKey, parse_search_program
from runbox_mta.imap.syntax import Reader
from runbox_mta.imap.wire import RawCommand
from runbox_mta.store import ChangeKind, QuotaExceeded, Store, mailstore, open_store
from runbox_mta.store.changes import ChangeEvent
from runbox_mta.store.index import Changes
from runbox_mta.store import models as m
from runbox_mta.store.blobs import STRUCTURE_KEY
from tests.test_imap_mime import SAMPLES, sample

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


async def account(store: Store) -> int:
    await store.add_domain("example.test", "sel", "PEM")
    return (await store.add_account("ola@example.test", "hash")).id


async def inbox_with(store: Store, count: int) -> tuple[int, int]:
    account_id = await account(store)
    inbox = await store.get_mailbox(account_id, "INBOX")
    for _ in range(count):
        await store.append(inbox.id, MESSAGE)
    return account_id, inbox.id


async def test_snapshot_has_uids_counters_and_keywords(store):
    account_id, inbox = await inbox_with(store, 3)
    await store.update_flags(inbox, [2], "+", ["$Work", "\\Seen"])
    snapshot = await store.snapshot(account_id, "inbox")
    assert (snapshot.mailbox_id, snapshot.name, snapshot.uids, snapshot.uidnext) == (inbox, "INBOX", [1, 2, 3], 4)
    assert snapshot.keywords == {"$Work"}
    with pytest.raises(NotFound):
        await store.snapshot(account_id, "Nope")


async def test_update_flags_spends_one_modseq_and_only_on_real_changes(store):
    _, inbox = await inbox_with(store, 3)
    before = (await store.changes_since(inbox, 0)).highestmodseq
    update_ = await store.update_flags(inbox, [1, 2, 3], "+", ["\\Flagged"])
    assert [change.uid for change in update_.changed] == [1, 2, 3]
    assert {change.modseq for change in update_.changed} == {before + 1}
    again = await store.update_flags(inbox, [1, 2, 3], "+", ["\\Flagged"])
    assert again.changed == () and len(again.unchanged) == 3
    assert (await store.changes_since(inbox, 0)).highestmodseq == before + 1  # nothing changed: no MODSEQ spent
    replaced = await store.update_flags(inbox, [1], "", ["\\Seen"])
    assert replaced.changed[0].flags == {"\\Seen"}
    removed = await store.update_flags(inbox, [1, 2], "-", ["\\Seen", "\\Flagged"])
    assert [change.flags for change in removed.changed] == [frozenset(), frozenset()]


async def test_unchangedsince_refuses_messages_changed_after_it(store):
    _, inbox = await inbox_with(store, 2)
    modseq = (await store.changes_since(inbox, 0)).highestmodseq
    await store.update_flags(inbox, [2], "+", ["\\Seen"])
    result = await store.update_flags(inbox, [1, 2], "+", ["\\Flagged"], unchangedsince=modseq)
    assert [change.uid for change in result.changed] == [1] and result.modified == (2,)


async def test_changes_since_reports_new_changed_and_expunged(store):
    _, inbox = await inbox_with(store, 3)
    mark = (await store.changes_since(inbox, 0)).highestmodseq
    await store.update_flags(inbox, [1], "+", ["\\Answered"])
    await store.expunge(inbox, [2])
    await store.append(inbox, MESSAGE)
    changes = await store.changes_since(inbox, mark)
    assert [(change.uid, change.flags) for change in changes.changed] == [(1, {"\\Answered"}), (4, frozenset())]
    assert changes.expunged == (2,)
    assert (await store.changes_since(inbox, changes.highestmodseq)).changed == ()


async def test_copy_and_move_give_new_uids_and_events(store):
    account_id, inbox = await inbox_with(store, 3)
    archive = (await store.get_mailbox(account_id, "Archive")).id
    with store.subscribe(account_id=account_id) as events:
        copied = await store.copy_messages(inbox, [1, 3, 99], archive, move=False)
        assert (copied.source_uids, copied.target_uids) == ((1, 3), (1, 2))
        moved = await store.copy_messages(inbox, [2], archive, move=True)
        assert moved.target_uids == (3,)
        kinds = [(event.mailbox_id, event.uid, event.kind) for event in [await events.get() for _ in range(4)]]
    assert kinds == [(archive, 1, ChangeKind.APPEND), (archive, 2, ChangeKind.APPEND),
                     (archive, 3, ChangeKind.APPEND), (inbox, 2, ChangeKind.EXPUNGE)]
    assert [message.uid for message in await store.list_messages(inbox)] == [1, 3]
    rows = await store.message_rows(archive, [1, 2, 3], data=True)
    assert [row.data for row in rows] == [MESSAGE] * 3
    assert rows[0].parsed is not None and STRUCTURE_KEY in rows[0].parsed


async def test_message_rows_with_only_the_envelope_render_the_same_envelope(store):
    _, inbox = await inbox_with(store, 0)
    names = sorted(path.name for path in SAMPLES.iterdir())
    await store.append_messages(inbox, [(sample(name), [], None) for name in names])
    uids = list(range(1, len(names) + 1))
    lean = await store.message_rows(inbox, uids, data=False, structure=False, envelope=True)
    for name, row in zip(names, lean, strict=True):
        assert row.parsed is None and row.envelope is not None, name
        expected = render_envelope(parse_structure(sample(name)))
        assert render_envelope_fields(Envelope.from_json(row.envelope)) == expected, name
    assert all(row.envelope is None for row in await store.message_rows(inbox, uids, data=False))


async def test_append_messages_honours_the_quota(store):
    account_id, inbox = await inbox_with(store, 0)
    await store.update_account("ola@example.test", quota_bytes=len(MESSAGE) + 10)
    appended = await store.append_messages(inbox, [(MESSAGE, ["\\Seen"], datetime(2024, 1, 2, tzinfo=UTC))])
    assert appended.uids == (1,) and appended.uidvalidity == (await store.get_mailbox(account_id, "INBOX")).uidvalidity
    with pytest.raises(QuotaExceeded):
        await store.append_messages(inbox, [(MESSAGE, [], None)])


async def test_append_messages_stores_all_or_none(store):
    account_id, inbox = await inbox_with(store, 0)
    appended = await store.append_messages(inbox, [(MESSAGE, [], None), (MESSAGE, ["\\Flagged"], None)])
    assert appended.uids == (1, 2)
    await store.update_account("ola@example.test", quota_bytes=3 * len(MESSAGE))
    with pytest.raises(QuotaExceeded):  # the first would fit, the second not: neither is stored
        await store.append_messages(inbox, [(MESSAGE, [], None), (MESSAGE, [], None)])
    assert [message.uid for message in await store.list_messages(inbox)] == [1, 2]


async def test_create_delete_rename_subscribe(store):
    account_id, _ = await inbox_with(store, 0)
    await store.create_mailbox_path(account_id, "a/b/c", "\\Sent")
    names = {box.name: box.special_use for box in await store.list_mailboxes(account_id)}
    assert names["a"] is None and names["a/b"] is None and names["a/b/c"] == "\\Sent"
    with pytest.raises(AlreadyExists):
        await store.create_mailbox_path(account_id, "a/b", None)
    with pytest.raises(RunboxError, match="children"):
        await store.delete_mailbox(account_id, "a/b")
    await store.rename_mailbox(account_id, "a", "x")
    assert {"x", "x/b", "x/b/c"} <= {box.name for box in await store.list_mailboxes(account_id)}
    await store.set_subscribed(account_id, "x", False)
    assert not (await store.get_mailbox(account_id, "x")).subscribed
    old = (await store.get_mailbox(account_id, "x/b/c")).uidvalidity
    await store.delete_mailbox(account_id, "x/b/c")
    await store.create_mailbox_path(account_id, "x/b/c", None)
    assert (await store.get_mailbox(account_id, "x/b/c")).uidvalidity > old  # RFC 9051 §2.3.1.1
    with pytest.raises(RunboxError):
        await store.delete_mailbox(account_id, "INBOX")


async def test_mailbox_counts(store):
    _, inbox = await inbox_with(store, 3)
    await store.update_flags(inbox, [1], "+", ["\\Seen"])
    await store.update_flags(inbox, [2], "+", ["\\Deleted"])
    counts = await store.mailbox_counts(inbox)
    assert (counts.messages, counts.unseen, counts.deleted, counts.size, counts.deleted_size) == \
        (3, 2, 1, 3 * len(MESSAGE), len(MESSAGE))


async def test_select_of_a_large_mailbox_benchmark(store):
    """Not a timed assertion: prints how long SELECT's snapshot of 100k messages takes."""
    account_id, inbox = await inbox_with(store, 1)
    count = 100_000
    async with store.engine.begin() as conn:
        blob_id = (await conn.execute(insert(m.Blob).values(size=1, data=b"x", parsed={}).returning(m.Blob.id))
                   ).scalar_one()
        now = datetime.now(UTC)
        rows = [{"mailbox_id": inbox, "uid": uid, "modseq": 2, "blob_id": blob_id, "system_flags": uid % 2,
                 "keywords": "", "internal_date": now, "size": 1} for uid in range(2, count + 2)]
        for start in range(0, len(rows), 10_000):
            await conn.execute(insert(m.Message), rows[start:start + 10_000])
        await conn.execute(update(m.Mailbox).where(m.Mailbox.id == inbox).values(uidnext=count + 2))
    started = time.perf_counter()
    snapshot = await store.snapshot(account_id, "INBOX")
    elapsed = time.perf_counter() - started
    assert len(snapshot.uids) == count + 1
    print(f"\nSELECT snapshot of {count + 1} messages ({store.engine.dialect.name}): {elapsed * 1000:.0f} ms")


async def test_deleting_a_mailbox_of_a_no_backup_account_erases_its_messages(store):
    account_id, _ = await inbox_with(store, 0)
    await store.update_account("ola@example.test", no_backup=True)
    await store.create_mailbox_path(account_id, "Secret", None)
    secret = (await store.get_mailbox(account_id, "Secret")).id
    await store.append(secret, MESSAGE)
    await store.delete_mailbox(account_id, "Secret")
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(m.Blob))).scalar_one() == 0
        assert (await conn.execute(select(func.count()).select_from(m.Message))).scalar_one() == 0


# --- SEARCH in SQL (store/search.py) agrees with imap/search.py ---------------------------

SEARCH_ATOMS = [
    "ALL", "SEEN", "UNSEEN", "FLAGGED", "ANSWERED", "DELETED", "DRAFT", "RECENT", "NEW", "OLD",
    "KEYWORD $work", "UNKEYWORD $Work", "LARGER 300", "SMALLER 300", "MODSEQ 20",
    "BEFORE 6-Mar-2024", "ON 5-Mar-2024", "ON 6-Mar-2024", "SINCE 6-Mar-2024", "SINCE 7-Mar-2024",
    "FROM alice", "FROM ALICE@EXAMPLE", "SUBJECT report", "TO bob", 'HEADER X-Tag ""', "HEADER X-Tag blue",
    "SUBJECT from", "SENTBEFORE 6-Mar-2024", "BODY needle", "TEXT alice", "1:5", "UID 3:9", "2,*",
    'SUBJECT "50%"', 'SUBJECT "r%t"', 'SUBJECT "l_nch"', 'SUBJECT "a/b"', 'HEADER X-Tag "bl\\\\ue"',
]


def search_key(text: str) -> SearchKey:
    return parse_search_program(Reader(RawCommand("t", "SEARCH", (text.encode(),)), utf8=True))[1]


def search_keys() -> list[str]:
    """Every atom, and seeded random OR / NOT / AND combinations of them."""
    rng = Random(5)
    keys = list(SEARCH_ATOMS)
    for _ in range(150):
        a, b = rng.choice(SEARCH_ATOMS), rng.choice(SEARCH_ATOMS)
        keys.append(rng.choice([f"OR {a} {b}", f"NOT {a}", f"{a} {b}", f"NOT OR {a} {b}", f"({a} NOT {b})"]))
    return keys


def search_corpus() -> list[tuple[bytes, list[str], datetime]]:
    """Messages with every mix of flags, sizes either side of 300 octets, internal dates either
    side of midnight in zones from -12:00 to +14:00, and headers the keys look for."""
    rng = Random(9)
    zones = [timezone(timedelta(minutes=minutes)) for minutes in (-720, -300, 0, 60, 330, 840)]
    messages = []
    for index in range(60):
        flags = [flag for flag in ("\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft", "$Work")
                 if rng.random() < 0.4]
        sender = rng.choice(["Alice <alice@example.net>", "=?utf-8?q?Al=C3=AFce?= <x@example.net>", "carol@x"])
        header = (f"From: {sender}\r\nTo: {rng.choice(['bob@example.net', 'dave@example.net'])}\r\n"
                  f"Subject: {rng.choice(['Quarterly report', 'lunch', 'mail from bob', '50% off', 'a/b test'])}\r\n"
                  f"Date: {rng.choice(['Tue, 5 Mar 2024 23:30:00 -0500', 'Thu, 7 Mar 2024 01:00:00 +0000'])}\r\n")
        if rng.random() < 0.5:
            header += f"X-Tag: {rng.choice(['blue', 'red'])}\r\n"
        body = rng.choice(["a needle here", "nothing"]) + " " * rng.choice([10, 400])
        moment = datetime(2024, 3, 6, 0, 0, tzinfo=UTC) + timedelta(minutes=rng.randrange(-1800, 1800))
        messages.append(((header + "\r\n" + body + "\r\n").encode(), flags, moment.astimezone(rng.choice(zones))))
    return messages


async def test_sql_search_agrees_with_the_python_evaluation(store):
    _, inbox = await inbox_with(store, 0)
    await store.append_messages(inbox, search_corpus())
    await store.update_flags(inbox, list(range(1, 61, 3)), "+", ["\\Flagged"])  # some MODSEQs above the rest
    rows = await store.message_rows(inbox, list(range(1, 61)), data=True, structure=False)
    scope = Scope(largest_number=60, largest_uid=60)
    decided: list[str] = []
    for text in search_keys():
        key = search_key(text)
        expected = [row.uid for row in rows if matches(key, Candidate(row.uid, row), scope)]
        found = await store.search_uids(inbox, key, up_to_uid=60, modseq=True)
        if found is not None:
            decided.append(text)
            assert found == (expected, max((rows[uid - 1].modseq for uid in expected), default=0)), text
        candidates = await store.search_candidates(inbox, key, after_uid=0, limit=1000, data=needs_body(key))
        assert [row.uid for row in candidates if matches(key, Candidate(row.uid, row), scope)] == expected, text
    assert len(decided) >= 70  # flags, sizes, dates and MODSEQ by SQL alone; header words with the stored header
    assert {"SUBJECT report", "FROM ALICE@EXAMPLE", 'HEADER X-Tag ""', 'SUBJECT "50%"'} <= set(decided)
    assert await store.search_uids(inbox, search_key("OR SUBJECT report SEEN"), up_to_uid=60) is None  # imap.search
    reports = [row.uid for row in rows if b"Subject: Quarterly report" in (row.data or b"")]
    assert await store.search_uids(inbox, search_key("SUBJECT report"), up_to_uid=30) == (
        [uid for uid in reports if uid <= 30], 0)  # none past the view's last UID; MODSEQ not asked
    assert await store.search_uids(inbox, search_key("ALL"), up_to_uid=3) == ([1, 2, 3], 0)  # MODSEQ not asked
    narrowed = await store.search_candidates(inbox, search_key("SUBJECT report"), after_uid=0, limit=1000, data=False)
    assert 0 < len(narrowed) < 60  # ... on the messages SQL found the word in
    assert [row.uid for row in await store.search_candidates(inbox, search_key("ALL"), after_uid=50, limit=4,
                                                             data=False)] == [51, 52, 53, 54]


def count_reads(store: Store) -> list[int]:
    """A counter of the statements that read the messages table (IMAP reads; not the writes)."""
    counter = [0]

    def count(conn, cursor, statement, *rest):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and "FROM mailboxes" in statement:
            counter[0] += 1

    event.listen(store.lookup_engine, "before_cursor_execute", count)
    return counter


async def test_concurrent_identical_changes_reads_share_one_query(store):
    _, inbox = await inbox_with(store, 2)
    reads = count_reads(store)
    results = await asyncio.gather(*(store.changes_since(inbox, 0) for _ in range(200)))
    assert reads[0] == 1 and len({result.changed for result in results}) == 1
    assert await store.changes_since(inbox, 0) == results[0]  # a session woken a little later shares it too
    assert reads[0] == 1
    await store.append(inbox, MESSAGE)  # a commit: the next read is a new one, and sees it
    assert [change.uid for change in (await store.changes_since(inbox, 0)).changed] == [1, 2, 3]
    assert reads[0] == 2


async def test_a_changes_read_begun_before_a_publish_is_not_shared_after_it(store):
    _, inbox = await inbox_with(store, 1)
    reads = count_reads(store)
    first = asyncio.ensure_future(store.changes_since(inbox, 0))
    await asyncio.sleep(0)  # its read is under way
    store._changes.publish([ChangeEvent(1, inbox, 0, 0, ChangeKind.RESYNC)])  # as after a COMMIT
    second = asyncio.ensure_future(store.changes_since(inbox, 0))
    await asyncio.gather(first, second)
    assert reads[0] == 2
    first_again = asyncio.ensure_future(store.changes_since(inbox, 0))
    await asyncio.sleep(0)
    first_again.cancel()  # one caller giving up leaves the shared read to the others
    assert (await store.changes_since(inbox, 0)).highestmodseq > 0


async def test_a_mailbox_nobody_changed_is_not_read_again(store, database_url, monkeypatch):
    account_id, inbox = await inbox_with(store, 1)
    head = await store.changes_since(inbox, 0)
    reads = count_reads(store)
    for _ in range(3):  # every IMAP command asks; this daemon published nothing since
        assert await store.changes_since(inbox, head.highestmodseq) == Changes(head.highestmodseq, 2, (), ())
    assert reads[0] == 0
    other = await open_store(database_url)  # another process: the CLI, or a daemon sharing PostgreSQL
    try:
        await other.append(inbox, MESSAGE)
    finally:
        await other.close()
    monkeypatch.setattr(mailstore, "HEAD_TRUST", 0.0)  # its change shows once the head is HEAD_TRUST old
    assert [change.uid for change in (await store.changes_since(inbox, head.highestmodseq)).changed] == [2]
    assert reads[0] == 1


async def test_finished_shared_reads_are_let_go_once_they_cannot_be_shared(store, monkeypatch):
    _, inbox = await inbox_with(store, 8)
    monkeypatch.setattr(mailstore, "PRUNE_SHARED_READS", 4)
    for modseq in range(6):  # all behind the mailbox's head: each is a read
        await store.changes_since(inbox, modseq)
    assert len(store._changes_reads) == 6  # each may still be shared, for HEAD_TRUST
    monkeypatch.setattr(mailstore, "HEAD_TRUST", 0.0)
    await store.changes_since(inbox, 99)
    assert list(store._changes_reads) == [(inbox, 99)]


async def test_a_failed_changes_read_is_not_shared(store):
    await inbox_with(store, 1)
    reads = count_reads(store)
    for _ in range(2):
        with pytest.raises(NotFound):
            await store.changes_since(999, 0)
    assert reads[0] == 2 and (999, 0) not in store._changes_reads
