"""The MX, as a remote server sees it: transcripts over real sockets against the real daemon,
on SQLite and (with RUNBOX_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from sqlalchemy import text

from runbox_mta.app import Daemon
from runbox_mta.smtp import codes
from runbox_mta.smtp.policy import HARD_ERROR_LIMIT, JUNK_COMMAND_LIMIT
from runbox_mta.store import CommitFailed
from tests.smtp_helpers import (  # noqa: F401  (fixtures)
    ALICE, BOB, HOSTNAME, MX, SUBMISSION, MailFactory, SmtpClient, dns_server, mail, messages_in, start_mail,
)

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"From: Sender <sender@example.net>\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\nHi Alice.\r\n"
EHLO_REPLY = "\n".join([
    f"250-{HOSTNAME}", "250-PIPELINING", "250-SIZE 52428800", "250-8BITMIME", "250-SMTPUTF8",
    "250-ENHANCEDSTATUSCODES", "250 STARTTLS",
])


async def greeted(daemon: Daemon) -> SmtpClient:
    client = await SmtpClient.connect(daemon, MX)
    assert await client.reply() == f"220 {HOSTNAME} ESMTP"
    return client


async def count_blobs(daemon: Daemon) -> int:
    assert daemon.services is not None
    async with daemon.services.store.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM blobs"))).scalar_one()


async def test_ehlo_advertises_the_extensions_and_helo_works_too(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.transcript([
        ("EHLO client.example.net", EHLO_REPLY),
        ("HELO client.example.net", f"250 {HOSTNAME}"),
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("QUIT", codes.BYE),
    ])


async def test_commands_out_of_sequence(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SEND_HELO_FIRST),
        ("EHLO client.example.net", EHLO_REPLY),
        ("RCPT TO:<alice@example.test>", codes.NEED_MAIL),
        ("DATA", codes.NEED_RCPT),
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("MAIL FROM:<sender@example.net>", codes.NESTED_MAIL),
        ("DATA", codes.NEED_RCPT),
        ("RSET", codes.OK),
        ("RCPT TO:<alice@example.test>", codes.NEED_MAIL),
        ("NOOP", codes.OK),
        ("VRFY alice@example.test", codes.CANNOT_VRFY),
        ("EXPN staff", codes.EXPN_DISABLED),
        ("AUTH PLAIN", codes.AUTH_NOT_ENABLED),
        ("QUIT", codes.BYE),
    ])


async def test_recipients_are_checked_at_rcpt(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<nobody@example.test>", codes.UNKNOWN_USER),
        ("RCPT TO:<someone@elsewhere.example>", codes.RELAY_DENIED),
        ("RCPT TO:<not-an-address>", codes.BAD_RECIPIENT),
        ("RCPT TO:<jøran@example.test>", codes.NON_ASCII_ADDRESS),
        ("RCPT TO:<Alice@EXAMPLE.test>", codes.RECIPIENT_OK),
    ])


async def test_bare_postmaster_is_postmaster_of_the_domain_this_host_serves(mail: Daemon) -> None:
    """RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" without a domain MUST be accepted; here it is
    postmaster@mail.example.test or, as that domain is not hosted, postmaster@example.test."""
    assert mail.services is not None
    client = await greeted(mail)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<Postmaster>", codes.UNKNOWN_USER),  # nobody receives it yet: the operator's to fix
    ])
    await mail.services.store.add_alias("postmaster@example.test", ALICE)
    await client.transcript([
        ("RCPT TO:<Postmaster>", codes.RECIPIENT_OK),
        ("RCPT TO:<POSTMASTER>", codes.RECIPIENT_OK),
        ("RCPT TO:<postmaster-not>", codes.BAD_RECIPIENT),
        ("DATA", codes.START_DATA),
    ])
    client.send("Subject: to the postmaster\r\n\r\nHello.\r\n.\r\n")
    assert (await client.reply()).startswith("250 ")
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert stored.endswith(b"Subject: to the postmaster\r\n\r\nHello.\r\n")


async def test_smtputf8_addresses_need_the_smtputf8_parameter(mail: Daemon) -> None:
    assert mail.services is not None
    await mail.services.store.add_account("jøran@example.test", "unused-hash")
    client = await greeted(mail)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<jøran@example.net>", codes.NON_ASCII_ADDRESS),
        ("MAIL FROM:<jøran@example.net> SMTPUTF8 BODY=8BITMIME", codes.SENDER_OK),
        ("RCPT TO:<Jøran@example.test>", codes.RECIPIENT_OK),
        ("DATA", codes.START_DATA),
    ])
    client.send("From: jøran@example.net\r\nSubject: blåbær\r\n\r\nHei!\r\n.\r\n")
    assert (await client.reply()).startswith("250 ")
    (stored,) = await messages_in(mail.services.store, "jøran@example.test")
    assert stored.startswith("Return-Path: <jøran@example.net>\r\n".encode())
    assert stored.endswith("Subject: blåbær\r\n\r\nHei!\r\n".encode())


async def test_a_listener_without_tls_offers_no_starttls(start_mail: MailFactory) -> None:
    daemon = await start_mail(listeners=(("smtp", "none"),))
    client = await greeted(daemon)
    await client.transcript([
        ("EHLO client.example.net", EHLO_REPLY.replace("250-ENHANCEDSTATUSCODES\n250 STARTTLS",
                                                       "250 ENHANCEDSTATUSCODES")),
        ("STARTTLS", codes.TLS_NOT_AVAILABLE),
    ])


async def test_a_message_lands_in_the_inbox_byte_for_byte_with_the_trace_fields(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.ehlo("mx.example.net")
    reply = await client.send_mail("sender@example.net", [ALICE], MESSAGE)
    queue_id = re.fullmatch(r"250 2\.0\.0 OK: queued as ([A-Z0-9]+)", reply)
    assert queue_id, reply
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    trace, original = stored[:-len(MESSAGE)], stored[-len(MESSAGE):]
    assert original == MESSAGE
    assert re.fullmatch(
        rb"Return-Path: <sender@example\.net>\r\n"
        rb"Authentication-Results: mail\.example\.test;\r\n\tspf=none smtp\.mailfrom=example\.net;\r\n"
        rb"\tdkim=none;\r\n\tdmarc=none header\.from=example\.net\r\n"
        rb"Received: from mx\.example\.net \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby mail\.example\.test \(runbox-mta\) \(no TLS\)\r\n"
        rb"\twith ESMTP id " + queue_id.group(1).encode() + rb"; \w{3}, \d\d \w{3} \d{4} [\d:]{8} \+0000\r\n",
        trace), trace.decode()


async def test_pipelined_transaction_and_dot_stuffing(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.ehlo()
    client.send("MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                "DATA\r\n")
    assert [await client.reply() for _ in range(4)] == [
        codes.SENDER_OK, codes.RECIPIENT_OK, codes.RECIPIENT_OK, codes.START_DATA]
    client.send(b"Subject: dots\r\n\r\n..\r\n..leading\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.0.0 OK: queued as ")
    assert mail.services is not None
    for address in (ALICE, BOB):
        (stored,) = await messages_in(mail.services.store, address)
        assert stored.endswith(b"\r\nSubject: dots\r\n\r\n.\r\n.leading\r\n")
    assert await count_blobs(mail) == 1  # one stored copy for both recipients


async def test_aliases_catch_all_and_plus_addressing_deliver_one_copy_per_account(mail: Daemon) -> None:
    assert mail.services is not None
    store = mail.services.store
    await store.add_alias("team@example.test", ALICE)
    await store.add_alias("team@example.test", BOB)
    await store.add_alias("@example.test", BOB)
    client = await greeted(mail)
    await client.ehlo()
    reply = await client.send_mail("sender@example.net",
                       ["team@example.test", "alice+news@example.test", "whoever@example.test"], MESSAGE)
    assert reply.startswith("250 ")
    assert len(await messages_in(store, ALICE)) == 1
    assert len(await messages_in(store, BOB)) == 1


async def test_an_alias_forwarding_elsewhere_queues_a_copy_without_return_path(mail: Daemon) -> None:
    assert mail.services is not None
    store = mail.services.store
    await store.add_alias("fwd@example.test", "friend@elsewhere.example")
    await store.add_alias("fwd@example.test", ALICE)
    client = await greeted(mail)
    await client.ehlo()
    assert (await client.send_mail("sender@example.net", ["fwd@example.test"], MESSAGE)).startswith("250 ")
    (queued,) = await store.list_queue()
    assert queued.sender == "sender@example.net"
    assert [r.recipient for r in queued.recipients] == ["friend@elsewhere.example"]
    (local,) = await messages_in(store, ALICE)
    assert local.startswith(b"Return-Path: ") and queued.size == len(local) - len(b"Return-Path: <sender@example.net>\r\n")


async def test_null_sender_bounces_are_accepted(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.ehlo()
    assert (await client.send_mail("", [ALICE], MESSAGE)).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert stored.startswith(b"Return-Path: <>\r\n")


@pytest.mark.parametrize("smuggled", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r"])
async def test_smuggling_never_ends_data_and_the_message_is_refused_whole(mail: Daemon, smuggled: bytes) -> None:
    client = await greeted(mail)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.RECIPIENT_OK),
        ("DATA", codes.START_DATA),
    ])
    client.send(b"Subject: one\r\n\r\nfirst" + smuggled
                + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: two\r\n\r\n"
                + b"smuggled\r\n.\r\n")
    assert await client.reply() == codes.BARE_LINE_ENDING
    assert await client.command("NOOP") == codes.OK  # the very next reply: nothing else was executed
    assert mail.services is not None
    assert await messages_in(mail.services.store, ALICE) == []
    assert await messages_in(mail.services.store, BOB) == []


async def test_garbage_and_binary_get_500_until_the_error_limit_then_421(mail: Daemon) -> None:
    client = await greeted(mail)
    garbage = [b"XYZZY\r\n", b"\x00\xff\xfe binary\r\n", b"\r\n", b"\x16\x03\x01\x02\x00\x01\x00\r\n"]
    for i in range(HARD_ERROR_LIMIT - 1):
        client.send(garbage[i % len(garbage)])
        assert await client.reply() in (codes.UNRECOGNISED, codes.BAD_SYNTAX)
    assert await client.command("NOOP") == codes.OK  # still alive, one error short of the limit
    client.send(b"MORE GARBAGE\r\nNOOP\r\nNOOP\r\n")
    assert await client.reply() == codes.UNRECOGNISED
    assert await client.reply() == codes.TOO_MANY_ERRORS
    assert await client.rest() == b""  # closed, and the pipelined NOOPs were never answered
    assert await (await greeted(mail)).command("NOOP") == codes.OK  # the daemon is fine


@pytest.mark.parametrize("index", [MX, SUBMISSION])
async def test_random_hostile_input_gets_replies_and_never_a_crash(mail: Daemon, index: int) -> None:
    rng = random.Random(5321 + index)
    verbs = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"VRFY", b"AUTH", b"AUTH PLAIN",
             b"AUTH LOGIN", b"NOOP", b"HELP", b"", b"\xff\xfe"]
    alphabet = b"<>@:.\x00\x01\r\xc3\xa6\xff \t\"\\azAZ09+=/*-"
    for _ in range(4):
        client = await SmtpClient.connect(mail, index)
        lines = [rng.choice(verbs) + bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
                 for _ in range(25)]
        client.send(b"\r\n".join(lines) + b"\r\n.\r\nQUIT\r\n")
        replies = (await client.rest()).decode("utf-8").split("\r\n")
        assert replies[-1] == ""
        assert all(re.fullmatch(r"[2345]\d\d([ -].*)?", reply) for reply in replies[:-1]), replies


async def test_too_many_commands_without_a_message(mail: Daemon) -> None:
    client = await greeted(mail)
    client.send("NOOP\r\n" * (JUNK_COMMAND_LIMIT + 2))
    assert [await client.reply() for _ in range(JUNK_COMMAND_LIMIT)] == [codes.OK] * JUNK_COMMAND_LIMIT
    assert await client.reply() == codes.TOO_MANY_COMMANDS
    assert await client.rest() == b""


async def test_size_line_and_recipient_limits(start_mail: MailFactory) -> None:
    daemon = await start_mail(limits='message_size = "2K"\nrecipients_per_message = 2')
    client = await greeted(daemon)
    assert "250-SIZE 2048" in await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net> SIZE=4096", codes.MESSAGE_TOO_BIG),
        ("MAIL FROM:<sender@example.net> SIZE=100", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.RECIPIENT_OK),
        ("RCPT TO:<bob@example.test>", codes.RECIPIENT_OK),
        ("RCPT TO:<alice+2@example.test>", codes.TOO_MANY_RECIPIENTS),
        ("DATA", codes.START_DATA),
    ])
    client.send(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n.\r\n")
    assert await client.reply() == codes.TOO_MUCH_DATA
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.RECIPIENT_OK),
        ("DATA", codes.START_DATA),
    ])
    client.send(b"Subject: long line\r\n\r\n" + b"x" * 1500 + b"\r\n.\r\n")
    assert await client.reply() == codes.LINE_TOO_LONG
    assert await client.command("NOOP " + "x" * 600) == codes.COMMAND_TOO_LONG
    assert daemon.services is not None
    assert await messages_in(daemon.services.store, ALICE) == []


async def test_quota_is_checked_at_rcpt_and_at_data(mail: Daemon) -> None:
    assert mail.services is not None
    await mail.services.store.update_account(ALICE, quota_bytes=1000)
    client = await greeted(mail)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net> SIZE=2000", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.MAILBOX_FULL_AT_RCPT),
        ("RSET", codes.OK),
    ])
    reply = await client.send_mail("sender@example.net", [ALICE], MESSAGE + b"x" * 500 + b"\r\n" + b"y" * 500 + b"\r\n")
    assert reply == codes.MAILBOX_FULL_AT_DATA
    assert (await client.send_mail("sender@example.net", [ALICE], MESSAGE)).startswith("250 ")


async def test_a_storage_failure_answers_451_and_a_retry_succeeds(mail: Daemon,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert mail.services is not None
    store = mail.services.store

    async def failing_commit(*args: object, **kwargs: object) -> None:
        raise CommitFailed("the database did not store the change: disk full")

    client = await greeted(mail)
    await client.ehlo()
    with monkeypatch.context() as patch:
        patch.setattr(store, "accept_message", failing_commit)
        assert await client.send_mail("sender@example.net", [ALICE], MESSAGE) == codes.STORAGE_FAILURE
    assert await messages_in(store, ALICE) == []
    assert (await client.send_mail("sender@example.net", [ALICE], MESSAGE)).startswith("250 ")
    assert len(await messages_in(store, ALICE)) == 1


async def test_a_bug_in_a_hook_is_counted_and_answered_451(start_mail: MailFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = await start_mail(expected_crashes=1)
    assert daemon.services is not None

    async def broken(address: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(daemon.services.store, "resolve_recipient", broken)
    client = await greeted(daemon)
    await client.ehlo()
    await client.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.INTERNAL_ERROR),
        ("NOOP", codes.OK),
    ])


async def test_concurrent_sessions_share_commits(mail: Daemon) -> None:
    assert mail.services is not None
    store = mail.services.store
    before = store.stats.commits, store.stats.jobs
    clients = [await greeted(mail) for _ in range(20)]
    for client in clients:  # every session stops just before its final dot ...
        await client.ehlo()
        await client.transcript([("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
                                 (f"RCPT TO:<{ALICE}>", codes.RECIPIENT_OK), ("DATA", codes.START_DATA)])
    for client in clients:  # ... then all messages end at once
        client.send(MESSAGE + b".\r\n")
    replies = await asyncio.gather(*(client.reply() for client in clients))
    assert all(reply.startswith("250 ") for reply in replies)
    assert len(await messages_in(store, ALICE)) == 20
    commits, jobs = store.stats.commits - before[0], store.stats.jobs - before[1]
    assert jobs == 20 and commits < jobs


async def test_idle_clients_are_timed_out(start_mail: MailFactory) -> None:
    daemon = await start_mail(limits='smtp_idle_timeout = "0.3s"')
    client = await greeted(daemon)
    assert await client.reply() == codes.TIMEOUT
    assert await client.rest() == b""


async def test_connections_per_client_address_are_limited(start_mail: MailFactory) -> None:
    daemon = await start_mail(limits="connections_per_address = 2")
    first, second = await greeted(daemon), await greeted(daemon)
    third = await SmtpClient.connect(daemon, MX)
    assert await third.reply() == codes.BUSY
    assert await third.rest() == b""
    await first.command("QUIT")
    await first.rest()
    await asyncio.sleep(0.05)
    assert await (await greeted(daemon)).command("NOOP") == codes.OK
    second.close()


async def test_shutdown_says_421_to_open_sessions(mail: Daemon) -> None:
    client = await greeted(mail)
    await client.ehlo()
    await mail.stop(grace=0.1)
    assert await client.reply() == codes.SHUTTING_DOWN
    assert await client.rest() == b""


async def test_a_drain_ends_idle_sessions_at_once_and_lets_a_message_being_sent_finish(mail: Daemon) -> None:
    idle = await greeted(mail)
    await idle.ehlo()
    busy = await greeted(mail)
    await busy.ehlo()
    await busy.transcript([
        ("MAIL FROM:<sender@example.net>", codes.SENDER_OK),
        ("RCPT TO:<alice@example.test>", codes.RECIPIENT_OK),
        ("DATA", codes.START_DATA),
    ])
    busy.send(MESSAGE.decode())
    stopping = asyncio.create_task(mail.stop(grace=60))
    assert await idle.reply() == codes.SHUTTING_DOWN  # now, not after the grace period
    assert await idle.rest() == b""
    busy.send(".\r\n")
    assert (await busy.reply()).startswith("250 ")  # stored and acknowledged, then goodbye
    assert await busy.reply() == codes.SHUTTING_DOWN
    await asyncio.wait_for(stopping, 10)
