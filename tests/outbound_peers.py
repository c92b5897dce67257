"""Real SMTP peers for the outbound tests: aiosmtpd sinks on 127.0.0.1, port 0.

`start_sink(kind)` runs one on the test's event loop (loop.create_server, no
threads) and returns a `Sink` that records every message it accepted:

- "starttls": offers STARTTLS (self-signed certificate) and PIPELINING;
- "plain": no STARTTLS;
- "broken-tls": offers STARTTLS, answers 220, then the handshake fails (the
  server offers only a TLS 1.2 CBC suite, which the client's policy refuses);
- "flaky": answers 451 to each recipient's first RCPT, 250 afterwards;
- "reject": answers 550 5.1.1 to every RCPT.

`start_sink(kind, certificate=...)` serves another certificate chain, e.g.
one a test `Authority` (a CA made with cryptography) issued.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from runbox_mta.certs import generate_self_signed

SINK_KINDS = ("starttls", "plain", "broken-tls", "flaky", "reject")


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool  # the session had done STARTTLS


@dataclass
class SinkHandler:
    kind: str
    messages: list[Received] = field(default_factory=list)
    rcpt_seen: set[str] = field(default_factory=set)
    sessions: int = 0  # first EHLOs, one per connection
    live: int = 0  # connections between their first EHLO and QUIT
    most_live: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if session.ssl is None:
            self.sessions += 1
            self.live += 1
            self.most_live = max(self.most_live, self.live)
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.kind == "starttls" else responses

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.live -= 1
        return "221 Bye"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.kind == "reject":
            return "550 5.1.1 No such user here"
        if self.kind == "flaky" and address not in self.rcpt_seen:
            self.rcpt_seen.add(address)
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(Received(envelope.mail_from or "", tuple(envelope.rcpt_tos), envelope.content,
                                      session.ssl is not None))
        self.arrived.set()
        return "250 2.0.0 Stored"


class Sink:
    def __init__(self, handler: SinkHandler, server: asyncio.AbstractServer) -> None:
        self.handler = handler
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def route(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until `count` messages arrived; fail the test if they do not."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.handler.arrived.clear()
                await self.handler.arrived.wait()
        return self.messages


@dataclass(frozen=True)
class Authority:
    """A test CA: a root (`Authority.root(...)`) or an intermediate under one (`.intermediate(...)`)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parents: tuple[x509.Certificate, ...] = ()  # the issuers above, nearest first

    @classmethod
    def root(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        return cls(_sign(_builder(subject, key, ca=True).issuer_name(subject), key), key)

    def intermediate(self, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _sign(_builder(_name(name), key, ca=True).issuer_name(self.certificate.subject), self.key)
        return Authority(certificate, key, (self.certificate, *self.parents))

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, hostname: str, out: Path, *, expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for `hostname`, written with its whole chain (up to the root) and key."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_builder(_name(hostname), key, ca=False, expired=expired).issuer_name(self.certificate.subject)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False))
        certificate = _sign(builder, self.key)
        out.mkdir(parents=True, exist_ok=True)
        chain, key_path = out / f"{hostname}.pem", out / f"{hostname}.key"
        chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                   for c in (certificate, self.certificate, *self.parents)))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return chain, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey, *, ca: bool,
             expired: bool = False) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired else (
        now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30))
    return (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def _sign(builder: x509.CertificateBuilder, issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return builder.add_extension(identifier, critical=False).sign(issuer_key, hashes.SHA256())


def _server_context(chain: Path, key: Path, kind: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    if kind == "broken-tls":
        # TLS 1.2 with a CBC suite only: the client's policy (AEAD only) shares nothing with it.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    return context


SinkFactory = Callable[..., Awaitable[Sink]]


@pytest.fixture
async def start_sink(tmp_path: Path) -> AsyncIterator[SinkFactory]:
    """start_sink(kind, certificate=None) -> a running Sink; all are closed after the test."""
    certs = tmp_path / "sink-certs"
    generate_self_signed("localhost", certs)
    async with AsyncExitStack() as stack:
        async def start(kind: str, certificate: tuple[Path, Path] | None = None) -> Sink:
            assert kind in SINK_KINDS
            handler = SinkHandler(kind)
            chain, key = certificate or (certs / "server.pem", certs / "server.key")
            tls = _server_context(chain, key, kind) if kind in ("starttls", "broken-tls") else None
            loop = asyncio.get_running_loop()

            def protocol() -> Any:
                return SMTP(handler, tls_context=tls, hostname="sink.test", loop=loop)

            server = await loop.create_server(protocol, "127.0.0.1", 0)
            stack.push_async_callback(_close, server)
            return Sink(handler, server)

        yield start


async def _close(server: asyncio.AbstractServer) -> None:
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), 2.0)
    except asyncio.TimeoutError:
        pass
