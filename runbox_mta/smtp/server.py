"""The `smtp` (MX) and `submission` listener protocols: aiosmtpd sessions on the daemon's loop.

Each listener gets one handler and one SessionSettings; every admitted
connection gets its own SmtpSession, created by net.listener.serve_protocol
(the same admission limits, tracking and draining as the other protocols)
on the running event loop: uvloop in the daemon, not aiosmtpd's threaded
Controller.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from runbox_mta.auth.service import AuthResult
from runbox_mta.net.listener import BoundListener, serve_protocol
from runbox_mta.smtp import codes
from runbox_mta.smtp.handler import MailHandler
from runbox_mta.smtp.inbound import InboundHandler
from runbox_mta.smtp.session import SessionSettings, SmtpSession
from runbox_mta.smtp.submission import SubmissionHandler

if TYPE_CHECKING:
    from runbox_mta.app import Services

BUSY_REPLY = codes.BUSY.encode("ascii") + b"\r\n"


class SmtpProtocol:
    """A ProtocolSpec: the MX (`submission=False`) or submission."""

    def __init__(self, *, submission: bool) -> None:
        self.submission = submission

    async def start(self, listener: BoundListener, services: "Services") -> asyncio.AbstractServer:
        tls = listener.config.tls
        settings = SessionSettings(
            hostname=services.config.hostname,
            submission=self.submission,
            starttls=services.tls.server_context() if tls == "starttls" else None,
            require_tls=self.submission and tls == "starttls",
            limits=services.config.limits,
            authenticate=lambda user, password, ip: _authenticate(services, user, password, ip),
        )
        handler: MailHandler = SubmissionHandler(services) if self.submission else InboundHandler(services)
        return await serve_protocol(listener, services, lambda ip: SmtpSession(handler, settings, ip), BUSY_REPLY)


async def _authenticate(services: "Services", user: str, password: str, client_ip: str) -> AuthResult:
    return await services.auth.authenticate(user, password, protocol="smtp", client_address=client_ip)
