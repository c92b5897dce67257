"""Listeners: the protocol registry, connection admission and the live-connection set.

Invariants:
- Every listener socket is bound before the daemon drops root, then handed to
  its protocol's `start`, which serves on it; protocols never bind themselves.
- A connection is admitted only while its listener is under `max_connections`
  and its client address (IPv6 by /64) is under `connections_per_address`;
  otherwise it gets the protocol's one-line "too busy" reply and is closed.
- Every admitted connection is tracked until it ends, so SIGTERM can drain:
  stop accepting; end at once every connection waiting for its client's next
  command, and every other one as soon as its command in progress is done
  (a DATA being stored, an APPEND); cancel what is left after a grace period.
- An exception escaping a connection handler is a bug: it is logged (without
  the client address) and counted, so tests fail on hidden crashes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from runbox_mta.config import ListenerConfig
from runbox_mta.errors import RunboxError
from runbox_mta.net.clients import address_key

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger("runbox_mta.net")

# A peer that connects with implicit TLS and never finishes the handshake must
# not hold a connection slot for long.
TLS_HANDSHAKE_TIMEOUT = 30.0
# Exceptions that mean the client went away or broke TLS: nothing to answer, not a bug.
CLIENT_GONE = (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)

# Stream connections' tasks now waiting in read_some for their client (idle
# between commands), and those a draining daemon ends at their next such wait.
_awaiting_input: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
_stop_at_next_read: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


class ProtocolSpec(Protocol):
    """What a protocol package registers: how to serve on one bound socket."""

    async def start(self, listener: "BoundListener", services: "Services") -> asyncio.AbstractServer: ...


@dataclass(frozen=True)
class BoundListener:
    config: ListenerConfig
    sock: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def describe(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{self.config.protocol} on {shown}:{port} (tls: {self.config.tls})"


def bind_listener(config: ListenerConfig) -> BoundListener:
    """Bind (as root if need be) and listen; the protocol starts serving later."""
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and config.bind == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" serves IPv4 too
        sock.bind((config.bind, config.port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise RunboxError(
            f"cannot listen for {config.protocol} on {config.bind} port {config.port}: {error.strerror}"
        ) from None
    return BoundListener(config, sock)


class ConnectionTracker:
    """Admission limits and the set of live connection tasks, shared by all listeners."""

    def __init__(self, per_address_limit: int) -> None:
        self.per_address_limit = per_address_limit
        self._per_address: Counter[str] = Counter()
        self._per_listener: Counter[int] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stoppers: dict[asyncio.Task[Any], Callable[[], None]] = {}
        self.crashes = 0

    def admit(self, listener: ListenerConfig, ip: str) -> bool:
        key = address_key(ip)
        if self._per_listener[id(listener)] >= listener.max_connections:
            return False
        if self._per_address[key] >= self.per_address_limit:
            return False
        self._per_listener[id(listener)] += 1
        self._per_address[key] += 1
        return True

    def release(self, listener: ListenerConfig, ip: str) -> None:
        key = address_key(ip)
        self._per_listener[id(listener)] -= 1
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]

    def track(self, task: asyncio.Task[Any], stop_when_idle: Callable[[], None] | None = None) -> None:
        """Track a connection's task; `stop_when_idle` ends it at drain (default: the next
        read_some of a stream connection's task ends it)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if stop_when_idle is not None:
            self._stoppers[task] = stop_when_idle
            task.add_done_callback(self._stoppers.pop)

    @property
    def live(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """End idle connections now and busy ones after their command in progress; after
        `grace` seconds cancel the rest."""
        for task in list(self._tasks):
            stopper = self._stoppers.get(task)
            if stopper is not None:
                stopper()
            elif task in _awaiting_input:
                task.cancel()  # handlers answer a cancel with their shutdown reply
            else:
                _stop_at_next_read.add(task)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        leftovers = set(self._tasks)
        for task in leftovers:
            task.cancel()  # handlers answer a cancel with their shutdown reply
        if leftovers:
            await asyncio.wait(leftovers, timeout=1.0)


@dataclass
class Connection:
    """One admitted stream connection, as a stream-based protocol sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    listener: ListenerConfig
    client_ip: str

    @property
    def tls_active(self) -> bool:
        return self.writer.get_extra_info("ssl_object") is not None

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade in place (STARTTLS/STLS); anything the client pipelined in
        plaintext after the command is discarded, never read as a command.

        Call it right after writing the "go ahead" reply, with no await in
        between: once the client has that reply its ClientHello may arrive,
        and if it lands in the plaintext buffer first it is discarded here
        and the handshake hangs. (writer.start_tls flushes the reply itself.)"""
        self.reader._buffer.clear()  # type: ignore[attr-defined]  # RFC 3207 §4.2 / CVE-2011-0411
        await self.writer.start_tls(context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)


class IdleTimeout(Exception):
    """The client sent nothing for the protocol's idle timeout."""


async def read_some(reader: asyncio.StreamReader, timeout: float, limit: int = 65536) -> bytes:
    """Read what has arrived (b'' at EOF), raising IdleTimeout after `timeout` of silence."""
    async with waiting_for_client():
        try:
            return await asyncio.wait_for(reader.read(limit), timeout)
        except asyncio.TimeoutError:
            raise IdleTimeout from None


@asynccontextmanager
async def waiting_for_client() -> AsyncIterator[None]:
    """Around a stream connection's wait for its client (between commands, or in IMAP IDLE):
    a draining daemon cancels the task here, and the handler answers with its shutdown
    reply, rather than in the middle of a command; one that began draining meanwhile
    ends the task on entry."""
    task = asyncio.current_task()
    assert task is not None
    if task in _stop_at_next_read:
        task.cancel()
        await asyncio.sleep(0)  # raises CancelledError here
    _awaiting_input.add(task)
    try:
        yield
    finally:
        _awaiting_input.discard(task)


ConnectionHandler = Callable[[Connection], Awaitable[None]]


async def serve_streams(
    listener: BoundListener,
    services: "Services",
    handle: ConnectionHandler,
    busy_reply: bytes,
) -> asyncio.AbstractServer:
    """Serve a stream protocol on a bound listener with the shared limits and tracking."""
    tracker = services.connections
    implicit_tls = services.tls.server_context() if listener.config.tls == "implicit" else None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("unknown",)
        ip = str(peer[0])
        if not tracker.admit(listener.config, ip):
            await _refuse(writer, busy_reply)
            return
        task = asyncio.current_task()
        assert task is not None
        tracker.track(task)
        try:
            await handle(Connection(reader, writer, listener.config, ip))
        except CLIENT_GONE:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            tracker.crashes += 1
            log.exception("%s connection handler failed", listener.config.protocol)
        finally:
            tracker.release(listener.config, ip)
            await _close(writer)

    return await asyncio.start_server(
        on_connect, sock=listener.sock, ssl=implicit_tls,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
    )


class SessionProtocol(Protocol):
    """What serve_protocol needs from the asyncio.Protocol of one connection (aiosmtpd's SMTP)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start serving; from here on the transport talks to this protocol directly."""

    @property
    def session_task(self) -> asyncio.Task[Any] | None:
        """The task serving the connection, started by connection_made; its end ends the connection."""

    def shutdown(self) -> None:
        """The daemon is stopping: send the protocol's goodbye reply and close (no awaiting)."""

    def stop_when_idle(self) -> None:
        """The daemon is draining: `shutdown` now if between commands, else once the command in
        progress is answered."""


SessionFactory = Callable[[str], SessionProtocol]  # client IP -> the connection's protocol


async def serve_protocol(
    listener: BoundListener,
    services: "Services",
    factory: SessionFactory,
    busy_reply: bytes,
) -> asyncio.AbstractServer:
    """serve_streams for a Protocol-based server: the same admission limits, tracking and
    crash accounting, with `factory` building each admitted connection's protocol."""
    tracker = services.connections
    implicit_tls = services.tls.server_context() if listener.config.tls == "implicit" else None
    return await asyncio.get_running_loop().create_server(
        lambda: _Gate(tracker, listener.config, factory, busy_reply), sock=listener.sock, ssl=implicit_tls,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
    )


class _Gate(asyncio.Protocol):
    """The first protocol of every connection: admit it and hand the transport over, or refuse it.

    Admission needs the peer address, which a protocol factory does not get,
    so the gate decides in connection_made and then steps out of the way
    (transport.set_protocol), leaving the session's protocol on the transport.
    """

    def __init__(self, tracker: ConnectionTracker, listener: ListenerConfig, factory: SessionFactory,
                 busy_reply: bytes) -> None:
        self._tracker = tracker
        self._listener = listener
        self._factory = factory
        self._busy_reply = busy_reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("unknown",)
        ip = str(peer[0])
        if not self._tracker.admit(self._listener, ip):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(self._busy_reply)
            transport.close()
            return
        try:
            session = self._factory(ip)
            transport.set_protocol(session)
            session.connection_made(transport)
            task = session.session_task
            assert task is not None, "connection_made must start the session task"
        except Exception:
            self._tracker.release(self._listener, ip)
            self._tracker.crashes += 1
            log.exception("%s session could not start", self._listener.protocol)
            transport.abort()
            return
        task.add_done_callback(self._account)
        self._tracker.track(asyncio.get_running_loop().create_task(self._supervise(session, task, ip)),
                            session.stop_when_idle)

    async def _supervise(self, session: SessionProtocol, task: asyncio.Task[Any], ip: str) -> None:
        """Tracked in the session's place: on drain, `shutdown` says goodbye before the session is cancelled."""
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            session.shutdown()
            task.cancel()
            raise
        finally:
            self._tracker.release(self._listener, ip)

    def _account(self, task: asyncio.Task[Any]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, CLIENT_GONE):
            self._tracker.crashes += 1
            log.error("%s session failed", self._listener.protocol, exc_info=error)


async def _refuse(writer: asyncio.StreamWriter, reply: bytes) -> None:
    try:
        writer.write(reply)
        await asyncio.wait_for(writer.drain(), 5)
    except (OSError, asyncio.TimeoutError):
        pass
    await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        pass
