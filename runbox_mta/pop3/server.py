"""The POP3 listener protocol: asyncio glue around the pure session.

Per connection: read with the idle timeout, feed the line receiver, hand its
events to the session, write the replies, and perform the session's requests
(the auth service, the store, STLS). The maildrop lock is released however
the connection ends; only QUIT in TRANSACTION deletes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from runbox_mta.errors import NotFound, RunboxError
from runbox_mta.log import client_label
from runbox_mta.net.listener import BoundListener, Connection, IdleTimeout, read_some, serve_streams
from runbox_mta.pop3 import message
from runbox_mta.pop3.session import (
    BUSY_REPLY, END_OF_MULTILINE, IDLE_TIMEOUT_REPLY, SHUTDOWN_REPLY, Action, Authenticate, Close,
    CommitDeletions, DeletionsCommitted, FetchMessage, MaildropBusy, MaildropOpened, MessageData,
    MessageGone, OpenMaildrop, Request, RequestFailed, Result, Send, SendMessage, Session, StartTls,
    TlsStarted,
)
from runbox_mta.pop3.wire import Line, LineReceiver, LineTooLong
from runbox_mta.store.maildrop import MaildropInUse

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger("runbox_mta.pop3")

# RETR goes out in slices of this size, each waiting for the socket to drain,
# so a slow client holds one slice of buffer, not the whole message.
SEND_CHUNK = 64 * 1024
# Rendering (CRLF, dot-stuffing) more than this stalls other connections: it runs in a thread.
INLINE_RENDER_LIMIT = 64 * 1024
# A goodbye to a client that does not read must not delay shutdown.
GOODBYE_TIMEOUT = 1.0
# Store and auth failures: answered -ERR [SYS/TEMP] and logged; anything else is a bug.
SERVICE_ERRORS = (RunboxError, SQLAlchemyError, OSError)


class Pop3Protocol:
    """The "pop3" listener protocol (110 with STLS, 995 implicit TLS)."""

    async def start(self, listener: BoundListener, services: Services) -> asyncio.AbstractServer:
        async def handle(conn: Connection) -> None:
            await Pop3Connection(conn, services).run()

        return await serve_streams(listener, services, handle, BUSY_REPLY.data)


class Pop3Connection:
    """One client connection: the session, its receiver and its maildrop lock."""

    def __init__(self, conn: Connection, services: Services) -> None:
        self.conn = conn
        self.services = services
        self.timeout = services.config.limits.pop3_idle_timeout
        self.session = Session(tls=conn.tls_active)
        self.receiver = LineReceiver()
        self._cleanup = contextlib.AsyncExitStack()  # releases the maildrop lock, however the session ends

    async def run(self) -> None:
        async with self._cleanup:
            try:
                await self._act(self.session.greeting())
                while not self.session.closed and await self._step():
                    pass
            except IdleTimeout:
                await self._goodbye(IDLE_TIMEOUT_REPLY)
            except asyncio.CancelledError:
                await self._goodbye(SHUTDOWN_REPLY)
                raise

    async def _step(self) -> bool:
        """Handle one line, or read more; False once the client hung up (which deletes nothing)."""
        event = self.receiver.next_event(self.session.max_line)
        if isinstance(event, (Line, LineTooLong)):
            await self._act(self.session.receive(event))
            return True
        data = await read_some(self.conn.reader, self.timeout)
        self.receiver.feed(data)
        return bool(data)

    async def _act(self, actions: list[Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Request):
                # No drain (no await at all) before STLS: between "+OK" and start_tls
                # the client's ClientHello could land in the plaintext buffer, which
                # start_tls clears. start_tls flushes the "+OK" itself.
                pending += self.session.complete(await self._perform(action))
            elif isinstance(action, Send):
                self.conn.writer.write(action.data)
            elif isinstance(action, SendMessage):
                await self._send_message(action)
            else:
                assert isinstance(action, Close)
        await self._drain()

    async def _perform(self, request: Request) -> Result:
        if isinstance(request, StartTls):
            try:
                await self.conn.start_tls(self.services.tls.server_context())
            except asyncio.TimeoutError:
                raise ConnectionAbortedError("TLS handshake timed out") from None  # the client's fault
            self.receiver = LineReceiver()  # plaintext read ahead of the handshake is discarded too
            return TlsStarted()
        try:
            return await self._use_services(request)
        except SERVICE_ERRORS:
            log.exception("pop3 %s failed (%s)", type(request).__name__, client_label(self.conn.client_ip))
            return RequestFailed()

    async def _use_services(self, request: Request) -> Result:
        store = self.services.store
        if isinstance(request, Authenticate):
            return await self.services.auth.authenticate(
                request.username, request.password, protocol="pop3", client_address=self.conn.client_ip)
        if isinstance(request, OpenMaildrop):
            try:
                lock, maildrop = await store.open_maildrop(request.account_id)
            except MaildropInUse:
                return MaildropBusy()
            self._cleanup.push_async_callback(lock.release)
            return MaildropOpened(maildrop)
        if isinstance(request, FetchMessage):
            try:
                return MessageData(await store.read_message(request.mailbox_id, request.uid))
            except NotFound:
                return MessageGone()
        assert isinstance(request, CommitDeletions)
        await store.expunge(request.mailbox_id, request.uids)  # durable before the +OK
        log.info("pop3: %d messages deleted at QUIT", len(request.uids))
        return DeletionsCommitted()

    async def _send_message(self, action: SendMessage) -> None:
        if len(action.data) > INLINE_RENDER_LIMIT:
            payload = await asyncio.to_thread(_render, action)
        else:
            payload = _render(action)
        view = memoryview(payload)
        for start in range(0, len(view), SEND_CHUNK):
            self.conn.writer.write(view[start:start + SEND_CHUNK])
            await self._drain()
        self.conn.writer.write(END_OF_MULTILINE)

    async def _drain(self) -> None:
        # A client that stops reading is as idle as one that stops writing.
        try:
            async with asyncio.timeout(self.timeout):
                await self.conn.writer.drain()
        except TimeoutError:
            raise IdleTimeout from None

    async def _goodbye(self, reply: Send) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError, RuntimeError):
            self.conn.writer.write(reply.data)
            await asyncio.wait_for(self.conn.writer.drain(), GOODBYE_TIMEOUT)


def _render(action: SendMessage) -> bytes:
    if action.body_lines is None:
        return message.transmitted(action.data)
    return message.top(action.data, action.body_lines)
