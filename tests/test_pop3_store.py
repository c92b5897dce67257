"""The store's POP3 part (store/maildrop.py), on SQLite and PostgreSQL: the maildrop
snapshot with exact sizes, the exclusive lock (across daemons on PostgreSQL), and
POP3 deletions as the same expunges IMAP reports."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from runbox_mta.errors import NotFound
from runbox_mta.pop3.message import transmitted_size, uidl
from runbox_mta.store import ChangeKind, Store, open_store
from runbox_mta.store import maildrop as maildrop_module
from runbox_mta.store import models as m
from runbox_mta.store.maildrop import LOCK_SPACE, POP3_SIZE_KEY, MaildropInUse, _batches

MESSAGES = [
    b"Subject: one\r\n\r\nhello\r\n",
    b"Subject: two\r\n\r\n.dot\r\n..dots\r\n",
    b"Subject: three\n\nbare LF, no final newline",
]


async def cached_sizes(store: Store) -> dict[int, int | None]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(m.Blob.id, m.Blob.parsed))
        return {row.id: (row.parsed or {}).get(POP3_SIZE_KEY) for row in rows}


def is_postgresql(store: Store) -> bool:
    return store.engine.dialect.name == "postgresql"


async def test_the_snapshot_lists_inbox_messages_with_their_transmitted_sizes(store, alice, inbox):
    appended = [await store.append(inbox.id, data) for data in MESSAGES]
    drafts = await store.get_mailbox(alice.id, "Drafts")
    await store.append(drafts.id, b"Subject: not in the maildrop\r\n\r\n")
    lock, maildrop = await store.open_maildrop(alice.id)
    await lock.release()
    assert maildrop.mailbox_id == inbox.id
    assert maildrop.uidvalidity == inbox.uidvalidity
    assert [(message.uid, message.size) for message in maildrop.messages] == [
        (entry.uid, transmitted_size(data)) for entry, data in zip(appended, MESSAGES)]


async def test_uidl_comes_from_the_identity_imap_uses(store, alice, inbox):
    appended = await store.append(inbox.id, MESSAGES[0])
    lock, maildrop = await store.open_maildrop(alice.id)
    await lock.release()
    message = maildrop.messages[0]
    assert uidl(message.uid, maildrop.uidvalidity) == f"{appended.uid:08X}{appended.uidvalidity:08X}"


async def test_sizes_are_counted_once_and_kept_with_the_blob(store, alice, inbox, monkeypatch):
    for data in MESSAGES:
        await store.append(inbox.id, data)
    assert set((await cached_sizes(store)).values()) == {None}
    lock, first = await store.open_maildrop(alice.id)
    await lock.release()
    assert sorted((await cached_sizes(store)).values()) == sorted(transmitted_size(d) for d in MESSAGES)

    def must_not_count(data: bytes) -> int:
        raise AssertionError("counted again")

    monkeypatch.setattr(maildrop_module, "transmitted_size", must_not_count)
    lock, second = await store.open_maildrop(alice.id)
    await lock.release()
    assert second == first


async def test_a_big_first_login_reads_the_messages_in_bounded_batches(store, alice, inbox, monkeypatch):
    data = [b"Subject: %d\r\n\r\n.%s\r\n" % (i, b"x" * 100) for i in range(12)]
    for message in data:
        await store.append(inbox.id, message)
    monkeypatch.setattr(maildrop_module, "SIZE_BATCH_BYTES", 300)
    monkeypatch.setattr(maildrop_module, "INLINE_COUNT_LIMIT", 200)  # and count them in a thread
    lock, maildrop = await store.open_maildrop(alice.id)
    await lock.release()
    assert [message.size for message in maildrop.messages] == [transmitted_size(d) for d in data]


def test_batches_respect_the_byte_budget_and_the_in_list_limit():
    assert list(_batches([(1, 5), (2, 5), (3, 5)])) == [[1, 2, 3]]
    assert list(_batches([(1, 6_000_000), (2, 6_000_000), (3, 1)])) == [[1], [2, 3]]
    assert list(_batches([(1, 20_000_000)])) == [[1]]  # one big blob on its own
    assert [len(batch) for batch in _batches([(i, 1) for i in range(1200)])] == [500, 500, 200]


async def test_an_account_without_inbox_is_not_found(store):
    with pytest.raises(NotFound, match="no INBOX"):
        await store.open_maildrop(12345)


async def test_the_maildrop_is_exclusive_until_released(store, alice, inbox):
    lock, _ = await store.open_maildrop(alice.id)
    with pytest.raises(MaildropInUse):
        await store.open_maildrop(alice.id)
    await lock.release()
    await lock.release()  # twice is harmless
    lock, _ = await store.open_maildrop(alice.id)
    await lock.release()


async def test_concurrent_opens_let_exactly_one_in(store, alice, inbox):
    results = await asyncio.gather(*(store.open_maildrop(alice.id) for _ in range(5)), return_exceptions=True)
    winners = [result for result in results if not isinstance(result, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(result, MaildropInUse) for result in results if result not in winners)
    await winners[0][0].release()


async def test_locks_of_different_accounts_are_independent(store, alice, inbox):
    bob = await store.add_account("bob@example.test", "hash-b")
    first, _ = await store.open_maildrop(alice.id)
    second, _ = await store.open_maildrop(bob.id)
    await first.release()
    await second.release()


async def test_the_lock_holds_across_daemons_sharing_postgresql(store, alice, inbox, database_url):
    if not is_postgresql(store):
        pytest.skip("SQLite is served by one daemon: the in-process lock is the whole lock")
    other = await open_store(database_url)
    try:
        lock, _ = await store.open_maildrop(alice.id)
        with pytest.raises(MaildropInUse):
            await other.open_maildrop(alice.id)
        await lock.release()
        lock, _ = await other.open_maildrop(alice.id)
        with pytest.raises(MaildropInUse):
            await store.open_maildrop(alice.id)
        await lock.release()
    finally:
        await other.close()


async def test_a_dead_daemons_locks_do_not_block_forever(store, alice, inbox, database_url):
    if not is_postgresql(store):
        pytest.skip("PostgreSQL only: the in-process lock dies with its process")
    other = await open_store(database_url)
    try:
        lock, _ = await other.open_maildrop(alice.id)
        # The holder's connection dies (daemon crash, network): PostgreSQL drops its locks.
        async with store.engine.connect() as conn:
            killed = await conn.scalar(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE locktype = 'advisory' AND classid = :space"), {"space": LOCK_SPACE})
        assert killed == 1
        lock_here, _ = await store.open_maildrop(alice.id)
        await lock.release()  # the old holder notices nothing but a warning
        await lock_here.release()
    finally:
        await other.close()


async def test_the_lock_connection_goes_back_to_the_pool_when_idle(store, alice, inbox):
    lock, _ = await store.open_maildrop(alice.id)
    await lock.release()
    assert store._maildrop_locks._conn is None


async def test_pop3_deletions_are_expunges_that_imap_sees(store, alice, inbox):
    appended = [await store.append(inbox.id, data) for data in MESSAGES]
    lock, maildrop = await store.open_maildrop(alice.id)
    with store.subscribe(mailbox_id=inbox.id) as changes:
        # What the POP3 glue does at QUIT for messages 1 and 3.
        await store.expunge(maildrop.mailbox_id, [maildrop.messages[0].uid, maildrop.messages[2].uid])
        events = [await asyncio.wait_for(changes.get(), 1) for _ in range(2)]
    await lock.release()
    assert {(event.uid, event.kind) for event in events} == {
        (appended[0].uid, ChangeKind.EXPUNGE), (appended[2].uid, ChangeKind.EXPUNGE)}
    after = await store.get_mailbox(alice.id, "INBOX")
    assert {event.modseq for event in events} == {after.highestmodseq}
    async with store.engine.connect() as conn:
        tombstones = (await conn.execute(select(m.Expunged.uid, m.Expunged.modseq)
                                         .where(m.Expunged.mailbox_id == inbox.id))).all()
    assert sorted(tombstones) == [(appended[0].uid, after.highestmodseq), (appended[2].uid, after.highestmodseq)]
    assert [message.uid for message in await store.list_messages(inbox.id)] == [appended[1].uid]
