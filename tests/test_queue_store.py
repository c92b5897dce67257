"""The queue's leases in the store: one holder at a time, expiry, and concurrent claimers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from runbox_mta.errors import NotFound
from runbox_mta.store import Store, open_store
from runbox_mta.store.queue import DELAYED, Deferral

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=30)
MESSAGE = b"Subject: q\r\n\r\nbody\r\n"


async def test_a_claim_is_exclusive_until_its_lease_expires(store: Store) -> None:
    await store.enqueue("alice@example.test", ["a@remote.test", "b@remote.test", "c@other.test"], MESSAGE)
    assert sorted(await store.due_destinations(T0 + timedelta(days=1000))) == ["other.test", "remote.test"]
    now = datetime.now(UTC)
    (claimed,) = await store.claim("remote.test", "A", now, now + LEASE, 10)
    assert [r.address for r in claimed.recipients] == ["a@remote.test", "b@remote.test"]
    assert claimed.sender == "alice@example.test"
    assert await store.read_queued([claimed.blob_id, claimed.blob_id]) == {claimed.blob_id: MESSAGE}
    with pytest.raises(NotFound):
        await store.read_queued([claimed.blob_id, claimed.blob_id + 1000])
    assert await store.claim("remote.test", "B", now, now + LEASE, 10) == []
    assert await store.due_destinations(now) == ["other.test"]
    # A killed holder: once its lease is over, someone else takes the mail.
    later = now + LEASE + timedelta(seconds=1)
    (taken,) = await store.claim("remote.test", "B", later, later + LEASE, 10)
    assert [r.id for r in taken.recipients] == [r.id for r in claimed.recipients]
    # The old holder's late results change nothing.
    await store.settle("A", [r.id for r in claimed.recipients], [])
    assert len((await store.list_queue())[0].recipients) == 3


async def test_settle_removes_finished_and_reschedules_the_rest(store: Store) -> None:
    queue_id = await store.enqueue("alice@example.test", ["a@remote.test", "b@remote.test"], MESSAGE)
    now = datetime.now(UTC)
    (claimed,) = await store.claim("remote.test", "A", now, now + LEASE, 10)
    a, b = claimed.recipients
    await store.settle("A", [a.id], [Deferral(b.id, "451 later", now + timedelta(minutes=5), "plaintext", DELAYED)])
    (entry,) = await store.list_queue()
    (left,) = entry.recipients
    assert (left.recipient, left.status, left.attempts, left.last_error, left.tls_outcome) == (
        "b@remote.test", DELAYED, 1, "451 later", "plaintext")
    assert await store.claim("remote.test", "B", now, now + LEASE, 10) == []  # not due yet
    assert left.next_attempt_at == now + timedelta(minutes=5)
    (again,) = await store.claim("remote.test", "B", now + timedelta(minutes=6), now + LEASE, 10)
    await store.settle("B", [again.recipients[0].id], [])
    assert await store.list_queue() == []
    assert entry.id == queue_id


async def test_released_leases_are_due_again(store: Store) -> None:
    await store.enqueue("alice@example.test", ["a@remote.test"], MESSAGE)
    now = datetime.now(UTC)
    assert await store.claim("remote.test", "A", now, now + LEASE, 10)
    await store.release_leases("A")
    assert await store.claim("remote.test", "B", now, now + LEASE, 10)


async def test_concurrent_claimers_on_two_stores_never_share_a_recipient(database_url: str) -> None:
    stores = [await open_store(database_url) for _ in range(2)]
    try:
        for n in range(60):
            await stores[0].enqueue("alice@example.test", [f"user{n}@remote.test"], MESSAGE)
        now = datetime.now(UTC)

        async def claim_all(store: Store, owner: str) -> list[int]:
            ids: list[int] = []
            while batch := await store.claim("remote.test", owner, now, now + LEASE, 7):
                ids += [r.id for message in batch for r in message.recipients]
            return ids

        first, second = await asyncio.gather(claim_all(stores[0], "A"), claim_all(stores[1], "B"))
        assert not set(first) & set(second) and len(first) + len(second) == 60
    finally:
        for store in stores:
            await store.close()
