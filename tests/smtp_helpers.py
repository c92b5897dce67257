"""Shared set-up for the SMTP tests: a daemon with mail listeners and accounts, and a raw client.

The daemon is the real one (Daemon with the real protocol registry) on
127.0.0.1 port 0, with a hosted domain `example.test` (real DKIM key),
accounts alice@ and bob@ (password PASSWORD) and cheap Argon2 parameters.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import uvloop

from runbox_mta.app import Daemon
from runbox_mta.auth.app_passwords import generate_app_password, normalise_app_password
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.config import load_config
from runbox_mta.domains import dkim_public_record, new_dkim_key
from runbox_mta.smtp import codes
from runbox_mta.store import Mailbox, Store
from tests.daemon_config import listener_block, write_daemon_config
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (a fixture the ones here use)

T = TypeVar("T")

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORD = "correct horse battery staple"
HOSTNAME = "mail.example.test"
READ_TIMEOUT = 10.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
# The listeners of a full mail daemon, by index: MX, submission 587-style, submission 465-style.
MX, SUBMISSION, SUBMISSIONS = 0, 1, 2
MAIL_LISTENERS = (("smtp", "starttls"), ("submission", "starttls"), ("submission", "implicit"))


@functools.cache
def dkim_key() -> tuple[str, str]:
    """One RSA key for the whole run (generating one takes a while)."""
    return new_dkim_key()


def dkim_dns_record() -> bytes:
    return dkim_public_record(dkim_key()[1]).encode()


def write_config(tmp_path: Path, database_url: str, nameserver: str,
                 listeners: Sequence[tuple[str, str]] = MAIL_LISTENERS, *, limits: str = "",
                 auth: str = "free_failures = 100") -> Path:
    blocks = "".join(listener_block(protocol, tls) for protocol, tls in listeners)
    # The SMTP tests inspect the queue: no worker may empty it meanwhile.
    outbound = f'nameservers = ["{nameserver}"]\nenabled = false'
    return write_daemon_config(tmp_path, database_url, listeners=blocks, limits=limits, auth=auth,
                               outbound=outbound, hostname=HOSTNAME)


async def populate(daemon: Daemon) -> None:
    """example.test with alice@ and bob@, both with PASSWORD."""
    assert daemon.services is not None
    store = daemon.services.store
    selector, key = dkim_key()
    await store.add_domain(DOMAIN, selector, key)
    hasher = PasswordHasher(daemon.config.auth, workers=1)
    try:
        password_hash = hasher.hash(PASSWORD)
    finally:
        hasher.close()
    for address in (ALICE, BOB):
        await store.add_account(address, password_hash)


async def add_app_password(daemon: Daemon, address: str, label: str, scopes: Sequence[str]) -> str:
    assert daemon.services is not None
    password = generate_app_password()
    hasher = PasswordHasher(daemon.config.auth, workers=1)
    try:
        password_hash = hasher.hash(normalise_app_password(password))
    finally:
        hasher.close()
    await daemon.services.store.add_app_password(address, label, scopes, password_hash)
    return password


@asynccontextmanager
async def mail_daemon(config_path: Path, *, expected_crashes: int = 0) -> AsyncIterator[Daemon]:
    """A started, populated daemon; stopped afterwards, and no session may have crashed."""
    daemon = Daemon(load_config(config_path))
    await daemon.start()
    try:
        await populate(daemon)
        yield daemon
    finally:
        await daemon.stop(grace=0.2)
    assert daemon.services is not None
    assert daemon.services.connections.crashes == expected_crashes


MailFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_mail(tmp_path: Path, database_url: str, dns_server: DnsServer) -> AsyncIterator[MailFactory]:
    """start_mail(listeners=..., limits=..., auth=...) -> a running mail daemon whose DNS is `dns_server`;
    [auth] defaults to no login delays, so tests of failures stay fast."""
    async with AsyncExitStack() as stack:
        async def start(listeners: Sequence[tuple[str, str]] = MAIL_LISTENERS, limits: str = "",
                        auth: str = "free_failures = 100", expected_crashes: int = 0) -> Daemon:
            path = write_config(tmp_path, database_url, dns_server.nameserver, listeners, limits=limits, auth=auth)
            return await stack.enter_async_context(mail_daemon(path, expected_crashes=expected_crashes))

        yield start


@pytest.fixture
async def mail(start_mail: MailFactory) -> Daemon:
    """A running mail daemon with the MX, submission (STARTTLS) and submission (implicit TLS)."""
    return await start_mail()


def run_on(loop: str, scenario: Awaitable[T]) -> T:
    """Run `scenario` on a fresh event loop of the given kind, as the daemon's CLI does."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(scenario)  # type: ignore[arg-type]


def client_tls(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "certs" / "server.pem"))


def address_of(daemon: Daemon, index: int) -> tuple[str, int]:
    return daemon.listeners[index].address


async def inbox(store: Store, address: str, name: str = "INBOX") -> Mailbox:
    account = await store.get_account(address)
    return await store.get_mailbox(account.id, name)


async def messages_in(store: Store, address: str, name: str = "INBOX") -> list[bytes]:
    mailbox = await inbox(store, address, name)
    return [await store.read_message(mailbox.id, info.uid) for info in await store.list_messages(mailbox.id)]


class SmtpClient:
    """A raw SMTP client over a real socket: send exact bytes, read exact replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, daemon: Daemon, index: int = MX, tls: ssl.SSLContext | None = None) -> SmtpClient:
        host, port = address_of(daemon, index)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname="localhost" if tls else None)
        return cls(reader, writer)

    async def reply(self) -> str:
        """One reply; the lines of a multi-line reply joined with newlines."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            text = line.decode("utf-8").removesuffix("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return "\n".join(lines)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode("utf-8") if isinstance(data, str) else data)

    async def command(self, line: str) -> str:
        self.send(line + "\r\n")
        return await self.reply()

    async def transcript(self, steps: Sequence[tuple[str, str]]) -> None:
        """Each client line, then the exact reply it must get."""
        for line, expected in steps:
            reply = await self.command(line)
            assert reply == expected, f"C: {line!r} S: {reply!r}"

    async def send_mail(self, sender: str, recipients: Sequence[str], data: bytes) -> str:
        """One accepted MAIL, RCPT for each recipient, DATA; the reply to the final dot."""
        await self.transcript([(f"MAIL FROM:<{sender}>", codes.SENDER_OK),
                               *((f"RCPT TO:<{recipient}>", codes.RECIPIENT_OK) for recipient in recipients),
                               ("DATA", codes.START_DATA)])
        self.send(data + b".\r\n")
        return await self.reply()

    async def ehlo(self, name: str = "client.example.net") -> str:
        return await self.command(f"EHLO {name}")

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert await self.command("STARTTLS") == codes.READY_FOR_TLS
        await self.writer.start_tls(context, server_hostname="localhost")

    async def login(self, context: ssl.SSLContext, user: str = ALICE, password: str = PASSWORD) -> None:
        """Greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN: ready for MAIL."""
        await self.reply()
        await self.ehlo()
        await self.starttls(context)
        await self.ehlo()
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        assert await self.command(f"AUTH PLAIN {token}") == codes.AUTH_OK

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), READ_TIMEOUT)

    def close(self) -> None:
        self.writer.close()
