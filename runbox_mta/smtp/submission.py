"""Submission (RFC 6409): the provider's own users sending mail, on 587 (STARTTLS) and 465 (TLS).

Everything needs AUTH, and AUTH needs TLS. MAIL FROM must be the account's
address, an alias delivering to it, or a +tag form of either. The message
gets a Message-ID and a Date if it lacks them (RFC 6409 §8.2, §8.3), a
Received field without the user's IP address or host name, and a DKIM
signature by the author's domain (the From: domain if hosted here, else
the MAIL FROM domain) before it is stored: local and queued copies are
then the same signed message.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiosmtpd.smtp import Session

from runbox_mta.auth.service import AuthResult
from runbox_mta.errors import RunboxError
from runbox_mta.smtp import headers, signing
from runbox_mta.smtp.address import domain_part
from runbox_mta.smtp.delivery import Delivery, plan
from runbox_mta.smtp.handler import MailHandler
from runbox_mta.smtp.session import MailEnvelope, SmtpSession
from runbox_mta.store import Domain
from runbox_mta.tls import describe_tls

class SubmissionHandler(MailHandler):
    async def owned_senders(self, session: Session) -> frozenset[str] | None:
        user: AuthResult = session.auth_data
        assert user.address is not None
        return await self.store.sender_addresses(user.address)

    async def prepare(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                      data: bytes) -> Delivery | str:
        assert envelope.mail_from is not None
        now = datetime.now(UTC)
        queue_id = headers.new_queue_id()
        message = data
        present = headers.field_names(data)
        if "message-id" not in present:
            message = headers.append_to_header(message, headers.message_id(self.hostname))
        if "date" not in present:
            message = headers.append_to_header(message, headers.date(now))
        trace = headers.received(
            source=None, hostname=self.hostname,
            protocol=headers.protocol_keyword(extended=session.extended_smtp, tls=True, authenticated=True),
            tls=describe_tls(server.ssl_object), queue_id=queue_id, now=now,
        )
        message = await self.sign(headers.prepend(message, trace), envelope.mail_from)
        return plan(envelope.mail_from, envelope.resolutions, message, queue_id)

    async def sign(self, message: bytes, mail_from: str) -> bytes:
        domain = await self.signing_domain(headers.author_domain(message), domain_part(mail_from))
        if domain is None:
            return message
        return await signing.sign(message, domain=domain.name, selector=domain.dkim_selector,
                                  private_key_pem=domain.dkim_private_key)

    async def signing_domain(self, *candidates: str | None) -> Domain | None:
        """The first hosted domain among `candidates`: only those have a key here."""
        for name in filter(None, candidates):
            try:
                return await self.store.get_domain(name)
            except RunboxError:  # not hosted, or not a domain name at all
                continue
        return None
