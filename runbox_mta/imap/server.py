"""The IMAP listener protocol: asyncio glue around the receiver and the session.

Per connection: read with the session's idle timeout (a short one before
login), feed the receiver, hand commands to the session, write and drain
its responses, and do what only the glue can: STARTTLS, the AUTHENTICATE
continuation, and IDLE, which waits on the client and on the store's change
bus at once. The bus carries every committed APPEND, EXPUNGE and flag change,
other daemons' too (relayed over PostgreSQL LISTEN/NOTIFY), so IDLE needs no
poll: an event, or word that events were lost, makes it read the mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from typing import TYPE_CHECKING

from runbox_mta.imap.responses import status
from runbox_mta.imap.session import MAILBOX_GONE_REPLY, SERVICE_ERRORS, Outcome, Selected, Session
from runbox_mta.imap.session_state import MailboxGone
from runbox_mta.imap.wire import (
    IdleDone, NeedLiteral, NeedMore, ProtocolError, RawCommand, Receiver, SaslResponse,
)
from runbox_mta.net.listener import BoundListener, Connection, IdleTimeout, read_some, serve_streams, waiting_for_client
from runbox_mta.store.changes import Subscription

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger("runbox_mta.imap")

BUSY_REPLY = status("BYE", "Too many connections, try again later.", "UNAVAILABLE")
IDLE_TIMEOUT_REPLY = status("BYE", "Disconnected for inactivity.")
SHUTDOWN_REPLY = status("BYE", "Server shutting down.", "UNAVAILABLE")
CONTINUE_LITERAL = b"+ Ready for literal data\r\n"  # RFC 9051 §7.5
GOODBYE_TIMEOUT = 1.0
READ_SIZE = 65536
# Responses are queued up to this size between writes to the connection (see send).
SEND_BATCH = 64 * 1024
# Inflated input is fed to the receiver this much at a time (it enforces the limits).
INFLATE_CHUNK = 256 * 1024


class ImapProtocol:
    """The "imap" listener protocol (143 with STARTTLS, 993 implicit TLS)."""

    async def start(self, listener: BoundListener, services: Services) -> asyncio.AbstractServer:
        async def handle(conn: Connection) -> None:
            await ImapConnection(conn, services).run()

        return await serve_streams(listener, services, handle, BUSY_REPLY)


class _StreamOutput:
    def __init__(self, connection: ImapConnection) -> None:
        self._connection = connection

    def write(self, data: bytes) -> None:
        self._connection.send(data)

    async def flush(self) -> None:
        await self._connection.drain()


class ImapConnection:
    def __init__(self, conn: Connection, services: Services) -> None:
        self.conn = conn
        self.services = services
        self.receiver = Receiver.from_limits(services.config.limits)
        self.session = Session(services, _StreamOutput(self), tls=conn.tls_active,
                               starttls_offered=conn.listener.tls == "starttls", client_ip=conn.client_ip)
        self._deflate: zlib._Compress | None = None
        self._inflate: zlib._Decompress | None = None
        self._compressed = b""  # received, not yet inflated
        self._unsent: list[bytes] = []  # see send
        self._unsent_size = 0

    async def run(self) -> None:
        try:
            self.send(self.session.greeting())
            await self.drain()
            while await self._step():
                pass
        except IdleTimeout:
            await self._goodbye(IDLE_TIMEOUT_REPLY)
        except asyncio.CancelledError:
            await self._goodbye(SHUTDOWN_REPLY)
            raise

    async def _step(self) -> bool:
        """Handle one event, or read more; False once the connection should end."""
        event = self.receiver.next_event()
        if isinstance(event, NeedMore):
            if self._inflate_more():
                return True
            data = await read_some(self.conn.reader, self.session.timeout, READ_SIZE)
            self.receive(data)
            return bool(data)
        if isinstance(event, NeedLiteral):
            self.send(CONTINUE_LITERAL)
            await self.drain()
            return True
        if isinstance(event, ProtocolError):
            outcome = self.session.reply_error(event.tag, event.status, event.message, event.code, event.close)
        elif isinstance(event, RawCommand):
            outcome = await self.session.execute(event)
        else:
            # IdleDone arrives only while idling, where _idle_loop reads the events itself.
            assert isinstance(event, SaslResponse), event
            outcome = await self.session.sasl_response(event.line)
        return await self._follow(outcome)

    async def _follow(self, outcome: Outcome) -> bool:
        if outcome is Outcome.STARTTLS:
            # No await between the OK and start_tls (see Connection.start_tls);
            # pipelined plaintext is discarded (RFC 9051 §6.2.1, CVE-2011-0411).
            self.receiver.take_pending()
            self._write_unsent()  # the OK, in plaintext
            try:
                await self.conn.start_tls(self.services.tls.server_context())
            except asyncio.TimeoutError:
                raise ConnectionAbortedError("TLS handshake timed out") from None
            self.session.tls_started()
            return True
        await self.drain()
        if outcome is Outcome.CLOSE:
            return False
        if outcome is Outcome.COMPRESS:
            self._start_compression()
        if outcome is Outcome.SASL:
            self.receiver.expect_sasl_response()
        elif outcome is Outcome.IDLE:
            return await self._idle()
        return True

    async def _idle(self) -> bool:
        """RFC 2177: push updates until DONE; False if the client went away."""
        self.receiver.expect_done()
        state = self.session.state
        if not isinstance(state, Selected):
            return await self._idle_loop(None)
        with self.services.store.subscribe(mailbox_id=state.view.mailbox_id) as subscription:
            # A change committed between IDLE's own sync and subscribing published its event to nobody.
            if not await self._push_changes():
                return False
            return await self._idle_loop(subscription)

    async def _idle_loop(self, subscription: Subscription | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.session.timeout
        while True:
            event = self.receiver.next_event()
            if isinstance(event, IdleDone):
                return await self._follow(await self.session.idle_done())
            if isinstance(event, ProtocolError):
                return await self._follow(await self.session.idle_done(event.message))
            assert isinstance(event, NeedMore), event
            if self._inflate_more():
                continue
            data, changed = await self._wait_idle(subscription, deadline - loop.time())
            if changed and not await self._push_changes():
                return False
            if data is None:
                continue
            if not data:
                return False
            self.receive(data)

    async def _push_changes(self) -> bool:
        """Tell the idling client what changed; False if the connection must end."""
        if not isinstance(self.session.state, Selected):
            return True
        try:
            await self.session.sync(expunges=True)
        except MailboxGone:
            self.send(MAILBOX_GONE_REPLY)
            await self.drain()
            return False
        except SERVICE_ERRORS:
            # The next change tries again; the client is still idling.
            log.warning("imap: IDLE could not read mailbox changes", exc_info=True)
        await self.drain()
        return True

    async def _wait_idle(self, subscription: Subscription | None, timeout: float) -> tuple[bytes | None, bool]:
        """Client bytes (b"" at EOF) if any, and whether the mailbox changed; IdleTimeout after `timeout`."""
        read = asyncio.ensure_future(self.conn.reader.read(READ_SIZE))
        change = asyncio.ensure_future(subscription.get()) if subscription is not None else None
        waiting = {read} if change is None else {read, change}
        try:
            async with waiting_for_client():  # idling between commands: a drain ends it here
                await asyncio.wait(waiting, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.wait(waiting)
        # A read or an event that completed while the others were cancelled still counts.
        data = None if read.cancelled() else read.result()
        changed = change is not None and not change.cancelled()
        if changed:
            assert change is not None and subscription is not None
            change.exception()  # an event, or ChangesLost: either way the mailbox is read again
            subscription.clear()  # that read covers whatever else is queued
        elif data is None:
            raise IdleTimeout
        return data, changed

    # --- the byte stream, deflated after COMPRESS (RFC 4978) -----------------------------------

    def send(self, data: bytes) -> None:
        """Queue `data`; `drain` (after every command) sends what is queued as one write: one TLS
        record for a FETCH's hundred lines rather than a hundred, each with its own encryption."""
        self._unsent.append(data)
        self._unsent_size += len(data)
        if self._unsent_size >= SEND_BATCH:
            self._write_unsent()

    def _write_unsent(self) -> None:
        if not self._unsent:
            return
        data = b"".join(self._unsent)
        self._unsent.clear()
        self._unsent_size = 0
        if self._deflate is not None:
            # A sync flush per write: the client must see each response without waiting for more.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.conn.writer.write(data)

    def receive(self, data: bytes) -> None:
        if self._inflate is None:
            self.receiver.feed(data)
            return
        self._compressed += data
        self._inflate_more()

    def _inflate_more(self) -> bool:
        """Inflate at most INFLATE_CHUNK more bytes; a small input cannot make a huge buffer (zip bomb)."""
        if self._inflate is None or not self._compressed:
            return False
        try:
            data = self._inflate.decompress(self._compressed, INFLATE_CHUNK)
        except zlib.error:
            raise ConnectionAbortedError("invalid DEFLATE stream") from None  # nothing to answer: no framing left
        self._compressed = self._inflate.unconsumed_tail
        self.receiver.feed(data)
        return bool(data) or bool(self._compressed)

    def _start_compression(self) -> None:
        # RFC 4978 §3: both directions compress right after the OK; what the client
        # sent after COMPRESS is already compressed.
        pending = self.receiver.take_pending()
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self.receive(pending)

    async def drain(self) -> None:
        self._write_unsent()
        transport = self.conn.writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0] \
                and not transport.is_closing():
            return  # below the low-water mark writing is not paused: nothing to wait for (nor a timer to set)
        # A client that stops reading is as idle as one that stops writing.
        try:
            async with asyncio.timeout(self.session.timeout):
                await self.conn.writer.drain()
        except TimeoutError:
            raise IdleTimeout from None

    async def _goodbye(self, reply: bytes) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError, RuntimeError):
            self.send(reply)
            self._write_unsent()
            await asyncio.wait_for(self.conn.writer.drain(), GOODBYE_TIMEOUT)

