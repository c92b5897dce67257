"""The in-memory mailbox index (store/index.py): pure updates, and on both backends that it
always agrees with the database, whoever changed it."""

from __future__ import annotations

from random import Random

import pytest
from sqlalchemy import select

from runbox_mta.errors import NotFound
from runbox_mta.store import Store, mailstore, open_store
from runbox_mta.store import models as m
from runbox_mta.store.flags import decode_flags
from runbox_mta.store.index import Changes, FlagChange, MailboxIndex

pytestmark = pytest.mark.timeout(120)

SEEN, FLAGGED = frozenset({"\\Seen"}), frozenset({"\\Flagged"})
MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


def index_of(*messages: tuple[int, int, frozenset[str]]) -> MailboxIndex:
    return MailboxIndex(1, 7, max((modseq for _, modseq, _ in messages), default=0), 10,
                        (FlagChange(*message) for message in messages))


def test_apply_appends_new_messages_updates_changed_ones_and_drops_expunged():
    index = index_of((1, 1, SEEN), (2, 1, frozenset()), (3, 2, SEEN))
    index.apply(Changes(5, 6, (FlagChange(2, 4, FLAGGED | {"$Work"}), FlagChange(4, 5, frozenset()),
                               FlagChange(5, 5, SEEN)), (1,)))
    assert (index.uids, index.modseqs, index.flags) == ([2, 3, 4, 5], [4, 2, 5, 5],
                                                        [FLAGGED | {"$Work"}, SEEN, frozenset(), SEEN])
    assert (index.highestmodseq, index.uidnext, index.keywords) == (5, 6, {"$Work"})


def test_apply_of_an_expunge_of_unknown_uids_changes_nothing_else():
    index = index_of((1, 1, SEEN), (3, 1, SEEN))
    index.apply(Changes(2, 4, (), (2, 9)))
    assert index.uids == [1, 3] and index.highestmodseq == 2


@pytest.mark.parametrize("expunged", [(2, 4), tuple(range(1, 40, 2))])  # one by one; by copying what stays
def test_few_and_many_expunges_leave_the_same_index(expunged):
    index = index_of(*((uid, uid, SEEN if uid % 3 else FLAGGED) for uid in range(1, 41)))
    index.apply(Changes(41, 41, (), expunged))
    kept = [uid for uid in range(1, 41) if uid not in expunged]
    assert (index.uids, index.modseqs) == (kept, kept)
    assert index.flags == [SEEN if uid % 3 else FLAGGED for uid in kept]


def test_a_message_below_the_last_uid_that_was_missing_goes_in_its_place():
    index = index_of((1, 1, SEEN), (5, 1, SEEN))
    index.apply(Changes(2, 6, (FlagChange(3, 2, FLAGGED),), ()))
    assert index.uids == [1, 3, 5] and index.flags[1] == FLAGGED


def test_messages_are_those_of_the_uids_that_exist_and_changed_after_changedsince():
    index = index_of((1, 1, SEEN), (2, 3, FLAGGED), (4, 2, SEEN))
    assert index.messages([1, 2, 3, 4, 9]) == [FlagChange(1, 1, SEEN), FlagChange(2, 3, FLAGGED),
                                                FlagChange(4, 2, SEEN)]
    assert index.messages([1, 2, 3, 4], changedsince=1) == [FlagChange(2, 3, FLAGGED), FlagChange(4, 2, SEEN)]
    assert index.messages([]) == [] and index_of().messages([1]) == []


# --- on a real store --------------------------------------------------------------------------


async def database_truth(store: Store, mailbox_id: int) -> list[FlagChange]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(m.Message.uid, m.Message.modseq, m.Message.system_flags, m.Message.keywords)
                            .where(m.Message.mailbox_id == mailbox_id).order_by(m.Message.uid))).all()
    return [FlagChange(uid, modseq, decode_flags(bits, keywords)) for uid, modseq, bits, keywords in rows]


async def test_the_index_agrees_with_the_database_through_random_changes(store, database_url, monkeypatch):
    await store.add_domain("example.test", "sel", "PEM")
    account = await store.add_account("ola@example.test", "hash")
    inbox = (await store.get_mailbox(account.id, "INBOX")).id
    other_box = (await store.get_mailbox(account.id, "Archive")).id
    other = await open_store(database_url)  # another process (the CLI, a daemon sharing PostgreSQL)
    monkeypatch.setattr(mailstore, "HEAD_TRUST", 0.0)  # so another process's changes show at once
    rng = Random(5)
    try:
        for step in range(120):
            changer = other if rng.random() < 0.3 else store
            uids = (await database_truth(store, inbox))
            picked = sorted(rng.sample([row.uid for row in uids], min(len(uids), rng.randint(1, 4))))
            action = rng.randrange(5) if picked else 0
            if action == 0:
                await changer.append(inbox, MESSAGE, flags=rng.choice([(), ("\\Seen",), ("$Later",)]))
            elif action == 1:
                await changer.update_flags(inbox, picked, rng.choice("+-"), [rng.choice(["\\Seen", "\\Flagged", "$K"])])
            elif action == 2:
                await changer.expunge(inbox, picked)
            elif action == 3:
                await changer.copy_messages(inbox, picked, other_box, move=True)
            else:
                await changer.copy_messages(other_box, [row.uid for row in await database_truth(store, other_box)],
                                            inbox, move=False)
            truth = await database_truth(store, inbox)
            if step % 3 == 0:  # now and then SELECT, which also rebuilds nothing
                snapshot = await store.snapshot(account.id, "INBOX")
                assert snapshot.uids == [row.uid for row in truth], step
            assert await store.flag_rows(inbox, [row.uid for row in truth] + [10_000]) == truth, step
    finally:
        await other.close()


async def test_a_deleted_mailbox_loses_its_index_and_a_new_one_in_its_place_gets_its_own(store):
    await store.add_domain("example.test", "sel", "PEM")
    account = await store.add_account("ola@example.test", "hash")
    box = await store.create_mailbox(account.id, "Lists")
    for _ in range(3):
        await store.append(box.id, MESSAGE)
    assert (await store.snapshot(account.id, "Lists")).uids == [1, 2, 3]
    await store.delete_mailbox(account.id, "Lists")
    with pytest.raises(NotFound):
        await store.flag_rows(box.id, [1])
    assert box.id not in store._indexes
    again = await store.create_mailbox(account.id, "Lists")  # on SQLite, often the same id
    await store.append(again.id, MESSAGE, flags=("\\Seen",))
    snapshot = await store.snapshot(account.id, "Lists")
    assert (snapshot.mailbox_id, snapshot.uids) == (again.id, [1])
    assert [row.flags for row in await store.flag_rows(again.id, [1, 2, 3])] == [SEEN]


async def test_indexes_beyond_the_limit_go_least_recently_used_first(store, monkeypatch):
    await store.add_domain("example.test", "sel", "PEM")
    account = await store.add_account("ola@example.test", "hash")
    monkeypatch.setattr(mailstore, "INDEXED_MESSAGES", 4)
    names = ["INBOX", "Drafts", "Sent"]
    for name in names:
        box = await store.get_mailbox(account.id, name)
        for _ in range(2):
            await store.append(box.id, MESSAGE)
        await store.snapshot(account.id, name)
    assert [store._indexes[key].uidvalidity for key in store._indexes] == [
        (await store.get_mailbox(account.id, name)).uidvalidity for name in names[1:]]
    assert (await store.snapshot(account.id, "INBOX")).uids == [1, 2]  # read again when wanted again
