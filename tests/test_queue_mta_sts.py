"""MTA-STS (RFC 8461) for outbound mail: policies from a real HTTPS host, applied to real SMTP peers.

The policy host is an asyncio HTTPS server on 127.0.0.1 with a certificate
from a test CA that `[outbound] ca_file` trusts; the DNS responder serves
the _mta-sts TXT record, the MX and the A records that send both the policy
fetch and the delivery to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runbox_mta.queue.mta_sts import (
    MAX_POLICY_SIZE, MtaSts, MtaStsError, Policy, PolicyError, fetch_policy, parse_policy, record_id,
)
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.outbound_peers import Authority, SinkFactory, start_sink  # noqa: F401  (fixture)
from tests.test_queue_dane import deferred_with, delivered_over
from tests.test_queue_delivery import ALICE, MESSAGE, Start, queue_empty, start_mta, store_of  # noqa: F401

ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx.remote.test\r\nmax_age: 86400\r\n"


@dataclass
class PolicyHost:
    """An HTTPS server answering every request with `status` and `body` (chunked if asked)."""

    port: int = 0
    status: int = 200
    body: bytes = ENFORCE.encode()
    chunked: bool = False
    headers: str = ""  # extra response header lines, CRLF-terminated
    requests: list[tuple[str, str]] = field(default_factory=list)  # (request line, Host header)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readline()).decode().strip()
            host = ""
            while (line := (await reader.readline()).decode().strip()):
                name, _, value = line.partition(":")
                host = value.strip() if name.lower() == "host" else host
            self.requests.append((request, host))
            framing, body = f"Content-Length: {len(self.body)}", self.body
            if self.chunked:  # two chunks and the last, empty one
                framing = "Transfer-Encoding: chunked"
                body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:], b""))
            writer.write(f"HTTP/1.1 {self.status} Whatever\r\nContent-Type: text/plain\r\n{framing}\r\n"
                         f"{self.headers}Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture(autouse=True)
def uncached_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests change DNS records on the fly, and the daemon's resolver caches answers for their TTL."""
    monkeypatch.setattr("tests.dns_server.TTL", 0)


@pytest.fixture
def root(tmp_path: Path) -> Authority:
    """The test CA: the policy host's and the good sinks' certificates come from it."""
    authority = Authority.root("MTA-STS test root")
    (tmp_path / "ca.pem").write_bytes(authority.pem())
    return authority


@pytest.fixture
async def policy_host(root: Authority, tmp_path: Path, dns_server: DnsServer) -> AsyncIterator[PolicyHost]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*root.issue("mta-sts.remote.test", tmp_path / "pki"))
    host = PolicyHost()
    server = await asyncio.start_server(host.serve, "127.0.0.1", 0, ssl=context)
    host.port = server.sockets[0].getsockname()[1]
    dns_server.add("mta-sts.remote.test", "A", "127.0.0.1")
    publish_id(dns_server, "20260101")
    yield host
    server.close()
    await server.wait_closed()


def publish_id(dns_server: DnsServer, policy_id: str) -> None:
    dns_server.remove("_mta-sts.remote.test")
    dns_server.add_txt("_mta-sts.remote.test", f"v=STSv1; id={policy_id};")


def publish_mx(dns_server: DnsServer, host: str = "mx.remote.test") -> None:
    dns_server.remove("remote.test")
    dns_server.add("remote.test", "MX", f"10 {host}.")
    dns_server.add(host, "A", "127.0.0.1")


def outbound(sink_port: int, policy_host: PolicyHost, tmp_path: Path) -> str:
    return f'port = {sink_port}\nmta_sts_port = {policy_host.port}\nca_file = "{tmp_path / "ca.pem"}"\n'


def trusting(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=tmp_path / "ca.pem")


async def test_enforce_delivers_over_tls_verified_for_the_mx_name(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, policy_host: PolicyHost,
        root: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "runbox_mta.queue")
    sink = await start_sink("starttls", root.issue("mx.remote.test", tmp_path / "pki"))
    publish_mx(dns_server)
    store = store_of(await start_mta(outbound(sink.port, policy_host, tmp_path)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)
    assert delivered_over(caplog).endswith(" verified by MTA-STS")
    assert policy_host.requests == [("GET /.well-known/mta-sts.txt HTTP/1.1", f"mta-sts.remote.test:{policy_host.port}")]


async def test_enforce_never_uses_an_mx_the_policy_does_not_list(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, policy_host: PolicyHost,
        root: Authority, tmp_path: Path) -> None:
    sink = await start_sink("starttls", root.issue("mx.attacker.test", tmp_path / "pki"))
    publish_mx(dns_server, "mx.attacker.test")  # e.g. a spoofed MX answer
    store = store_of(await start_mta(outbound(sink.port, policy_host, tmp_path)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "the MX host is not listed in the MTA-STS policy")
    assert not sink.messages and sink.handler.sessions == 0


@pytest.mark.parametrize("kind, certificate, why", [
    ("plain", None, "TLS is required but the server does not offer STARTTLS"),
    ("starttls", None, "certificate not verified"),  # self-signed: trusted by nobody
    ("starttls", "mx.elsewhere.test", "certificate not verified"),  # the test CA's, for another name
])
async def test_enforce_keeps_mail_queued_rather_than_unauthenticated(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, policy_host: PolicyHost,
        root: Authority, tmp_path: Path, kind: str, certificate: str | None, why: str) -> None:
    sink = await start_sink(kind, root.issue(certificate, tmp_path / "pki") if certificate else None)
    publish_mx(dns_server)
    store = store_of(await start_mta(outbound(sink.port, policy_host, tmp_path)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, why)
    assert not sink.messages


@pytest.mark.parametrize("mx, trusted, outcome", [
    ("mx.remote.test", True, " verified by MTA-STS (testing)"),
    ("mx.remote.test", False, "MTA-STS testing failed: TLS is required but the handshake failed: certificate not verified"),
    ("mx.other.test", True, "MTA-STS testing failed: the MX host is not listed in the MTA-STS policy"),
])
async def test_testing_delivers_and_records_what_enforce_would_refuse(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, policy_host: PolicyHost,
        root: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture, mx: str, trusted: bool,
        outcome: str) -> None:
    caplog.set_level(logging.INFO, "runbox_mta.queue")
    policy_host.body = ENFORCE.replace("enforce", "testing").encode()
    sink = await start_sink("starttls", root.issue(mx, tmp_path / "pki") if trusted else None)  # else self-signed
    publish_mx(dns_server, mx)
    store = store_of(await start_mta(outbound(sink.port, policy_host, tmp_path)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls  # opportunistic TLS all the same, not plaintext
    await queue_empty(store)
    assert outcome in delivered_over(caplog)


async def test_a_cached_policy_keeps_enforcing_when_its_refresh_fails(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, policy_host: PolicyHost,
        root: Authority, tmp_path: Path) -> None:
    sink = await start_sink("starttls", root.issue("mx.remote.test", tmp_path / "pki"))
    publish_mx(dns_server)
    store = store_of(await start_mta(outbound(sink.port, policy_host, tmp_path)))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await sink.wait_for(1)
    await queue_empty(store)
    # An attacker on the path: a new TXT id, the policy host unreachable, and an MX of their own.
    publish_id(dns_server, "20260102")
    policy_host.status = 503
    publish_mx(dns_server, "mx.attacker.test")
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "the MX host is not listed in the MTA-STS policy")  # RFC 8461 §5.1
    assert len(sink.messages) == 1 and len(policy_host.requests) == 2


async def test_a_policy_is_fetched_again_only_for_a_new_id_or_after_max_age(
        dns_server: DnsServer, policy_host: PolicyHost, tmp_path: Path) -> None:
    now = [1000.0]
    cache = MtaSts(dns_server.resolver(), policy_host.port, trusting(tmp_path), clock=lambda: now[0])
    first = await cache.policy("remote.test")
    assert first == Policy("enforce", ("mx.remote.test",), 86400)
    policy_host.body = ENFORCE.replace("enforce", "testing").encode()
    assert await cache.policy("remote.test") == first  # the TXT id is unchanged: no fetch
    assert len(policy_host.requests) == 1
    now[0] += 86400  # max_age is over
    assert (await cache.policy("remote.test")).mode == "testing"  # type: ignore[union-attr]
    policy_host.body = ENFORCE.replace("enforce", "none").encode()
    publish_id(dns_server, "20260102")
    assert await cache.policy("remote.test") is None  # mode none: no policy
    assert len(policy_host.requests) == 3


async def test_without_a_cached_policy_a_failed_fetch_means_no_policy(
        dns_server: DnsServer, policy_host: PolicyHost, tmp_path: Path) -> None:
    policy_host.status = 404
    cache = MtaSts(dns_server.resolver(), policy_host.port, trusting(tmp_path))
    assert await cache.policy("remote.test") is None  # RFC 8461 §3.3
    assert await cache.policy("remote.test") is None
    assert len(policy_host.requests) == 1  # failures are not retried at once for the same id
    dns_server.remove("_mta-sts.remote.test")
    assert await cache.policy("remote.test") is None


async def test_the_fetch_reads_chunked_bodies(dns_server: DnsServer, policy_host: PolicyHost,
                                              tmp_path: Path) -> None:
    policy_host.chunked = True
    policy = await fetch_policy("remote.test", dns_server.resolver(), policy_host.port, trusting(tmp_path))
    assert policy.mode == "enforce"


@pytest.mark.parametrize("status, body, headers, why", [
    (301, b"", "Location: https://elsewhere.test/\r\n", "HTTP 301"),  # RFC 8461 §3.3: no redirects
    (404, b"", "", "HTTP 404"),
    (200, b"x" * (MAX_POLICY_SIZE + 1), "", "too large"),
    (200, b"version: STSv2\n", "", "lacks mode"),
])
async def test_the_fetch_refuses(dns_server: DnsServer, policy_host: PolicyHost, tmp_path: Path,
                                 status: int, body: bytes, headers: str, why: str) -> None:
    policy_host.status, policy_host.body, policy_host.headers = status, body, headers
    with pytest.raises(MtaStsError, match=why):
        await fetch_policy("remote.test", dns_server.resolver(), policy_host.port, trusting(tmp_path))


async def test_the_policy_host_must_have_a_trusted_certificate(dns_server: DnsServer,
                                                               policy_host: PolicyHost) -> None:
    with pytest.raises(MtaStsError, match="certificate not verified"):
        await fetch_policy("remote.test", dns_server.resolver(), policy_host.port, ssl.create_default_context())


@pytest.mark.parametrize("texts, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc; ext=value"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other TXT records are ignored
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # several: as if none (§3.1)
    (["v=STSv1"], None),
    (["v=STSv1; id="], None),
    (["v=STSv1; id=not-alnum"], None),
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv10; id=abc"], None),
    ([], None),
])
def test_the_txt_record(texts: list[str], expected: str | None) -> None:
    assert record_id(texts) == expected


def test_a_policy_is_parsed() -> None:
    policy = parse_policy("version: STSv1\nmode: testing\nmx: mail.example.com\nmx: *.Example.NET\n"
                          "max_age: 9999999999\nmode: none\nunknown: ignored\n")
    # The first mode counts; mx patterns add up; max_age is capped at a year (RFC 8461 §3.2).
    assert policy == Policy("testing", ("mail.example.com", "*.example.net"), 31557600)
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 0").mx == ()  # none needs no mx


@pytest.mark.parametrize("text, why", [
    ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version is not STSv1"),
    ("mode: enforce\nmx: a.example\nmax_age: 1\n", "lacks version"),
    ("version: STSv1\nmx: a.example\nmax_age: 1\n", "lacks mode"),
    ("version: STSv1\nmode: enforce\nmx: a.example\n", "lacks max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "lists no mx"),
    ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode is not"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "mx is not"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\ngarbage\n", "not key: value"),
])
def test_a_bad_policy_is_refused(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize("host, allowed", [
    ("mail.example.com", True),
    ("MAIL.example.com.", True),
    ("mx1.example.net", True),  # "*." stands for exactly one label (RFC 8461 §4.1)
    ("example.net", False),
    ("a.mx1.example.net", False),
    ("mail.example.org", False),
])
def test_mx_patterns(host: str, allowed: bool) -> None:
    policy = Policy("enforce", ("mail.example.com", "*.example.net"), 86400)
    assert policy.allows(host) is allowed
