"""The MX: mail from other servers for the domains hosted here (RFC 5321).

Nobody authenticates here (AUTH is not offered, as Postfix does not on port
25), so only hosted recipients are accepted (never an open relay). Each
message is checked with SPF, DKIM and DMARC; a DMARC failure under
p=reject is refused, under p=quarantine it goes to Junk. The stored copy
gets, on top: Return-Path, Authentication-Results, Received.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiosmtpd.smtp import Session

from runbox_mta.smtp import codes, headers
from runbox_mta.smtp.address import NULL_REVERSE_PATH
from runbox_mta.smtp.auth_results import MessageAuthentication, authenticate_message
from runbox_mta.smtp.delivery import Delivery, plan
from runbox_mta.smtp.handler import MailHandler
from runbox_mta.smtp.policy import DmarcAction, dmarc_action
from runbox_mta.smtp.session import MailEnvelope, SmtpSession
from runbox_mta.tls import describe_tls


class InboundHandler(MailHandler):
    async def prepare(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                      data: bytes) -> Delivery | str:
        assert envelope.mail_from is not None
        verdict = await self.authenticate(server, session, envelope.mail_from, data)
        action = dmarc_action(verdict.dmarc, verdict.dmarc_policy)
        if action is DmarcAction.REJECT:
            return codes.DMARC_REJECT
        queue_id = headers.new_queue_id()
        trace = headers.received(
            source=(session.host_name or "", server.client_ip), hostname=self.hostname,
            protocol=headers.protocol_keyword(extended=session.extended_smtp, tls=server.tls_active,
                                              authenticated=False),
            tls=describe_tls(server.ssl_object), queue_id=queue_id, now=datetime.now(UTC),
        )
        message = headers.without_forged_auth_results(data, self.hostname)
        message = headers.prepend(message, verdict.header.encode("utf-8"), trace)
        return plan(envelope.mail_from, envelope.resolutions, message, queue_id,
                    quarantine=action is DmarcAction.QUARANTINE)

    async def authenticate(self, server: SmtpSession, session: Session, mail_from: str,
                           data: bytes) -> MessageAuthentication:
        """SPF, DKIM and DMARC for the message as it arrived (SPEC §5, RFC 8601)."""
        return await authenticate_message(
            data, client_ip=server.client_ip, helo=session.host_name or "",
            mail_from="" if mail_from == NULL_REVERSE_PATH else mail_from,
            resolver=self.services.resolver, authserv_id=self.hostname,
        )
