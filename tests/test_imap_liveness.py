"""One heavy IMAP session must not stall the others nor make the server buffer without bound:
a 20 MB FETCH to a client that reads slowly goes out in drained slices (plain and under
COMPRESS=DEFLATE), and a SEARCH BODY over thousands of messages parses them off the event
loop. Real daemon, real TLS, on SQLite and PostgreSQL; liveness only, no timing assertions.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbox_mta.app import Services
from runbox_mta.config import load_config
from runbox_mta.imap.server import BUSY_REPLY, ImapConnection
from runbox_mta.net.listener import BoundListener, Connection, serve_streams
from tests.daemon_config import listener_block, write_daemon_config
from tests.test_imap_server import certs, shared_certs  # noqa: F401 (fixtures)
from tests.threaded_daemon import ThreadedDaemon

pytestmark = pytest.mark.timeout(120)

ADDRESS = "ola@example.test"
PASSWORD = "correct horse battery staple"
# What the server may hold for one slow client: a slice or two and the TLS layer's buffers,
# far below the 20 MB message (the kernel's socket buffers hold part of it in any case).
BUFFER_BOUND = 1024 * 1024
CLIENT_RECEIVE_BUFFER = 64 * 1024  # a small window, so the server feels the slow reader at once
SLOW_READER_PAUSE = 1.0  # seconds the slow client reads nothing after asking for the message


def big_message() -> bytes:
    """20 MB of base64 text that DEFLATE cannot shrink much, so compression cannot hide a full buffer."""
    encoded = base64.encodebytes(random.Random(5).randbytes(15 * 1024 * 1024)).replace(b"\n", b"\r\n")
    return b"From: big@example.net\r\nSubject: twenty megabytes\r\n\r\n" + encoded


class WatchedImap:
    """The real IMAP protocol, remembering each connection's writer so a test can watch its write buffer."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, listener: BoundListener, services: Services) -> asyncio.AbstractServer:
        async def handle(conn: Connection) -> None:
            self.writers.append(conn.writer)
            await ImapConnection(conn, services).run()

        return await serve_streams(listener, services, handle, BUSY_REPLY)

    async def largest_buffer(self, stop: threading.Event) -> int:
        """The largest write buffer of any connection, sampled until `stop` is set."""
        largest = 0
        while not stop.is_set():
            sizes = [buffered(writer) for writer in self.writers if not writer.is_closing()]
            largest = max([largest, *sizes])
            await asyncio.sleep(0.002)
        return largest


def buffered(writer: asyncio.StreamWriter) -> int:
    """Bytes waiting to be sent to the client: in the TLS transport and in the socket transport under it
    (asyncio's TLS transport counts only its own part, and offers no public way to the other)."""
    transport = writer.transport
    socket_transport = transport._ssl_protocol._transport  # type: ignore[attr-defined]
    return transport.get_write_buffer_size() + socket_transport.get_write_buffer_size()


class Server(ThreadedDaemon):
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.imap = WatchedImap()
        config = load_config(write_daemon_config(tmp_path, database_url, listeners=listener_block("imap", "implicit")))
        super().__init__(config, {"imap": self.imap}, asyncio.new_event_loop)


@pytest.fixture
def server(tmp_path: Path, database_url: str, certs: Path) -> Iterator[Server]:
    started = Server(tmp_path, database_url)
    yield started
    assert started.stop() == 0, "a connection handler crashed"


@pytest.fixture
def tls_client(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "server.pem"))


class Client:
    """A blocking IMAP client over implicit TLS that reads only when asked, optionally deflated (RFC 4978)."""

    def __init__(self, server: Server, context: ssl.SSLContext, receive_buffer: int | None = None) -> None:
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port("implicit")))
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.received = b""
        self._deflate: zlib._Compress | None = None
        self._inflate: zlib._Decompress | None = None
        self.until(b"\r\n")

    def send(self, line: bytes) -> None:
        data = line + b"\r\n"
        if self._deflate is not None:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def until(self, end: bytes) -> bytes:
        """Everything up to and including `end` (which must arrive)."""
        while end not in self.received:
            data = self.sock.recv(256 * 1024)
            assert data, self.received[-200:]
            self.received += self._inflate.decompress(data) if self._inflate is not None else data
        position = self.received.index(end) + len(end)
        answer, self.received = self.received[:position], self.received[position:]
        return answer

    def chat(self, tag: bytes, command: bytes) -> bytes:
        """Send a command; every line up to its tagged reply, which must be OK."""
        self.send(tag + b" " + command)
        lines = [self.until(b"\r\n")]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.until(b"\r\n"))
        assert lines[-1].startswith(tag + b" OK "), lines
        return b"".join(lines)

    def login(self) -> None:
        self.chat(b"l", f'LOGIN {ADDRESS} "{PASSWORD}"'.encode())

    def compress(self) -> None:
        self.chat(b"z", b"COMPRESS DEFLATE")
        self._deflate, self._inflate = zlib.compressobj(wbits=-15), zlib.decompressobj(-15)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "deflate"])
def test_a_slow_reader_of_a_huge_message_holds_a_bounded_buffer_and_others_are_served(
        server: Server, tls_client: ssl.SSLContext, compressed: bool):
    message = big_message()
    server.add_account(ADDRESS, PASSWORD, [message, b"Subject: small\r\n\r\nsmall\r\n"])
    slow, other = Client(server, tls_client, CLIENT_RECEIVE_BUFFER), Client(server, tls_client)
    for client in (slow, other):
        client.login()
        client.chat(b"s", b"SELECT INBOX")
    if compressed:
        slow.compress()
    stop = threading.Event()
    sampling = asyncio.run_coroutine_threadsafe(server.imap.largest_buffer(stop), server.loop)

    slow.send(b"f FETCH 1 BODY.PEEK[]")
    time.sleep(SLOW_READER_PAUSE)  # the slow client reads nothing meanwhile
    assert b"* 2 FETCH (BODY[] {25}\r\nSubject: small" in other.chat(b"n", b"FETCH 2 BODY.PEEK[]")
    answer = slow.until(b"\r\nf OK FETCH completed.\r\n")
    stop.set()

    assert answer.startswith(b"* 1 FETCH (BODY[] {%d}\r\n" % len(message))
    assert answer[answer.index(b"}\r\n") + 3:][:len(message)] == message
    assert sampling.result(10) < BUFFER_BOUND
    for client in (slow, other):
        client.close()


SEARCHED_MESSAGES = 3_000
NEEDLES = (7, 1007, 2007)  # the messages (counted from 0) whose body holds the word searched for


def searchable(number: int) -> bytes:
    """A MIME message whose text part is base64, so SEARCH BODY must decode it."""
    text = "Lorem ipsum dolor sit amet, blåbærsyltetøy. " * 40 + ("needle" if number in NEEDLES else "")
    return (b"From: n%d@example.net\r\nSubject: message %d\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" % (number, number)
            + base64.encodebytes(text.encode()).replace(b"\n", b"\r\n"))


def test_other_sessions_are_served_while_a_search_body_parses_thousands_of_messages(
        server: Server, tls_client: ssl.SSLContext):
    inbox = server.add_account(ADDRESS, PASSWORD, [])[1]
    server.call(server.store.append_messages(inbox, [(searchable(number), (), None)
                                                     for number in range(SEARCHED_MESSAGES)]))
    searcher, other = Client(server, tls_client), Client(server, tls_client)
    for client in (searcher, other):
        client.login()
        client.chat(b"s", b"SELECT INBOX")

    searcher.send(b"f SEARCH BODY needle")
    other.chat(b"n", b"NOOP")  # answered while, or after, the search runs: never shut out
    assert searcher.until(b"f OK SEARCH completed.\r\n") == (
        b"* SEARCH " + b" ".join(b"%d" % (number + 1) for number in NEEDLES) + b"\r\nf OK SEARCH completed.\r\n")
    for client in (searcher, other):
        client.close()
