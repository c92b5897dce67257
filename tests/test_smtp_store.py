"""The store methods SMTP delivery relies on, on SQLite and (with RUNBOX_TEST_DATABASE_URL) PostgreSQL:
recipient resolution, sender addresses, quota, and local delivery + queueing in one transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from runbox_mta.errors import RunboxError
from runbox_mta.store import (
    Account,
    LocalRecipient,
    QuotaExceeded,
    Resolution,
    Store,
    api,
)
from runbox_mta.store.recent import Recent
from runbox_mta.store.recipients import repeatable, without_tag

MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
async def bob(store: Store, alice: Account) -> Account:
    return await store.add_account("bob@example.test", "hash-b")


async def local_addresses(store: Store, address: str) -> list[str]:
    return sorted(recipient.address for recipient in (await store.resolve_recipient(address)).local)


@pytest.mark.parametrize(("address", "expected"), [
    ("alice+news@example.test", "alice@example.test"),
    ("alice+a+b@example.test", "alice@example.test"),
    ("alice@example.test", "alice@example.test"),
    ("+tag@example.test", "+tag@example.test"),
])
def test_without_tag(address: str, expected: str) -> None:
    assert without_tag(address) == expected


async def test_an_account_resolves_to_its_inbox_and_junk(store: Store, alice: Account) -> None:
    resolution = await store.resolve_recipient("Alice@Example.TEST")
    assert resolution.address == "alice@example.test" and resolution.hosted and not resolution.unknown
    (recipient,) = resolution.local
    assert recipient.account_id == alice.id
    assert recipient.inbox_id == (await store.get_mailbox(alice.id, "INBOX")).id
    assert recipient.junk_id == (await store.get_mailbox(alice.id, "Junk")).id
    assert resolution.remote == ()


async def test_looking_up_an_account_or_a_stranger_is_one_query(store: Store, alice: Account) -> None:
    """RCPT runs this for every recipient: a round trip each for the domain, the aliases and
    the account tripled the MX's database work."""
    selects: list[str] = []
    event.listen(store.lookup_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: selects.append(statement)
                 if statement.lstrip().upper().startswith("SELECT") else None)
    await store.resolve_recipient("alice@example.test")
    await store.resolve_recipient("nobody@example.test")
    await store.resolve_recipient("someone@elsewhere.example")
    assert len(selects) == 3 + 1  # nobody@ also asks for a catch-all


async def test_lookups_on_sqlite_need_no_begin(store: Store, alice: Account) -> None:
    """Each lookup statement is its own implicit transaction: no BEGIN on every RCPT and MAIL."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's explicit BEGIN only")
    statements: list[str] = []
    event.listen(store.lookup_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: statements.append(statement))
    await store.resolve_recipient("alice@example.test")
    await store.sender_addresses("alice@example.test")
    await store.get_domain("example.test")
    assert len(statements) == 3 and not any(s.startswith("BEGIN") for s in statements)


def test_only_resolutions_without_quota_that_are_not_unknown_are_repeated_from_memory() -> None:
    receiver = LocalRecipient(1, "alice@example.test", 10, 11, quota_bytes=None, used_bytes=0)
    limited = LocalRecipient(2, "bob@example.test", 20, None, quota_bytes=1000, used_bytes=10)
    assert repeatable(Resolution("alice@example.test", hosted=True, local=(receiver,)))
    assert repeatable(Resolution("list@example.test", hosted=True, remote=("x@elsewhere.example",)))
    assert not repeatable(Resolution("bob@example.test", hosted=True, local=(limited,)))  # usage changes
    assert not repeatable(Resolution("nobody@example.test", hosted=True))  # a new account receives at once
    assert repeatable(Resolution("x@elsewhere.example", hosted=False, remote=("x@elsewhere.example",)))


def test_recent_answers_last_their_ttl() -> None:
    now = [100.0]
    recent: Recent[str, int] = Recent(ttl=5.0, size=2, clock=lambda: now[0])
    recent.put("a", 1)
    assert recent.get("a") == 1 and recent.get("b") is None
    now[0] += 5.0
    assert recent.get("a") is None
    recent.put("a", 1)
    recent.put("b", 2)
    recent.put("c", 3)  # full: it starts over rather than grow
    assert (recent.get("a"), recent.get("c")) == (None, 3)


async def test_this_stores_own_changes_are_seen_at_once(store: Store, alice: Account) -> None:
    assert await local_addresses(store, "alice@example.test") == ["alice@example.test"]
    assert await store.sender_addresses("alice@example.test") == {"alice@example.test"}
    await store.add_alias("sales@example.test", "alice@example.test")
    assert await store.sender_addresses("alice@example.test") == {"alice@example.test", "sales@example.test"}
    await store.remove_account("alice@example.test", purge=False)  # disabled, address kept
    assert (await store.resolve_recipient("alice@example.test")).local == ()


async def test_unknown_and_foreign_addresses(store: Store, alice: Account) -> None:
    unknown = await store.resolve_recipient("nobody@example.test")
    assert unknown.unknown and unknown.hosted
    foreign = await store.resolve_recipient("someone@Elsewhere.example")
    assert not foreign.hosted and not foreign.unknown
    assert foreign.remote == ("someone@elsewhere.example",) and foreign.local == ()
    with pytest.raises(RunboxError):
        await store.resolve_recipient("not an address")


async def test_plus_addressing_falls_back_to_the_user_but_an_exact_match_wins(store: Store, alice: Account,
                                                                               bob: Account) -> None:
    assert await local_addresses(store, "alice+lists@example.test") == ["alice@example.test"]
    await store.add_alias("alice+shop@example.test", "bob@example.test")
    assert await local_addresses(store, "alice+shop@example.test") == ["bob@example.test"]


async def test_aliases_with_several_local_and_remote_targets(store: Store, alice: Account, bob: Account) -> None:
    await store.add_alias("team@example.test", "alice@example.test")
    await store.add_alias("team@example.test", "bob@example.test")
    await store.add_alias("team@example.test", "carol@elsewhere.example")
    resolution = await store.resolve_recipient("team+x@example.test")
    assert sorted(r.address for r in resolution.local) == ["alice@example.test", "bob@example.test"]
    assert resolution.remote == ("carol@elsewhere.example",)


async def test_recursive_aliases_and_loops(store: Store, alice: Account) -> None:
    await store.add_alias("a@example.test", "b@example.test")
    await store.add_alias("b@example.test", "alice@example.test")
    await store.add_alias("b@example.test", "a@example.test")  # a loop back to the start
    assert await local_addresses(store, "a@example.test") == ["alice@example.test"]
    await store.add_alias("x@example.test", "y@example.test")
    await store.add_alias("y@example.test", "x@example.test")
    assert (await store.resolve_recipient("x@example.test")).unknown


async def test_an_alias_on_an_account_redirects_unless_it_keeps_a_copy(store: Store, alice: Account,
                                                                       bob: Account) -> None:
    await store.add_alias("alice@example.test", "bob@example.test")
    assert await local_addresses(store, "alice@example.test") == ["bob@example.test"]
    await store.add_alias("alice@example.test", "alice@example.test")
    assert await local_addresses(store, "alice@example.test") == ["alice@example.test", "bob@example.test"]


async def test_catch_all_takes_only_what_nobody_else_has(store: Store, alice: Account, bob: Account) -> None:
    await store.add_alias("@example.test", "bob@example.test")
    assert await local_addresses(store, "whatever@example.test") == ["bob@example.test"]
    assert await local_addresses(store, "alice+tag@example.test") == ["alice@example.test"]


async def test_a_disabled_account_receives_nothing_and_its_address_stays_reserved(
        store: Store, alice: Account, bob: Account) -> None:
    await store.add_alias("@example.test", "bob@example.test")
    await store.remove_account("alice@example.test", purge=False)
    assert (await store.resolve_recipient("alice@example.test")).unknown
    await store.add_alias("old@example.test", "alice@example.test")
    assert (await store.resolve_recipient("old@example.test")).unknown


async def test_sender_addresses_are_the_account_and_its_exact_aliases(store: Store, alice: Account,
                                                                     bob: Account) -> None:
    await store.add_alias("sales@example.test", "alice@example.test")
    await store.add_alias("@example.test", "alice@example.test")
    await store.add_alias("info@example.test", "bob@example.test")
    assert await store.sender_addresses("ALICE@example.test") == {"alice@example.test", "sales@example.test"}


async def test_accept_message_delivers_and_queues_in_one_transaction(store: Store, alice: Account,
                                                                     bob: Account) -> None:
    inboxes = [(await store.get_mailbox(account.id, "INBOX")).id for account in (alice, bob)]
    local = b"Return-Path: <a@example.net>\r\n" + MESSAGE
    accepted = await store.accept_message("a@example.net", mailbox_ids=inboxes, local_data=local,
                                          remote_recipients=["x@elsewhere.example"], remote_data=MESSAGE)
    assert [entry.mailbox_id for entry in accepted.appended] == inboxes
    for entry in accepted.appended:
        assert await store.read_message(entry.mailbox_id, entry.uid) == local
    (queued,) = await store.list_queue()
    assert queued.id == accepted.queue_id and queued.sender == "a@example.net"
    assert [r.recipient for r in queued.recipients] == ["x@elsewhere.example"] and queued.size == len(MESSAGE)


async def test_accept_message_stores_nothing_when_queueing_fails(store: Store, alice: Account,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = await store.get_mailbox(alice.id, "INBOX")

    async def broken(*args: object) -> int:
        raise RuntimeError("queue insert failed")

    monkeypatch.setattr(api, "insert_queue_entry", broken)  # the name accept_message calls
    with pytest.raises(RuntimeError):
        await store.accept_message("", mailbox_ids=[inbox.id], local_data=MESSAGE,
                                   remote_recipients=["x@elsewhere.example"], remote_data=MESSAGE)
    assert await store.list_messages(inbox.id) == []


async def test_quota_counts_every_copy_and_refuses_the_whole_message(store: Store, alice: Account,
                                                                    bob: Account) -> None:
    await store.update_account("alice@example.test", quota_bytes=2 * len(MESSAGE) + 10)
    inbox = await store.get_mailbox(alice.id, "INBOX")
    junk = await store.get_mailbox(alice.id, "Junk")
    bob_inbox = await store.get_mailbox(bob.id, "INBOX")
    await store.accept_message("", mailbox_ids=[inbox.id, junk.id], local_data=MESSAGE)
    (recipient,) = (await store.resolve_recipient("alice@example.test")).local
    assert recipient.used_bytes == 2 * len(MESSAGE) and recipient.quota_bytes == 2 * len(MESSAGE) + 10
    assert recipient.has_room_for(10) and not recipient.has_room_for(11)
    with pytest.raises(QuotaExceeded) as caught:
        await store.accept_message("", mailbox_ids=[bob_inbox.id, inbox.id], local_data=MESSAGE)
    assert caught.value.addresses == ("alice@example.test",)
    assert await store.list_messages(bob_inbox.id) == []


async def test_accept_message_needs_somewhere_to_put_it(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.accept_message("a@example.net")
