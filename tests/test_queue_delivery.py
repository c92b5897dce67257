"""Outbound delivery end to end: a real Daemon's queue worker against real SMTP peers.

Mail enters the queue as submission puts it there (Store.enqueue), routes
come from `[outbound] routes` or from the DNS responder with `[outbound]
port` pointing at a sink, and bounces must land in the sender's INBOX.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from runbox_mta.app import Daemon
from runbox_mta.config import load_config
from runbox_mta.queue.worker import LEASE_SECONDS, utcnow
from runbox_mta.store import QueueEntry, Store, open_store
from runbox_mta.store.queue import DELAYED
from tests.daemon_config import write_daemon_config
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.outbound_peers import Sink, SinkFactory, start_sink  # noqa: F401  (fixture)

ALICE = "alice@example.test"
MESSAGE = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: hi\r\nMessage-ID: <1@example.test>\r\n\r\nHello.\r\n"
# Fast schedules for tests: look every 50 ms, retry after 0.2-0.3 s.
FAST = "poll_interval = 0.05\nretry_base = 0.3\nretry_max = 0.3\n"

Start = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_mta(tmp_path: Path, database_url: str, dns_server: DnsServer) -> AsyncIterator[Start]:
    """start_mta(outbound) -> a running daemon (no listeners) whose queue worker delivers."""
    async with AsyncExitStack() as stack:
        async def start(outbound: str = "", *, populate: bool = True, schedule: str = FAST) -> Daemon:
            settings = f'{schedule}nameservers = ["{dns_server.nameserver}"]\n{outbound}'
            path = write_daemon_config(tmp_path, database_url, outbound=settings)
            daemon = Daemon(load_config(path))
            await daemon.start()
            stack.push_async_callback(daemon.stop, 0.2)
            if populate:
                await add_alice(store_of(daemon))
            return daemon

        yield start


async def add_alice(store: Store) -> None:
    await store.add_domain("example.test", "sel", "unused key")
    await store.add_account(ALICE, "unused hash")


@asynccontextmanager
async def opened(database_url: str) -> AsyncIterator[Store]:
    """Another Store on the same database (a CLI, or a daemon that is not running a worker)."""
    store = await open_store(database_url)
    try:
        yield store
    finally:
        await store.close()


def store_of(daemon: Daemon) -> Store:
    assert daemon.services is not None
    return daemon.services.store


def routes(**targets: str) -> str:
    return "[outbound.routes]\n" + "".join(f'"{domain.replace("_", ".")}" = "{target}"\n'
                                           for domain, target in targets.items())


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def queue_empty(store: Store) -> None:
    async def empty() -> bool:
        return not await store.list_queue()

    await wait_until(empty)


async def inbox(store: Store, count: int) -> list[email.message.EmailMessage]:
    """The INBOX of alice once it holds `count` messages, parsed."""
    account = await store.get_account(ALICE)
    mailbox = await store.get_mailbox(account.id, "INBOX")

    async def arrived() -> bool:
        return len(await store.list_messages(mailbox.id)) >= count

    await wait_until(arrived)
    raw = [await store.read_message(mailbox.id, info.uid) for info in await store.list_messages(mailbox.id)]
    return [email.message_from_bytes(data, policy=email.policy.default) for data in raw]  # type: ignore[misc]


def report_fields(dsn: email.message.EmailMessage) -> str:
    assert dsn.get_content_type() == "multipart/report"
    parts = list(dsn.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "message/delivery-status",
                                                          "text/rfc822-headers"]
    assert "Subject: hi" in parts[2].get_content()  # the original header, not the body
    return "".join(str(block) for block in parts[1].get_payload())  # type: ignore[union-attr]


def closed_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def test_tls_is_used_whenever_offered(start_mta: Start, start_sink: SinkFactory) -> None:
    sink = await start_sink("starttls")
    store = store_of(await start_mta(routes(remote_test=sink.route)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls and received.sender == ALICE and received.recipients == ("bob@remote.test",)
    assert received.data == MESSAGE
    await queue_empty(store)


async def test_failed_handshake_falls_back_to_plaintext_without_a_policy(start_mta: Start,
                                                                         start_sink: SinkFactory) -> None:
    sink = await start_sink("broken-tls")
    store = store_of(await start_mta(routes(remote_test=sink.route)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert not received.tls
    await queue_empty(store)


async def test_a_451_is_retried_with_the_attempt_and_tls_outcome_recorded(start_mta: Start,
                                                                          start_sink: SinkFactory) -> None:
    sink = await start_sink("flaky")
    slow = "poll_interval = 0.05\nretry_base = 1\nretry_max = 1\n"
    store = store_of(await start_mta(routes(remote_test=sink.route), schedule=slow))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)

    async def deferred_once() -> bool:
        entries = await store.list_queue()
        return bool(entries) and entries[0].recipients[0].attempts == 1

    await wait_until(deferred_once)
    (entry,) = await store.list_queue()
    (recipient,) = entry.recipients
    assert recipient.last_error == "451 4.3.0 Try again later"
    assert recipient.tls_outcome == "plaintext (STARTTLS not offered)"
    assert recipient.next_attempt_at > utcnow()
    (received,) = await sink.wait_for(1)
    assert received.recipients == ("bob@remote.test",)
    await queue_empty(store)


async def test_the_log_shows_the_queue_in_numbers_and_no_address(start_mta: Start, start_sink: SinkFactory,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    sink = await start_sink("flaky")
    schedule = "poll_interval = 0.05\nretry_base = 30\nretry_max = 30\nstatus_interval = 0.1\n"
    store = store_of(await start_mta(routes(remote_test=sink.route), schedule=schedule))
    caplog.set_level(logging.INFO, logger="runbox_mta")
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)

    async def reported() -> bool:
        return "queue: 1 message, 1 recipient: 0 in delivery, 0 due, 1 deferred" in caplog.text

    await wait_until(reported)
    assert "bob@remote.test" not in caplog.text and "remote.test" not in caplog.text


async def test_a_550_bounces_into_the_senders_inbox(start_mta: Start, start_sink: SinkFactory) -> None:
    sink = await start_sink("reject")
    store = store_of(await start_mta(routes(remote_test=sink.route)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (dsn,) = await inbox(store, 1)
    assert dsn["Return-Path"] == "<>" and str(dsn["To"]) == ALICE
    assert dsn["Auto-Submitted"] == "auto-replied"
    fields = report_fields(dsn)
    assert "Final-Recipient: rfc822; bob@remote.test" in fields and "Action: failed" in fields
    assert "Status: 5.1.1" in fields and "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in fields
    await queue_empty(store)
    assert not sink.messages


async def test_a_bounce_never_answers_a_bounce(start_mta: Start, start_sink: SinkFactory) -> None:
    sink = await start_sink("reject")
    store = store_of(await start_mta(routes(remote_test=sink.route)))
    await store.enqueue("", ["bob@remote.test"], MESSAGE)
    await queue_empty(store)
    account = await store.get_account(ALICE)
    assert not await store.list_messages((await store.get_mailbox(account.id, "INBOX")).id)


async def test_a_remote_senders_bounce_is_queued_with_the_null_sender(start_mta: Start,
                                                                      start_sink: SinkFactory) -> None:
    reject, accept = await start_sink("reject"), await start_sink("starttls")
    store = store_of(await start_mta(routes(remote_test=reject.route, elsewhere_test=accept.route)))
    await store.enqueue("carol@elsewhere.test", ["bob@remote.test"], MESSAGE)
    (bounce,) = await accept.wait_for(1)
    assert bounce.sender == "<>" and bounce.recipients == ("carol@elsewhere.test",)
    assert b"multipart/report" in bounce.data and b"Action: failed" in bounce.data
    await queue_empty(store)


async def test_mx_hosts_are_tried_in_preference_order(start_mta: Start, start_sink: SinkFactory,
                                                      dns_server: DnsServer) -> None:
    sink = await start_sink("starttls")
    dns_server.add("remote.test", "MX", "10 mx1.remote.test.")
    dns_server.add("remote.test", "MX", "20 mx2.remote.test.")
    dns_server.add("mx1.remote.test", "A", "127.0.0.2")  # nothing listens there: refused
    dns_server.add("mx2.remote.test", "A", "127.0.0.1")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)


async def test_without_mx_the_domains_address_is_used(start_mta: Start, start_sink: SinkFactory,
                                                      dns_server: DnsServer) -> None:
    sink = await start_sink("plain")
    dns_server.add("remote.test", "A", "127.0.0.1")  # RFC 5321 §5.1 implicit MX
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await sink.wait_for(1)
    await queue_empty(store)


async def test_a_null_mx_bounces_at_once(start_mta: Start, dns_server: DnsServer) -> None:
    dns_server.add("remote.test", "MX", "0 .")  # RFC 7505
    store = store_of(await start_mta())
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (dsn,) = await inbox(store, 1)
    fields = report_fields(dsn)
    assert "Action: failed" in fields and "null MX" in fields
    await queue_empty(store)


async def test_a_delay_warning_once_then_a_bounce_at_expiry(start_mta: Start) -> None:
    outbound = f"delay_warning = 0.2\nmax_queue_lifetime = 1.2\n{routes(remote_test=closed_port())}"
    store = store_of(await start_mta(outbound))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)

    async def warned() -> bool:
        entries = await store.list_queue()
        return bool(entries) and entries[0].recipients[0].status == DELAYED

    await wait_until(warned)
    warning, bounce = await inbox(store, 2)
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    assert "Action: delayed" in report_fields(warning) and "Will-Retry-Until: " in report_fields(warning)
    assert "Action: failed" in report_fields(bounce) and "connection failed" in report_fields(bounce)
    await queue_empty(store)


async def test_several_messages_to_one_destination_share_a_connection(start_mta: Start, start_sink: SinkFactory,
                                                                      database_url: str) -> None:
    sink = await start_sink("starttls")
    await deferred_by_a_first_daemon(start_mta, 3)
    async with opened(database_url) as other:
        assert await other.flush_queue(utcnow()) == 3
    second = store_of(await start_mta(routes(remote_test=sink.route), populate=False))
    assert len(await sink.wait_for(3)) == 3
    assert sink.handler.sessions == 1
    await queue_empty(second)


async def test_a_restart_mid_queue_loses_nothing(start_mta: Start, start_sink: SinkFactory,
                                                 database_url: str) -> None:
    """Mail deferred by one daemon, and mail claimed by a daemon killed mid-attempt, both get delivered."""
    sink = await start_sink("plain")
    await deferred_by_a_first_daemon(start_mta, 4)
    # A daemon that claimed the mail and was killed (kill -9): its lease just runs out.
    killed_at = utcnow() - timedelta(seconds=LEASE_SECONDS + 1)
    async with opened(database_url) as other:
        await other.flush_queue(killed_at)
        lease_until = killed_at + timedelta(seconds=LEASE_SECONDS)
        assert len(await other.claim("remote.test", "killed", killed_at, lease_until, 2)) == 2
    second = store_of(await start_mta(routes(remote_test=sink.route), populate=False))
    received = await sink.wait_for(4)
    assert sorted(r for m in received for r in m.recipients) == [f"user{n}@remote.test" for n in range(4)]
    await queue_empty(second)


async def deferred_by_a_first_daemon(start_mta: Start, count: int) -> None:
    """`count` messages to user0..@remote.test, each tried once (port closed) by a daemon now stopped."""
    first = await start_mta(routes(remote_test=closed_port()))
    store = store_of(first)
    for n in range(count):
        await store.enqueue(ALICE, [f"user{n}@remote.test"], MESSAGE)

    async def all_attempted() -> bool:
        entries: list[QueueEntry] = await store.list_queue()
        return len(entries) == count and all(r.attempts >= 1 for entry in entries for r in entry.recipients)

    await wait_until(all_attempted)
    await first.stop(0.2)


async def test_two_daemons_on_one_database_deliver_each_message_once(start_mta: Start,
                                                                     start_sink: SinkFactory) -> None:
    sink = await start_sink("starttls")
    outbound = f"max_per_destination = 2\n{routes(**{'*': sink.route})}"
    first = await start_mta(outbound)
    second = await start_mta(outbound, populate=False)
    store = store_of(first)
    count = 40
    for n in range(count):
        await store.enqueue(ALICE, [f"user{n}@domain{n % 5}.test"], MESSAGE)
    received = await sink.wait_for(count)
    await queue_empty(store_of(second))
    await asyncio.sleep(0.3)  # time for any duplicate to show up
    recipients = [r for message in sink.messages for r in message.recipients]
    assert len(recipients) == count and len(set(recipients)) == count
    assert len(received) == count


@pytest.mark.parametrize("kind", ["starttls", "broken-tls", "plain"])
async def test_a_verify_policy_keeps_mail_queued_rather_than_unauthenticated(start_mta: Start,
                                                                            start_sink: SinkFactory,
                                                                            kind: str) -> None:
    sink = await start_sink(kind)  # "starttls": its self-signed certificate is trusted by nobody
    policy = '[outbound.tls_policy]\n"remote.test" = "verify"\n'
    store = store_of(await start_mta(f"{routes(remote_test=sink.route)}{policy}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)

    async def deferred() -> bool:
        entries = await store.list_queue()
        return bool(entries) and entries[0].recipients[0].attempts >= 1

    await wait_until(deferred)
    (entry,) = await store.list_queue()
    assert "TLS is required" in (entry.recipients[0].last_error or "")
    assert not sink.messages


async def test_a_verify_policy_delivers_over_verified_tls(start_mta: Start, start_sink: SinkFactory,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = await start_sink("starttls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "sink-certs" / "server.pem"))  # trust the sink's CA
    policy = '[outbound.tls_policy]\n"remote.test" = "verify"\n'
    store = store_of(await start_mta(f"{routes(remote_test=sink.route)}{policy}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)


async def test_connections_per_destination_are_limited(start_mta: Start, start_sink: SinkFactory,
                                                       database_url: str) -> None:
    sink = await start_sink("plain")
    async with opened(database_url) as store:
        for n in range(120):  # more than one batch (BATCH_RECIPIENTS) can carry
            await store.enqueue(ALICE, [f"user{n}@remote.test"], MESSAGE)
    # Three batches are due at once; one connection at a time carries them.
    await start_mta(f"max_per_destination = 1\n{routes(remote_test=sink.route)}", populate=False)
    assert len(await sink.wait_for(120)) == 120
    assert sink.handler.sessions == 3 and sink.handler.most_live == 1
