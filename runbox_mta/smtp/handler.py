"""The aiosmtpd hooks the MX and submission share; each subclass decides senders and content.

The hooks stay thin: they gather facts (the store's answer for a recipient,
the session's TLS and AUTH state) and apply the pure decisions in
policy.py. An exception escaping a hook is a bug: aiosmtpd hands it to
`handle_exception`, which counts it with the connection crashes (tests
assert there are none) and answers 451, never a traceback on the wire.
"""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Session, TLSSetupException

from runbox_mta.net.listener import CLIENT_GONE
from runbox_mta.smtp import codes
from runbox_mta.smtp.address import declared_size
from runbox_mta.smtp.delivery import STORAGE_ERRORS, Delivery, deliver
from runbox_mta.smtp.policy import (
    content_refusal, postmaster_candidates, recipient_refusal, recipient_syntax_refusal, sender_refusal,
)
from runbox_mta.smtp.session import MailEnvelope, SmtpSession

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger(__name__)


class MailHandler(abc.ABC):
    """aiosmtpd handler: MAIL, RCPT, DATA, VRFY and errors."""

    def __init__(self, services: "Services") -> None:
        self.services = services
        self.store = services.store
        self.hostname = services.config.hostname

    async def owned_senders(self, session: Session) -> frozenset[str] | None:
        """The addresses MAIL FROM may name, or None for any (the MX)."""
        return None

    @abc.abstractmethod
    async def prepare(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                      data: bytes) -> Delivery | str:
        """The message as it will be stored, and where; or the reply refusing it."""

    async def handle_MAIL(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            owned = await self.owned_senders(session)
        except STORAGE_ERRORS as error:
            log.error("sender lookup failed: %s", error)
            return codes.STORAGE_FAILURE
        refusal = sender_refusal(address, smtputf8=envelope.smtp_utf8, owned=owned)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return codes.SENDER_OK

    async def handle_RCPT(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            address = await self.postmaster(address)
        except STORAGE_ERRORS as error:
            log.error("recipient lookup failed: %s", error)
            return codes.STORAGE_FAILURE
        refusal = recipient_syntax_refusal(address, smtputf8=envelope.smtp_utf8, accepted=len(envelope.rcpt_tos),
                                           limit=self.services.config.limits.recipients_per_message)
        if refusal:
            return refusal
        try:
            resolution = await self.store.resolve_recipient(address)
        except STORAGE_ERRORS as error:
            log.error("recipient lookup failed: %s", error)
            return codes.STORAGE_FAILURE
        refusal = recipient_refusal(resolution, may_relay=bool(session.authenticated),
                                    declared_size=declared_size(envelope.mail_options))
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.resolutions.append(resolution)
        return codes.RECIPIENT_OK

    async def postmaster(self, address: str) -> str:
        """The address a bare "Postmaster" stands for: the first candidate someone receives, else
        the first at a hosted domain (refused there as unknown, not as relaying)."""
        candidates = postmaster_candidates(address, self.hostname)
        hosted = []
        for candidate in candidates:
            resolution = await self.store.resolve_recipient(candidate)
            if resolution.hosted and not resolution.unknown:
                return candidate
            if resolution.hosted:
                hosted.append(candidate)
        return (hosted or [*candidates, address])[0]

    async def handle_DATA(self, server: SmtpSession, session: Session, envelope: MailEnvelope) -> str:
        data = envelope.original_content or b""
        refusal = content_refusal(data)
        if refusal:
            return refusal
        outcome = await self.prepare(server, session, envelope, data)
        if isinstance(outcome, str):
            return outcome
        reply = await deliver(self.store, outcome)
        if reply.startswith("250"):
            server.message_accepted()
        return reply

    async def handle_VRFY(self, server: SmtpSession, session: Session, envelope: MailEnvelope,
                          address: str) -> str:
        return codes.CANNOT_VRFY  # RFC 5321 §3.5.3: never confirm who has a mailbox here

    async def handle_exception(self, error: Exception) -> str:
        if not isinstance(error, (TLSSetupException, *CLIENT_GONE)):
            self.services.connections.crashes += 1
            log.error("SMTP session error", exc_info=error)
        return codes.INTERNAL_ERROR
