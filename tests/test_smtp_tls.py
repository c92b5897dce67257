"""Real clients over STARTTLS and implicit TLS, on uvloop (what the daemon runs) and plain asyncio.

aiosmtpd's STARTTLS drives asyncio's private SSLProtocol by hand, which has
broken under uvloop before; these tests keep it honest on both loops. Each
runs the daemon on a fresh loop of the given kind (tests/smtp_helpers.run_on)
and smtplib in a worker thread, as a separate client would.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from pathlib import Path

import pytest

from runbox_mta.app import Daemon
from runbox_mta.smtp import codes
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.smtp_helpers import (
    ALICE, BOB, HOSTNAME, MX, PASSWORD, SUBMISSION, SUBMISSIONS, SmtpClient, address_of, client_tls, mail_daemon,
    messages_in, run_on, write_config,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("loop", ["uvloop", "asyncio"])]

MESSAGE = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: over TLS\r\n\r\nencrypted\r\n"
RECEIVED_TLS = re.compile(rb"\(using TLS1\.3 with cipher TLS_[A-Z0-9_]+\)\r\n\twith (ESMTPS|ESMTPSA) id ")


@pytest.fixture
def config(tmp_path: Path, database_url: str, dns_server: DnsServer) -> Path:
    return write_config(tmp_path, database_url, dns_server.nameserver)


def smtp_client(daemon: Daemon, index: int, tls: ssl.SSLContext | None = None) -> smtplib.SMTP:
    host, port = address_of(daemon, index)
    if tls is not None:
        return smtplib.SMTP_SSL(host, port, context=tls, timeout=10)
    return smtplib.SMTP(host, port, timeout=10)


def send_over_starttls(daemon: Daemon, index: int, tls: ssl.SSLContext, sender: str, login: bool) -> None:
    with smtp_client(daemon, index) as client:
        client.starttls(context=tls)
        if login:
            client.login(ALICE, PASSWORD)
        client.sendmail(sender, [BOB], MESSAGE)


def test_mx_over_starttls_records_the_tls_version_and_cipher(loop: str, config: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mail_daemon(config) as daemon:
            await asyncio.to_thread(send_over_starttls, daemon, MX, client_tls(tmp_path), "sender@example.net",
                                    False)
            assert daemon.services is not None
            (stored,) = await messages_in(daemon.services.store, BOB)
            trace, sent = stored[:-len(MESSAGE)], stored[-len(MESSAGE):]
            assert sent == MESSAGE
            assert trace.startswith(b"Return-Path: <sender@example.net>\r\nAuthentication-Results: ")
            assert trace.count(b"\r\nReceived: ") == 1 and RECEIVED_TLS.search(trace)
            assert b"with ESMTPS id" in trace

    run_on(loop, scenario())


def test_submission_over_starttls_with_login(loop: str, config: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mail_daemon(config) as daemon:
            await asyncio.to_thread(send_over_starttls, daemon, SUBMISSION, client_tls(tmp_path), ALICE, True)
            assert daemon.services is not None
            (stored,) = await messages_in(daemon.services.store, BOB)
            assert RECEIVED_TLS.search(stored) and b"with ESMTPSA id" in stored

    run_on(loop, scenario())


def test_submission_over_implicit_tls_with_login(loop: str, config: Path, tmp_path: Path) -> None:
    def send(daemon: Daemon) -> dict[str, str]:
        with smtp_client(daemon, SUBMISSIONS, client_tls(tmp_path)) as client:
            client.ehlo()
            features = dict(client.esmtp_features)
            client.login(ALICE, PASSWORD)
            client.sendmail(ALICE, [BOB, ALICE], MESSAGE)
            return features

    async def scenario() -> None:
        async with mail_daemon(config) as daemon:
            features = await asyncio.to_thread(send, daemon)
            assert features["auth"].strip() == "PLAIN LOGIN" and "starttls" not in features
            assert daemon.services is not None
            for address in (ALICE, BOB):
                (stored,) = await messages_in(daemon.services.store, address)
                assert RECEIVED_TLS.search(stored)

    run_on(loop, scenario())


def test_commands_pipelined_after_starttls_are_discarded(loop: str, config: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mail_daemon(config) as daemon:
            for index in (MX, SUBMISSION):
                client = await SmtpClient.connect(daemon, index)
                await client.reply()
                await client.ehlo()
                # CVE-2011-0411: a man in the middle appends a plaintext command to STARTTLS.
                client.send("STARTTLS\r\nRSET\r\n")
                assert await client.reply() == codes.READY_FOR_TLS
                await client.writer.start_tls(client_tls(tmp_path), server_hostname="localhost")
                assert (await client.ehlo()).startswith(f"250-{HOSTNAME}\n")  # not RSET's "250 2.0.0 OK"
                assert await client.command("STARTTLS") == codes.TLS_ALREADY_ACTIVE
                assert await client.command("QUIT") == codes.BYE

    run_on(loop, scenario())


def test_a_broken_handshake_closes_the_connection_without_a_crash(loop: str, config: Path) -> None:
    async def scenario() -> None:
        async with mail_daemon(config) as daemon:
            client = await SmtpClient.connect(daemon, MX)
            await client.reply()
            await client.ehlo()
            assert await client.command("STARTTLS") == codes.READY_FOR_TLS
            client.send(b"this is not a TLS ClientHello\r\n" * 4)
            assert await client.rest() == b""
            fresh = await SmtpClient.connect(daemon, MX)
            assert (await fresh.reply()).startswith("220 ")

    run_on(loop, scenario())
