"""Submission, as a user's mail client sees it: TLS first, then AUTH, then only its own addresses;
messages get Message-ID, Date, a private Received field and a DKIM signature."""

from __future__ import annotations

import base64
import re
import ssl
import time
from pathlib import Path

import dkim
import pytest

from runbox_mta.app import Daemon
from runbox_mta.auth.sasl import LOGIN_PASSWORD_CHALLENGE, LOGIN_USERNAME_CHALLENGE
from runbox_mta.smtp import codes
from tests.smtp_helpers import (  # noqa: F401  (fixtures)
    ALICE, BOB, HOSTNAME, PASSWORD, SUBMISSION, SUBMISSIONS, MailFactory, SmtpClient, add_app_password,
    client_tls, dkim_dns_record, dkim_key, dns_server, mail, messages_in, start_mail,
)

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: lunch?\r\n\r\nAt noon.\r\n"
EHLO_BEFORE_TLS = "\n".join([
    f"250-{HOSTNAME}", "250-PIPELINING", "250-SIZE 52428800", "250-8BITMIME", "250-SMTPUTF8",
    "250-ENHANCEDSTATUSCODES", "250 STARTTLS",
])
EHLO_AFTER_TLS = EHLO_BEFORE_TLS.replace("250 STARTTLS", "250 AUTH PLAIN LOGIN")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str = ALICE, password: str = PASSWORD) -> str:
    return b64(f"\0{user}\0{password}")


@pytest.fixture
def tls(tmp_path: Path) -> ssl.SSLContext:
    return client_tls(tmp_path)


async def secured(daemon: Daemon, tls: ssl.SSLContext) -> SmtpClient:
    """Connected to submission, TLS on, EHLO done, not authenticated."""
    client = await SmtpClient.connect(daemon, SUBMISSION)
    assert await client.reply() == f"220 {HOSTNAME} ESMTP"
    assert await client.ehlo() == EHLO_BEFORE_TLS
    await client.starttls(tls)
    assert await client.ehlo() == EHLO_AFTER_TLS
    return client


async def test_nothing_but_starttls_before_tls(mail: Daemon) -> None:
    client = await SmtpClient.connect(mail, SUBMISSION)
    await client.reply()
    await client.transcript([
        ("EHLO laptop", EHLO_BEFORE_TLS),
        (f"AUTH PLAIN {plain()}", codes.TLS_REQUIRED),
        ("MAIL FROM:<alice@example.test>", codes.TLS_REQUIRED),
        ("NOOP", codes.OK),
        ("QUIT", codes.BYE),
    ])


async def test_everything_needs_auth_after_tls(mail: Daemon, tls: ssl.SSLContext) -> None:
    client = await secured(mail, tls)
    await client.transcript([
        ("MAIL FROM:<alice@example.test>", codes.AUTH_REQUIRED),
        ("RCPT TO:<bob@example.test>", codes.AUTH_REQUIRED),
        ("AUTH", codes.AUTH_SYNTAX),
        ("AUTH CRAM-MD5", codes.AUTH_MECHANISM_UNKNOWN),
        (f"AUTH PLAIN {plain(password='wrong')}", codes.AUTH_INVALID),
        ("AUTH PLAIN not-base64!", codes.AUTH_BAD_RESPONSE),
        (f"AUTH PLAIN {plain()}", codes.AUTH_OK),
        (f"AUTH PLAIN {plain()}", codes.AUTH_ALREADY_DONE),
        ("MAIL FROM:<alice@example.test>", codes.SENDER_OK),
    ])


@pytest.mark.parametrize("exchange", [
    [(f"AUTH PLAIN {plain()}", codes.AUTH_OK)],  # SASL-IR (RFC 4954 §4)
    [("AUTH PLAIN", "334 "), (plain(), codes.AUTH_OK)],
    [(f"AUTH LOGIN {b64(ALICE)}", f"334 {LOGIN_PASSWORD_CHALLENGE}"), (b64(PASSWORD), codes.AUTH_OK)],
    [("AUTH login", f"334 {LOGIN_USERNAME_CHALLENGE}"), (b64(ALICE), f"334 {LOGIN_PASSWORD_CHALLENGE}"),
     (b64(PASSWORD), codes.AUTH_OK)],
    [("AUTH LOGIN", f"334 {LOGIN_USERNAME_CHALLENGE}"), ("*", codes.AUTH_CANCELLED)],
    [("AUTH PLAIN", "334 "), ("=", codes.AUTH_BAD_RESPONSE)],
    [("AUTH PLAIN", "334 "), ("x" * 2000, codes.AUTH_BAD_RESPONSE)],
    # RFC 4954 §4: lines up to 12288 octets are read whole, longer ones refused, the session goes on.
    [(f"AUTH PLAIN {plain(password='p' * 9000)}", codes.AUTH_INVALID)],
    [("AUTH PLAIN", "334 "), (plain(password="p" * 9100), codes.AUTH_INVALID)],
    [("AUTH PLAIN", "334 "), ("x" * 13000, codes.AUTH_BAD_RESPONSE)],
    [(f"AUTH PLAIN {'x' * 13000}", codes.COMMAND_TOO_LONG)],
])
async def test_auth_exchanges(mail: Daemon, tls: ssl.SSLContext, exchange: list[tuple[str, str]]) -> None:
    client = await secured(mail, tls)
    await client.transcript(exchange)
    assert await client.command("NOOP") == codes.OK


async def test_app_passwords_need_the_smtp_scope_and_app_passwords_only_refuses_the_main_one(
        mail: Daemon, tls: ssl.SSLContext) -> None:
    mail_app = await add_app_password(mail, ALICE, "phone", ["smtp"])
    imap_app = await add_app_password(mail, ALICE, "tablet", ["imap"])
    client = await secured(mail, tls)
    await client.transcript([
        (f"AUTH PLAIN {plain(password=imap_app)}", codes.AUTH_INVALID),
        (f"AUTH PLAIN {plain(password=mail_app.upper())}", codes.AUTH_OK),
    ])
    assert mail.services is not None
    await mail.services.store.update_account(ALICE, app_passwords_only=True)
    client = await secured(mail, tls)
    await client.transcript([
        (f"AUTH PLAIN {plain()}", codes.AUTH_INVALID),
        (f"AUTH PLAIN {plain(password=mail_app)}", codes.AUTH_OK),
    ])


async def test_failed_logins_are_slowed_down_by_the_shared_limiter(start_mail: MailFactory,
                                                                  tmp_path: Path) -> None:
    daemon = await start_mail(auth='free_failures = 1\nfailure_base_delay = "0.3s"')
    client = await secured(daemon, client_tls(tmp_path))
    assert await client.command(f"AUTH PLAIN {plain(password='guess1')}") == codes.AUTH_INVALID
    started = time.monotonic()
    assert await client.command(f"AUTH PLAIN {plain(password='guess2')}") == codes.AUTH_INVALID
    assert time.monotonic() - started >= 0.3


async def test_a_locked_account_gets_454(start_mail: MailFactory, tmp_path: Path) -> None:
    # One address can never lock an account (auth/limiter.py); two can, with a lockout of 2.
    daemon = await start_mail(auth="free_failures = 100\naccount_lockout_failures = 2")
    assert daemon.services is not None
    for client_address in ("127.0.0.2", "127.0.0.3"):
        await daemon.services.auth.authenticate(ALICE, "wrong", protocol="smtp", client_address=client_address)
    client = await secured(daemon, client_tls(tmp_path))
    assert await client.command(f"AUTH PLAIN {plain()}") == codes.AUTH_LOCKED


async def test_the_sender_must_belong_to_the_account(mail: Daemon, tls: ssl.SSLContext) -> None:
    assert mail.services is not None
    await mail.services.store.add_alias("sales@example.test", ALICE)
    await mail.services.store.add_alias("info@example.test", BOB)
    client = await secured(mail, tls)
    await client.transcript([
        (f"AUTH PLAIN {plain()}", codes.AUTH_OK),
        ("MAIL FROM:<bob@example.test>", codes.SENDER_NOT_OWNED),
        ("MAIL FROM:<info@example.test>", codes.SENDER_NOT_OWNED),
        ("MAIL FROM:<>", codes.SENDER_NOT_OWNED),
        ("MAIL FROM:<anyone@elsewhere.example>", codes.SENDER_NOT_OWNED),
        ("MAIL FROM:<sales@example.test>", codes.SENDER_OK),
        ("RSET", codes.OK),
        ("MAIL FROM:<Alice+Lists@Example.Test>", codes.SENDER_OK),
        ("RCPT TO:<nobody@example.test>", codes.UNKNOWN_USER),
        ("RCPT TO:<friend@elsewhere.example>", codes.RECIPIENT_OK),
    ])


def verify_dkim(message: bytes) -> bool:
    record = dkim_dns_record()
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: record)


async def test_submitted_mail_is_signed_stamped_and_delivered_locally_and_queued(mail: Daemon,
                                                                                tls: ssl.SSLContext) -> None:
    client = await secured(mail, tls)
    assert await client.command(f"AUTH PLAIN {plain()}") == codes.AUTH_OK
    reply = await client.send_mail(ALICE, [BOB, "friend@elsewhere.example"], MESSAGE)
    queue_id = re.fullmatch(r"250 2\.0\.0 OK: queued as ([A-Z0-9]+)", reply)
    assert queue_id, reply
    assert mail.services is not None
    store = mail.services.store
    (local,) = await messages_in(store, BOB)
    (queued,) = await store.list_queue()
    assert queued.sender == ALICE and [r.recipient for r in queued.recipients] == ["friend@elsewhere.example"]
    return_path = b"Return-Path: <alice@example.test>\r\n"
    assert local.startswith(return_path) and queued.size == len(local) - len(return_path)
    signed = local[len(return_path):]
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;")
    assert b" s=" + dkim_key()[0].encode() + b";" in signed.split(b"\r\nReceived:")[0]
    assert verify_dkim(signed) and verify_dkim(local)
    assert not verify_dkim(signed.replace(b"At noon.", b"At one."))
    received = re.search(rb"\r\nReceived: (.*?)\r\n(?! )(?!\t)", signed, re.DOTALL)
    assert received
    assert re.fullmatch(rb"from submission\r\n\tby mail\.example\.test \(runbox-mta\) \(using TLS1\.[23] with cipher"
                        rb" [A-Z0-9_-]+\)\r\n\twith ESMTPSA id " + queue_id.group(1).encode() + rb"; .*",
                        received.group(1), re.DOTALL), received.group(1)
    assert b"127.0.0.1" not in local and b"laptop" not in local and b"client.example.net" not in local
    # What the client sent, byte for byte, with Message-ID and Date added at the end of its header.
    sent_header, sent_body = MESSAGE.split(b"\r\n\r\n")
    rest = signed[received.end():]
    assert re.fullmatch(re.escape(sent_header + b"\r\n") + rb"Message-ID: <[0-9a-f]{32}@mail\.example\.test>\r\n"
                        rb"Date: \w{3}, \d\d \w{3} \d{4} [\d:]{8} \+0000\r\n\r\n" + re.escape(sent_body), rest), rest


async def test_existing_message_id_and_date_are_kept(mail: Daemon, tls: ssl.SSLContext) -> None:
    original = (b"From: alice@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0100\r\n"
                b"Message-ID: <mine@laptop>\r\nSubject: x\r\n\r\nbody\r\n")
    client = await secured(mail, tls)
    assert await client.command(f"AUTH PLAIN {plain()}") == codes.AUTH_OK
    assert (await client.send_mail(ALICE, [BOB], original)).startswith("250 ")
    assert mail.services is not None
    (local,) = await messages_in(mail.services.store, BOB)
    assert local.endswith(b"\r\n" + original)
    assert local.count(b"Message-ID:") == 1 and local.count(b"\r\nDate:") == 1


async def test_implicit_tls_submission(mail: Daemon, tls: ssl.SSLContext) -> None:
    client = await SmtpClient.connect(mail, SUBMISSIONS, tls=tls)
    assert await client.reply() == f"220 {HOSTNAME} ESMTP"
    await client.transcript([
        ("EHLO laptop", EHLO_AFTER_TLS),
        ("STARTTLS", codes.TLS_ALREADY_ACTIVE),
        (f"AUTH PLAIN {plain()}", codes.AUTH_OK),
    ])
    assert (await client.send_mail(ALICE, [ALICE], MESSAGE)).startswith("250 ")
    assert mail.services is not None
    assert len(await messages_in(mail.services.store, ALICE)) == 1
