"""The store, on SQLite and (with RUNBOX_TEST_DATABASE_URL) on PostgreSQL.

Every test taking `store`, `database_url` or `blank_database_url` runs once
per backend (tests/db_fixtures.py).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from runbox_mta.errors import AlreadyExists, NotFound, RunboxError, SchemaOutOfDate
from runbox_mta.imap.search_keys import HeaderContains
from runbox_mta.store import (
    UNCHANGED, Account, Alias, ChangeEvent, ChangeKind, ChangesLost, Mailbox, Store, open_store,
    schema_status, upgrade_schema,
)
from runbox_mta.store import db
from runbox_mta.store.blobs import parse_metadata
from runbox_mta.store.changes import ChangeBus
from runbox_mta.store.committer import Committer
from runbox_mta.store.flags import decode_flags, encode_flags
from runbox_mta.store.models import Base

HEAD = "0002"
MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


# --- helpers ---------------------------------------------------------------------------


async def count_rows(store: Store, table: str) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()


async def every_value(store: Store) -> list[Any]:
    """Every value in every table of the schema."""
    values: list[Any] = []
    async with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in await conn.execute(select(table)):
                values.extend(row)
    return values


def count_commits(store: Store) -> list[int]:
    """A counter bumped by SQLAlchemy on every real COMMIT of the store's engine."""
    counter = [0]
    event.listen(store.committing_engine, "commit", lambda conn: counter.__setitem__(0, counter[0] + 1))
    return counter


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# --- schema ----------------------------------------------------------------------------


async def test_upgrade_creates_the_schema_and_a_second_one_changes_nothing(blank_database_url: str) -> None:
    assert await schema_status(blank_database_url) == (None, HEAD)
    with pytest.raises(SchemaOutOfDate, match=r"has no runbox-mta schema yet: run `runbox-mta db upgrade`"):
        await open_store(blank_database_url)

    await upgrade_schema(blank_database_url)
    assert await schema_status(blank_database_url) == (HEAD, HEAD)
    store = await open_store(blank_database_url)
    await store.add_domain("example.test", "sel", "PEM")
    await store.close()

    await upgrade_schema(blank_database_url)
    assert await schema_status(blank_database_url) == (HEAD, HEAD)
    store = await open_store(blank_database_url)
    assert [domain.name for domain in await store.list_domains()] == ["example.test"]
    await store.close()


async def test_migrated_schema_matches_the_models(store: Store) -> None:
    def differences(conn: Any) -> list[Any]:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)

    async with store.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_store_refuses_a_schema_behind_this_version(database_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "head_revision", lambda: "0003")
    with pytest.raises(SchemaOutOfDate) as caught:
        await open_store(database_url)
    assert str(caught.value) == ("database schema is at 0002, this version needs 0003: "
                                 "run `runbox-mta db upgrade`")


async def migrate(url: str, direction: str, revision: str) -> None:
    """Alembic upgrade or downgrade to `revision`, as `db upgrade` runs it (one transaction)."""
    engine = db.migration_engine(url)

    def run(connection: Any) -> None:
        config = db._alembic_config()
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)
        db.check_references(connection)

    try:
        async with db.connect(db.writer(engine)) as conn, conn.begin():
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def test_upgrade_to_0002_keeps_every_message_and_searches_the_old_ones_from_their_bytes(
        database_url: str) -> None:
    store = await open_store(database_url)
    await store.add_domain("example.test", "sel", "PEM")
    account = await store.add_account("ola@example.test", "hash")
    inbox = await store.get_mailbox(account.id, "INBOX")
    for subject in ("one", "two"):
        await store.append(inbox.id, f"From: ann@example.net\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
    await store.close()
    await migrate(database_url, "downgrade", "0001")  # as the blobs of a store made before 0002
    await upgrade_schema(database_url)
    assert await schema_status(database_url) == (HEAD, HEAD)

    store = await open_store(database_url)
    try:
        assert (await store.read_message(inbox.id, 2)).endswith(b"Subject: two\r\n\r\nbody\r\n")
        old = await store.search_candidates(inbox.id, HeaderContains("Subject", "two"), after_uid=0, limit=10,
                                            data=False)
        assert [(row.uid, row.search_header, row.data is not None) for row in old] == [(1, None, True), (2, None, True)]
        await store.append(inbox.id, b"Subject: three\r\n\r\nbody\r\n")
        new = await store.search_candidates(inbox.id, HeaderContains("Subject", "three"), after_uid=2, limit=10,
                                            data=False)
        assert [(row.uid, row.search_header, row.data) for row in new] == [(3, "subject:three", None)]
        for word, uids in (("two", [2]), ("t", [2, 3]), ("one", [1])):  # decided by the store, old and new alike
            assert await store.search_uids(inbox.id, HeaderContains("Subject", word), up_to_uid=3) == (uids, 0)
        if is_sqlite(database_url):
            async with store.engine.connect() as conn:
                assert (await conn.execute(text("PRAGMA foreign_key_check"))).all() == []
                columns = [row.name for row in await conn.execute(text("PRAGMA table_info(blobs)"))]
            assert columns[-1] == "data"  # reading parsed or search_header skips the message's overflow pages
    finally:
        await store.close()


async def test_a_sqlite_migration_that_breaks_a_reference_is_refused(database_url: str, store: Store) -> None:
    if not is_sqlite(database_url):
        pytest.skip("SQLite only: PostgreSQL enforces foreign keys in every transaction")
    engine = db.migration_engine(database_url)
    try:
        async with db.connect(db.writer(engine)) as conn:
            await conn.run_sync(db.check_references)
            await conn.execute(text("INSERT INTO aliases (domain_id, source, target) VALUES (99, 'a@x', 'b@x')"))
            with pytest.raises(RunboxError, match="would leave 1 broken references; nothing was changed"):
                await conn.run_sync(db.check_references)
            await conn.rollback()
    finally:
        await engine.dispose()


async def test_store_refuses_a_schema_from_a_newer_version(store: Store, database_url: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaOutOfDate, match="at 0099, which this version of runbox-mta does not know"):
        await open_store(database_url)
    assert await schema_status(database_url) == ("0099", HEAD)


# --- domains ---------------------------------------------------------------------------


async def test_domains_round_trip(store: Store) -> None:
    added = await store.add_domain("Example.TEST.", "sel1", "-----BEGIN PRIVATE KEY-----")
    await store.add_domain("another.test", "sel2", "PEM2")
    assert (added.name, added.dkim_selector, added.dkim_private_key) == (
        "example.test", "sel1", "-----BEGIN PRIVATE KEY-----")
    assert added.created_at.tzinfo is not None
    assert "PRIVATE KEY" not in repr(added)
    assert [domain.name for domain in await store.list_domains()] == ["another.test", "example.test"]
    assert await store.get_domain("EXAMPLE.test") == added

    with pytest.raises(AlreadyExists, match=r"^domain example.test is already hosted here$"):
        await store.add_domain("example.test", "x", "y")
    with pytest.raises(NotFound, match=r"^domain nowhere.test is not hosted here$"):
        await store.get_domain("nowhere.test")
    with pytest.raises(RunboxError, match="not a valid domain name"):
        await store.add_domain("bad domain", "x", "y")

    await store.remove_domain("another.test")
    assert [domain.name for domain in await store.list_domains()] == ["example.test"]
    assert (await store.add_domain("Blåbær.test", "sel", "PEM")).name == "xn--blbr-roah.test"  # A-label
    with pytest.raises(NotFound, match=r"^domain another.test is not hosted here$"):
        await store.remove_domain("another.test")


async def test_remove_domain_refuses_while_it_has_accounts(store: Store) -> None:
    await store.add_domain("example.test", "sel", "PEM")
    await store.add_account("a@example.test", "h")
    await store.add_account("b@example.test", "h")
    await store.add_alias("@example.test", "a@example.test")
    with pytest.raises(RunboxError, match=r"^domain example.test still has 2 accounts$"):
        await store.remove_domain("example.test")

    await store.remove_account("a@example.test", purge=True)
    await store.remove_account("b@example.test", purge=False)  # a disabled account still counts
    with pytest.raises(RunboxError, match=r"^domain example.test still has 1 account$"):
        await store.remove_domain("example.test")

    await store.remove_account("b@example.test", purge=True)
    await store.remove_domain("example.test")
    assert await store.list_domains() == []
    assert await store.list_aliases() == []


# --- accounts --------------------------------------------------------------------------


async def test_accounts_round_trip(store: Store) -> None:
    await store.add_domain("example.test", "sel", "PEM")
    bob = await store.add_account("Bob@Example.test", "hash-b", quota_bytes=2 * 1024**3)
    alice = await store.add_account("alice@example.test", "hash-a")
    assert (bob.address, bob.domain, bob.quota_bytes, bob.used_bytes) == ("bob@example.test", "example.test",
                                                                          2 * 1024**3, 0)
    assert (bob.app_passwords_only, bob.no_backup, bob.disabled) == (False, False, False)
    assert await store.get_account("BOB@example.test") == bob
    assert [account.address for account in await store.list_accounts()] == [alice.address, bob.address]

    with pytest.raises(AlreadyExists, match=r"^account bob@example.test already exists$"):
        await store.add_account("bob@example.test", "x")
    with pytest.raises(NotFound, match=r"^domain other.test is not hosted here$"):
        await store.add_account("carol@other.test", "x")
    with pytest.raises(NotFound, match=r"^no such account: carol@example.test$"):
        await store.get_account("carol@example.test")
    with pytest.raises(RunboxError, match="not an email address"):
        await store.add_account("no-at-sign", "x")

    await store.add_domain("blåbær.test", "sel", "PEM")
    utf8 = await store.add_account("Øyvind@Blåbær.test", "hash-ø")  # SMTPUTF8 local part, IDN domain
    assert utf8.address == "øyvind@xn--blbr-roah.test"
    assert await store.get_account("øyvind@blåbær.test") == utf8

    await store.set_password_hash("bob@example.test", "hash-b2")
    login = await store.get_login("bob@example.test")
    assert login is not None and login.password_hash == "hash-b2"
    with pytest.raises(NotFound, match=r"^no such account: carol@example.test$"):
        await store.set_password_hash("carol@example.test", "x")


async def test_update_account_changes_only_what_is_given(store: Store, alice: Account) -> None:
    updated = await store.update_account(alice.address, app_passwords_only=True, quota_bytes=1000)
    assert (updated.app_passwords_only, updated.no_backup, updated.quota_bytes) == (True, False, 1000)
    updated = await store.update_account(alice.address, no_backup=True)
    assert (updated.app_passwords_only, updated.no_backup, updated.quota_bytes) == (True, True, 1000)
    assert (await store.update_account(alice.address, quota_bytes=UNCHANGED)).quota_bytes == 1000
    assert (await store.update_account(alice.address, quota_bytes=None)).quota_bytes is None
    assert await store.get_account(alice.address) == replace(updated, quota_bytes=None)
    with pytest.raises(RunboxError, match="positive"):
        await store.update_account(alice.address, quota_bytes=0)
    with pytest.raises(NotFound, match=r"^no such account: nobody@example.test$"):
        await store.update_account("nobody@example.test", no_backup=True)


async def test_a_new_account_gets_the_default_mailboxes(store: Store, alice: Account) -> None:
    mailboxes = await store.list_mailboxes(alice.id)
    assert [(box.name, box.special_use) for box in mailboxes] == [
        ("INBOX", None), ("Archive", "\\Archive"), ("Drafts", "\\Drafts"), ("Junk", "\\Junk"),
        ("Sent", "\\Sent"), ("Trash", "\\Trash"),
    ]
    assert all(box.subscribed and box.uidnext == 1 and box.highestmodseq == 1 for box in mailboxes)
    assert len({box.uidvalidity for box in mailboxes}) == len(mailboxes)


async def test_a_disabled_account_keeps_its_data_and_reserves_its_address(store: Store, alice: Account,
                                                                         inbox: Mailbox) -> None:
    appended = await store.append(inbox.id, MESSAGE)
    await store.remove_account("Alice@example.test", purge=False)

    assert (await store.get_account(alice.address)).disabled
    login = await store.get_login(alice.address)
    assert login is not None and login.disabled
    assert await store.read_message(inbox.id, appended.uid) == MESSAGE
    with pytest.raises(AlreadyExists, match=r"stays reserved: purge it first"):
        await store.add_account(alice.address, "new-owner")

    await store.remove_account(alice.address, purge=True)
    assert not (await store.add_account(alice.address, "new-owner")).disabled
    with pytest.raises(NotFound, match=r"^no such account: ghost@example.test$"):
        await store.remove_account("ghost@example.test", purge=False)


async def test_purge_removes_every_trace(store: Store, alice: Account, inbox: Mailbox) -> None:
    bob = await store.add_account("bob@example.test", "hash-b")
    bob_inbox = await store.get_mailbox(bob.id, "INBOX")
    sent = await store.get_mailbox(alice.id, "Sent")
    await store.append(inbox.id, b"Subject: alice only\r\n\r\nsecret")
    await store.append(sent.id, b"Subject: sent by alice\r\n\r\nsecret")
    shared = b"Subject: to both\r\n\r\nhello"
    await store.deliver([inbox.id, bob_inbox.id], shared)
    await store.expunge(inbox.id, [1])
    await store.add_app_password(alice.address, "phone", ("imap",), "app-hash")
    await store.add_alias("sales@example.test", alice.address)
    await store.add_alias("sales@example.test", bob.address)
    await store.add_alias(alice.address, "alice@elsewhere.test")
    await store.enqueue(alice.address, ["friend@remote.test"], b"Subject: out\r\n\r\nbye")
    await store.enqueue(bob.address, ["friend@remote.test"], b"Subject: bob out\r\n\r\nbye")

    await store.remove_account(alice.address, purge=True)

    values = await every_value(store)
    assert alice.address not in values
    for table, remaining in (("accounts", 1), ("mailboxes", 6), ("messages", 1), ("expunged", 0),
                             ("app_passwords", 0), ("queue_messages", 1), ("queue_recipients", 1),
                             ("blobs", 2)):  # bob's copy of the shared message and his queued mail
        assert await count_rows(store, table) == remaining, table
    assert not any(isinstance(value, bytes) and b"secret" in value for value in values)
    assert await store.list_aliases() == [Alias("sales@example.test", bob.address)]
    assert await store.read_message(bob_inbox.id, 1) == shared
    assert [entry.sender for entry in await store.list_queue()] == [bob.address]


# --- aliases ---------------------------------------------------------------------------


async def test_aliases_round_trip(store: Store, alice: Account) -> None:
    assert await store.add_alias("Sales@Example.test", "alice@example.test") == Alias(
        "sales@example.test", "alice@example.test")
    await store.add_alias("sales@example.test", "boss@remote.test")
    await store.add_alias("@example.test", "alice@example.test")
    assert await store.list_aliases() == [
        Alias("@example.test", "alice@example.test"),
        Alias("sales@example.test", "alice@example.test"),
        Alias("sales@example.test", "boss@remote.test"),
    ]
    with pytest.raises(AlreadyExists, match=r"^alias sales@example.test -> boss@remote.test already exists$"):
        await store.add_alias("sales@example.test", "BOSS@remote.test")
    with pytest.raises(NotFound, match=r"^domain remote.test is not hosted here$"):
        await store.add_alias("info@remote.test", "alice@example.test")

    await store.remove_alias("sales@example.test")
    assert await store.list_aliases() == [Alias("@example.test", "alice@example.test")]
    with pytest.raises(NotFound, match=r"^no such alias: sales@example.test$"):
        await store.remove_alias("sales@example.test")


# --- app passwords and logins ----------------------------------------------------------


async def test_app_passwords_round_trip(store: Store, alice: Account) -> None:
    phone = await store.add_app_password(alice.address, "phone", ("smtp", "imap"), "hash-phone")
    await store.add_app_password(alice.address, "laptop", ("pop3",), "hash-laptop")
    assert (phone.label, phone.scopes) == ("phone", ("imap", "smtp"))
    listed = await store.list_app_passwords("ALICE@example.test")
    assert [(entry.label, entry.scopes) for entry in listed] == [
        ("laptop", ("pop3",)), ("phone", ("imap", "smtp"))]

    with pytest.raises(AlreadyExists, match=r"^alice@example.test already has an app password labelled 'phone"):
        await store.add_app_password(alice.address, "phone", ("imap",), "x")
    with pytest.raises(RunboxError, match="scopes must be some of imap, pop3, smtp"):
        await store.add_app_password(alice.address, "tv", ("ftp",), "x")
    with pytest.raises(NotFound, match=r"^no such account: bob@example.test$"):
        await store.list_app_passwords("bob@example.test")

    await store.revoke_app_password(alice.address, "phone")
    assert [entry.label for entry in await store.list_app_passwords(alice.address)] == ["laptop"]
    with pytest.raises(NotFound, match=r"^alice@example.test has no app password labelled 'phone'$"):
        await store.revoke_app_password(alice.address, "phone")


async def test_login_record_and_rehash(store: Store, alice: Account) -> None:
    assert await store.get_login("nobody@example.test") is None
    assert await store.get_login("not an address") is None
    await store.add_app_password(alice.address, "phone", ("imap", "smtp"), "hash-phone")
    await store.update_account(alice.address, app_passwords_only=True)

    login = await store.get_login(" Alice@Example.TEST ")
    assert login is not None
    assert (login.account_id, login.address, login.password_hash) == (alice.id, alice.address, "hash-a")
    assert (login.app_passwords_only, login.disabled) == (True, False)
    [credential] = login.app_passwords
    assert (credential.label, credential.scopes, credential.password_hash) == (
        "phone", ("imap", "smtp"), "hash-phone")
    assert "hash" not in repr(login)

    await store.update_password_hash(alice.id, "hash-a2")
    await store.update_app_password_hash(credential.id, "hash-phone2")
    await store.update_password_hash(999_999, "ignored")  # a vanished account is not an error
    login = await store.get_login(alice.address)
    assert login is not None
    assert (login.password_hash, login.app_passwords[0].password_hash) == ("hash-a2", "hash-phone2")


# --- message metadata and flags -------------------------------------------------------


@given(st.binary(max_size=300))
def test_parse_metadata_splits_a_message_at_its_first_empty_line(data: bytes) -> None:
    parsed = parse_metadata(data).parsed
    header, body = data[:parsed["header_size"]], data[parsed["header_size"]:]
    assert parsed["size"] == len(data)
    assert header == data or header in (b"\n", b"\r\n") or header.endswith((b"\n\n", b"\n\r\n"))
    assert b"\n\n" not in header[:-1] and b"\n\r\n" not in header[:-2]  # no earlier empty line
    assert parsed["body_lines"] == len(body.split(b"\n")) - (not body or body.endswith(b"\n"))


FLAG_SPELLINGS = {"\\Seen": "\\Seen", "\\ANSWERED": "\\Answered", "\\flagged": "\\Flagged",
                  "\\Deleted": "\\Deleted", "\\dRAFT": "\\Draft", "$Forwarded": "$Forwarded", "Work": "Work"}


@given(st.sets(st.sampled_from(sorted(FLAG_SPELLINGS))))
def test_flags_survive_encoding_with_system_flags_canonicalised(flags: set[str]) -> None:
    assert decode_flags(*encode_flags(flags)) == {FLAG_SPELLINGS[flag] for flag in flags}


# --- mailboxes -------------------------------------------------------------------------


async def test_create_mailbox(store: Store, alice: Account) -> None:
    before = max(box.uidvalidity for box in await store.list_mailboxes(alice.id))
    created = await store.create_mailbox(alice.id, "Work/Projects/Ørsta", special_use=None)
    assert (created.name, created.uidnext, created.highestmodseq, created.subscribed) == (
        "Work/Projects/Ørsta", 1, 1, True)
    assert created.uidvalidity > before
    assert await store.get_mailbox(alice.id, "Work/Projects/Ørsta") == created
    assert (await store.get_mailbox(alice.id, "inbox")).name == "INBOX"
    assert (await store.create_mailbox(alice.id, "inbox/Sub")).name == "INBOX/Sub"

    with pytest.raises(AlreadyExists, match=r"^mailbox Work/Projects/Ørsta already exists$"):
        await store.create_mailbox(alice.id, "Work/Projects/Ørsta")
    with pytest.raises(AlreadyExists, match=r"^mailbox INBOX already exists$"):
        await store.create_mailbox(alice.id, "Inbox")
    with pytest.raises(NotFound, match=r"^no such mailbox: Nope$"):
        await store.get_mailbox(alice.id, "Nope")
    with pytest.raises(NotFound, match=r"^no such account id: 999999$"):
        await store.create_mailbox(999_999, "Work")
    for bad in ("", "/Work", "Work/", "a//b", "tab\there"):
        with pytest.raises(RunboxError, match="invalid mailbox name"):
            await store.create_mailbox(alice.id, bad)
    with pytest.raises(RunboxError, match="unknown special-use"):
        await store.create_mailbox(alice.id, "Spam", special_use="\\Spam")


# --- messages --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(MESSAGE, id="crlf"),
    pytest.param(b"Subject: 8bit\r\n\r\nBl\xe5b\xe6r\xf8l \xc3\xa6\xc3\xb8\xc3\xa5\r\n\x80\xff", id="8bit"),
    pytest.param(b"Subject: nul\r\n\r\nbefore\x00after\x00\r\n", id="nul"),
    pytest.param(b"Subject: bare lf\n\nline\nline\n", id="bare-lf"),
    pytest.param(b"", id="empty"),
    pytest.param(b"Subject: big\r\n\r\n" + os.urandom(5 * 1024 * 1024), id="5MB"),
])
async def test_a_message_reads_back_byte_for_byte(store: Store, inbox: Mailbox, data: bytes) -> None:
    appended = await store.append(inbox.id, data)
    assert await store.read_message(inbox.id, appended.uid) == data
    [info] = await store.list_messages(inbox.id)
    assert (info.uid, info.size) == (appended.uid, len(data))


async def test_append_keeps_flags_and_the_internal_date_zone(store: Store, inbox: Mailbox) -> None:
    oslo = timezone(timedelta(hours=2))
    when = datetime(2024, 6, 1, 12, 30, 15, tzinfo=oslo)
    appended = await store.append(inbox.id, MESSAGE, flags=("\\seen", "\\Flagged", "$Forwarded", "Work"),
                                  internal_date=when)
    assert (appended.mailbox_id, appended.uid, appended.modseq, appended.uidvalidity) == (
        inbox.id, 1, 2, inbox.uidvalidity)
    [info] = await store.list_messages(inbox.id)
    assert info.flags == frozenset({"\\Seen", "\\Flagged", "$Forwarded", "Work"})
    assert info.internal_date == when and info.internal_date.utcoffset() == timedelta(hours=2)
    with pytest.raises(ValueError, match="not a storable system flag"):
        await store.append(inbox.id, MESSAGE, flags=("\\Recent",))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.append(inbox.id, MESSAGE, internal_date=datetime(2024, 1, 1))


async def test_missing_messages_and_mailboxes_are_not_found(store: Store, inbox: Mailbox) -> None:
    with pytest.raises(NotFound, match=rf"^no message with UID 7 in mailbox {inbox.id}$"):
        await store.read_message(inbox.id, 7)
    with pytest.raises(NotFound, match=r"^no such mailbox id: 999999$"):
        await store.list_messages(999_999)
    with pytest.raises(NotFound, match=r"^no such mailbox id: 999999$"):
        await store.append(999_999, MESSAGE)
    assert await store.list_messages(inbox.id) == []


@pytest.mark.timeout(30)
async def test_concurrent_appends_get_gap_free_increasing_uids_and_modseqs(store: Store,
                                                                           inbox: Mailbox) -> None:
    results = await asyncio.gather(*(store.append(inbox.id, b"Subject: %d\r\n\r\n" % i) for i in range(200)))
    by_uid = sorted(results, key=lambda appended: appended.uid)
    assert [appended.uid for appended in by_uid] == list(range(1, 201))
    assert [appended.modseq for appended in by_uid] == list(range(2, 202))
    mailbox = await store.get_mailbox(inbox.account_id, "INBOX")
    assert (mailbox.uidnext, mailbox.highestmodseq) == (201, 201)
    assert [info.uid for info in await store.list_messages(inbox.id)] == list(range(1, 201))


@pytest.mark.timeout(30)
async def test_two_stores_appending_to_one_mailbox_share_one_uid_sequence(
        store: Store, inbox: Mailbox, database_url: str) -> None:
    other = await open_store(database_url)  # another daemon: its own engine and committer
    try:
        results = await asyncio.gather(*(
            (store if i % 2 else other).append(inbox.id, b"Subject: %d\r\n\r\n" % i) for i in range(200)))
    finally:
        await other.close()
    assert sorted(appended.uid for appended in results) == list(range(1, 201))
    assert sorted(appended.modseq for appended in results) == list(range(2, 202))
    infos = await store.list_messages(inbox.id)
    assert [info.uid for info in infos] == list(range(1, 201))
    assert [info.modseq for info in infos] == list(range(2, 202))  # UID order is MODSEQ order


@pytest.mark.timeout(30)
async def test_group_commit_batches_concurrent_appends(store: Store, inbox: Mailbox) -> None:
    commits = count_commits(store)
    before = store.stats.commits
    await store.append(inbox.id, MESSAGE)
    assert store.stats.commits - before == 1 and commits[0] == 1  # a lone append commits alone

    results = await asyncio.gather(*(store.append(inbox.id, MESSAGE) for _ in range(200)))
    committed = store.stats.commits - before - 1
    assert len({appended.uid for appended in results}) == 200
    assert 1 <= committed <= 200 / 4
    assert commits[0] - 1 == committed


@pytest.mark.timeout(30)
async def test_a_failing_job_fails_only_its_own_caller(store: Store, alice: Account, inbox: Mailbox) -> None:
    before = store.stats.commits
    blobs = await count_rows(store, "blobs")
    outcomes = await asyncio.gather(
        *(store.append(inbox.id, MESSAGE) for _ in range(10)),
        store.append(999_999, MESSAGE),
        store.deliver([inbox.id, 999_999], MESSAGE),  # its first UID and blob must roll back too
        *(store.append(inbox.id, MESSAGE) for _ in range(10)),
        return_exceptions=True,
    )
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert [str(failure) for failure in failures] == ["no such mailbox id: 999999"] * 2
    assert store.stats.commits - before == 1  # one batch, committed despite the failures
    successes = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    assert sorted(appended.uid for appended in successes) == list(range(1, 21))
    assert (await store.get_mailbox(alice.id, "INBOX")).uidnext == 21
    assert await count_rows(store, "blobs") == blobs + 20


async def test_a_database_error_in_one_job_rolls_back_only_that_job(store: Store) -> None:
    committer = Committer(store.engine, publish=lambda events: None)

    async def insert_domain(name: str) -> Any:
        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            await conn.execute(text("INSERT INTO domains (name, dkim_selector, dkim_private_key, created_at) "
                                    "VALUES (:name, 's', 'k', CURRENT_TIMESTAMP)"), {"name": name})
        return await committer.submit(job)

    async def bad_sql(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
        await conn.execute(text("INSERT INTO domains (name) VALUES ('half.test')"))  # NOT NULL violations

    outcomes = await asyncio.gather(insert_domain("one.test"), committer.submit(bad_sql),
                                    insert_domain("two.test"), return_exceptions=True)
    await committer.close()
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], DBAPIError)
    assert committer.stats.commits == 1
    assert [domain.name for domain in await store.list_domains()] == ["one.test", "two.test"]


async def test_a_deadlocked_job_is_retried_in_the_next_batch(store: Store) -> None:
    committer = Committer(store.engine, publish=lambda events: None)
    attempts = 0

    class Deadlock(Exception):
        sqlstate = "40P01"

    async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:  # the batch without savepoints, then its rerun with them
            raise DBAPIError("UPDATE mailboxes ...", {}, Deadlock())
        return "done"

    assert await committer.submit(job) == "done"
    await committer.close()
    assert (attempts, committer.stats.commits) == (3, 2)


def test_run_job_drives_a_job_that_only_awaits_its_connection_and_refuses_any_other_wait() -> None:
    class Conn:
        async def execute(self, value: int) -> int:
            return value

    async def job(conn: Conn) -> int:
        return await conn.execute(1) + await conn.execute(2)

    async def waits_on_the_loop(conn: Conn) -> int:
        await asyncio.sleep(0)
        return 0

    assert db.run_job(job(Conn())) == 3
    with pytest.raises(RuntimeError, match="awaited something other than its connection"):
        db.run_job(waits_on_the_loop(Conn()))


async def test_a_batch_whose_jobs_all_succeed_runs_without_savepoints(store: Store, inbox: Mailbox) -> None:
    """A SAVEPOINT and its RELEASE per job would be a third of a delivery's statements."""
    statements: list[str] = []
    event.listen(store.committing_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: statements.append(statement))
    await asyncio.gather(*(store.append(inbox.id, MESSAGE) for _ in range(5)))
    assert statements and not any("SAVEPOINT" in statement.upper() for statement in statements)


async def test_close_finishes_queued_writes(database_url: str) -> None:
    store = await open_store(database_url)
    await store.add_domain("example.test", "sel", "PEM")
    account = await store.add_account("alice@example.test", "h")
    inbox = await store.get_mailbox(account.id, "INBOX")
    appends = [asyncio.create_task(store.append(inbox.id, MESSAGE)) for _ in range(20)]
    await asyncio.sleep(0)  # the appends are queued, not yet committed
    await store.close()
    assert sorted(appended.uid for appended in await asyncio.gather(*appends)) == list(range(1, 21))
    with pytest.raises(RunboxError, match="closed"):
        await store.append(inbox.id, MESSAGE)

    reopened = await open_store(database_url)
    assert len(await reopened.list_messages(inbox.id)) == 20
    await reopened.close()


async def test_message_rows_leave_the_parsed_structure_out_when_not_asked(store: Store, inbox: Mailbox) -> None:
    appended = await store.append(inbox.id, MESSAGE)
    (full,) = await store.message_rows(inbox.id, [appended.uid], data=False)
    (lean,) = await store.message_rows(inbox.id, [appended.uid], data=False, structure=False)
    assert full.parsed is not None and full.parsed["size"] == len(MESSAGE)
    assert lean.parsed is None and (lean.uid, lean.flags, lean.size) == (full.uid, full.flags, full.size)


async def test_deliver_stores_one_blob_for_every_recipient(store: Store, alice: Account,
                                                           inbox: Mailbox) -> None:
    bob = await store.add_account("bob@example.test", "h")
    bob_inbox = await store.get_mailbox(bob.id, "INBOX")
    archive = await store.get_mailbox(alice.id, "Archive")
    await store.append(inbox.id, b"Subject: earlier\r\n\r\n")
    blobs = await count_rows(store, "blobs")

    delivered = await store.deliver([inbox.id, bob_inbox.id, archive.id], MESSAGE)

    assert await count_rows(store, "blobs") == blobs + 1
    assert [(entry.mailbox_id, entry.uid) for entry in delivered] == [
        (inbox.id, 2), (bob_inbox.id, 1), (archive.id, 1)]
    assert [entry.uidvalidity for entry in delivered] == [inbox.uidvalidity, bob_inbox.uidvalidity,
                                                          archive.uidvalidity]
    for entry in delivered:
        assert await store.read_message(entry.mailbox_id, entry.uid) == MESSAGE
    assert (await store.get_account(bob.address)).used_bytes == len(MESSAGE)


async def test_expunge_leaves_tombstones_and_frees_unreferenced_blobs(store: Store, alice: Account,
                                                                      inbox: Mailbox) -> None:
    archive = await store.get_mailbox(alice.id, "Archive")
    for number in range(3):
        await store.append(inbox.id, b"Subject: %d\r\n\r\n" % number)
    await store.deliver([inbox.id, archive.id], MESSAGE)  # UID 4 in INBOX shares its blob
    blobs = await count_rows(store, "blobs")

    await store.expunge(inbox.id, [2, 4, 99])
    box = await store.get_mailbox(alice.id, "INBOX")
    assert [info.uid for info in await store.list_messages(inbox.id)] == [1, 3]
    async with store.engine.connect() as conn:
        tombstones = (await conn.execute(text("SELECT uid, modseq FROM expunged WHERE mailbox_id = :id "
                                              "ORDER BY uid"), {"id": inbox.id})).all()
    assert [tuple(row) for row in tombstones] == [(2, box.highestmodseq), (4, box.highestmodseq)]
    assert box.highestmodseq == 6  # 4 appends, then one MODSEQ for the whole expunge
    assert await count_rows(store, "blobs") == blobs - 1  # the shared blob is still Archive's

    await store.expunge(inbox.id, [2, 99])  # nothing left to expunge: no MODSEQ spent
    assert (await store.get_mailbox(alice.id, "INBOX")).highestmodseq == 6
    await store.expunge(archive.id, [1])
    assert await count_rows(store, "blobs") == blobs - 2
    with pytest.raises(NotFound, match=r"^no such mailbox id: 999999$"):
        await store.expunge(999_999, [1])


async def test_expunge_for_a_no_backup_account_leaves_nothing_of_the_message(
        store: Store, alice: Account, inbox: Mailbox, database_url: str) -> None:
    await store.update_account(alice.address, no_backup=True)
    marker = os.urandom(16).hex().encode()
    secret = b"Subject: " + marker + b"\r\n\r\n" + marker * 10_000
    appended = await store.append(inbox.id, secret, flags=("$Secret",))
    await store.append(inbox.id, MESSAGE)

    await store.expunge(inbox.id, [appended.uid])

    values = await every_value(store)
    assert not any(isinstance(value, (bytes, str)) and marker.decode() in str(value) for value in values)
    assert "$Secret" not in values
    if is_sqlite(database_url):  # secure_delete + WAL checkpoint: not even in the files
        directory = Path(make_url(database_url).database).parent
        for path in directory.iterdir():
            assert marker not in path.read_bytes(), path.name


# --- change events ---------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_change_events_are_published_after_commit(store: Store, alice: Account, inbox: Mailbox,
                                                        database_url: str) -> None:
    other = await open_store(database_url)  # its own connections: it sees only committed data

    async def first_change_and_its_bytes() -> tuple[ChangeEvent, bytes]:
        change = await mailbox_events.get()
        return change, await other.read_message(change.mailbox_id, change.uid)

    with store.subscribe(mailbox_id=inbox.id) as mailbox_events, \
            store.subscribe(account_id=alice.id) as account_events:
        watcher = asyncio.create_task(first_change_and_its_bytes())
        failed, appended = await asyncio.gather(
            store.append(999_999, b"lost"), store.append(inbox.id, MESSAGE), return_exceptions=True)
        assert await asyncio.wait_for(watcher, 10) == (
            ChangeEvent(alice.id, inbox.id, appended.uid, appended.modseq, ChangeKind.APPEND), MESSAGE)

        await store.expunge(inbox.id, [appended.uid])
        assert [await account_events.get(), await account_events.get()] == [
            ChangeEvent(alice.id, inbox.id, 1, 2, ChangeKind.APPEND),
            ChangeEvent(alice.id, inbox.id, 1, 3, ChangeKind.EXPUNGE),
        ]
        with pytest.raises(TimeoutError):  # the failed append published nothing
            await asyncio.wait_for(account_events.get(), 0.05)
    await other.close()
    assert isinstance(failed, NotFound)


async def test_a_subscriber_that_falls_behind_is_told_to_resync() -> None:
    bus = ChangeBus(max_pending=2)
    with bus.subscribe(mailbox_id=1) as flooded, bus.subscribe(mailbox_id=2) as elsewhere:
        bus.publish([ChangeEvent(1, 1, uid, uid + 1, ChangeKind.APPEND) for uid in (1, 2, 3)])
        with pytest.raises(ChangesLost):
            await flooded.get()
        with pytest.raises(TimeoutError):  # events go only to their own mailbox's subscribers
            await asyncio.wait_for(elsewhere.get(), 0.05)


# --- outbound queue --------------------------------------------------------------------


async def test_queue_round_trip(store: Store, alice: Account) -> None:
    blobs = await count_rows(store, "blobs")
    first = await store.enqueue("Alice@example.test", ["Bob@Remote.test", "carol@other.test"], MESSAGE)
    second = await store.enqueue("", ["postmaster@remote.test"], b"bounce")
    entries = await store.list_queue()
    assert [(entry.id, entry.sender, entry.size) for entry in entries] == [
        (first, "alice@example.test", len(MESSAGE)), (second, "", 6)]
    assert [(recipient.recipient, recipient.status, recipient.attempts)
            for recipient in entries[0].recipients] == [("bob@remote.test", "queued", 0),
                                                         ("carol@other.test", "queued", 0)]
    assert await count_rows(store, "blobs") == blobs + 2

    await store.remove_queued(first)
    assert [entry.id for entry in await store.list_queue()] == [second]
    assert await count_rows(store, "blobs") == blobs + 1
    assert await count_rows(store, "queue_recipients") == 1
    with pytest.raises(NotFound, match=rf"^no such queue entry: {first}$"):
        await store.remove_queued(first)
