"""One delivery attempt: several queued messages to one destination domain, over as few
connections as possible.

The route's hops are tried in order (RFC 5321 §5.1); the first that gives a
session carries every message, one transaction each (connection reuse). If
it fails mid-way, the messages not yet done move on to the next hop. Results
accumulate in `Attempt.results` as they come, so a caller that has to stop
an attempt (timeout, shutdown) still knows what was already delivered.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runbox_mta.config import OutboundConfig
from runbox_mta.dns import Resolver
from runbox_mta.queue.dane import DaneLookupFailed, dane_policy
from runbox_mta.queue.mta_sts import MtaSts, Policy
from runbox_mta.queue.routes import Hop, Route, RouteError, RoutePermError, resolve_route
from runbox_mta.queue.scheduler import Result, State
from runbox_mta.smtp.client import (
    Envelope, Reply, Session, SmtpClientError, TlsPolicy, TlsRequired, open_session,
)
from runbox_mta.store.queue import ClaimedMessage
from runbox_mta.tls import TlsContextFactory

log = logging.getLogger(__name__)

# The width of the store's tls_outcome column: longer outcomes are cut, not refused.
TLS_OUTCOME_LIMIT = 200


@dataclass(frozen=True)
class Outbound:
    """What an attempt needs from the daemon."""

    hostname: str  # our EHLO name
    config: OutboundConfig
    resolver: Resolver
    tls: TlsContextFactory
    authenticated: ssl.SSLContext  # PKIX and host name checks (authenticating_context)
    mta_sts: MtaSts  # the daemon's policy cache
    rng: random.Random = field(default_factory=random.Random)


def authenticating_context(tls: TlsContextFactory, ca_file: Path | None) -> ssl.SSLContext:
    """tls.py's verifying client context (system CAs), also trusting [outbound] ca_file.

    The CAs are added to the factory's own context rather than to a copy, so
    its TLS policy stays defined in one place; nothing else uses that context.
    """
    context = tls.client_context(verify=True)
    if ca_file is not None:
        context.load_verify_locations(ca_file)
    return context


@dataclass(frozen=True)
class Pending:
    message: ClaimedMessage
    data: bytes


class Attempt:
    def __init__(self, outbound: Outbound, domain: str, pending: list[Pending]) -> None:
        self._outbound = outbound
        self.domain = domain
        self._pending = pending
        self.results: list[Result] = []

    async def run(self) -> None:
        """Deliver what can be delivered; every recipient ends with a result."""
        last_error, tls_outcome = "no mail host to try", None
        try:
            route = await resolve_route(self.domain, self._outbound.config.routes, self._outbound.config.port,
                                        self._outbound.resolver, self._outbound.rng)
        except RouteError as error:
            state = State.FAILED if isinstance(error, RoutePermError) else State.DEFERRED
            self._finish_all(state, str(error), None, None)
            return
        # RFC 8461 covers delivery to MX hosts; a configured route is the operator's own choice.
        sts = await self._outbound.mta_sts.policy(self.domain) if route.via == "mx" else None
        for hop in route.hops:
            if not self._pending:
                return
            try:
                session = await self._open(hop, route, sts)
            except (SmtpClientError, DaneLookupFailed) as error:
                last_error, tls_outcome = f"{_describe(hop)}: {error}", None
                continue
            tls_outcome = session.tls_outcome
            try:
                await self._transmit(session, hop)
            except SmtpClientError as error:
                last_error = f"{_describe(hop)}: {error}"
            finally:
                await session.quit()
        self._finish_all(State.DEFERRED, last_error, None, tls_outcome)

    async def _transmit(self, session: Session, hop: Hop) -> None:
        while self._pending:
            item = self._pending[0]
            message = item.message
            addresses = tuple(recipient.address for recipient in message.recipients)
            replies = await session.send(Envelope(message.sender, addresses, item.data))
            for recipient in message.recipients:
                reply = replies[recipient.address]
                state = State.DELIVERED if reply.positive else State.DEFERRED if reply.temporary else State.FAILED
                self.results.append(Result(recipient, state, reply.text, hop.host,
                                           session.tls_outcome[:TLS_OUTCOME_LIMIT]))
            self._pending.pop(0)
            log.info("queue %d: %s over %s", message.queue_id, _summary(replies.values()), session.tls_outcome)

    async def _open(self, hop: Hop, route: Route, sts: Policy | None) -> Session:
        """A session to the hop under the strongest TLS policy that applies (SPEC §4): DANE where
        secure TLSA records exist (RFC 8461 §2: before MTA-STS), MTA-STS `enforce`, a configured
        `verify`, MTA-STS `testing`, else opportunistic (RFC 7435)."""
        outbound = self._outbound
        unverified = outbound.tls.client_context(verify=False)
        dane = await dane_policy(outbound.resolver, hop.host, hop.port, self.domain) if route.authenticated else None
        if dane is not None:
            # RFC 7672 §2.2: mandatory TLS, authenticated by the chain against the TLSA records.
            tls = TlsPolicy(unverified, required=True, server_name=hop.host, peer_check=dane.check)
        elif sts is not None and sts.mode == "enforce":
            if not sts.allows(hop.host):
                raise TlsRequired("the MX host is not listed in the MTA-STS policy")  # RFC 8461 §4.1
            # RFC 8461 §4.2: a certificate valid for the MX host name, with SNI; no plaintext (§5).
            tls = TlsPolicy(outbound.authenticated, required=True, server_name=hop.host,
                            outcome="verified by MTA-STS")
        elif outbound.config.tls_policy.get(self.domain) == "verify":
            # The certificate must name the MX host (as Postfix `verify`); Python
            # sends no SNI for an address literal and matches it against IP SANs.
            tls = TlsPolicy(outbound.authenticated, required=True, server_name=hop.host,
                            outcome="verified by certificate")
        elif sts is not None:
            return await self._open_testing(hop, sts)
        else:
            tls = TlsPolicy(unverified, server_name=hop.host)
        return await open_session(hop.address, hop.port, helo=outbound.hostname, tls=tls)

    async def _open_testing(self, hop: Hop, sts: Policy) -> Session:
        """RFC 8461 §5: under `testing`, deliver as without a policy, but record what `enforce`
        would have refused (the outcome ends "MTA-STS testing failed: why")."""
        outbound = self._outbound
        problem = "the MX host is not listed in the MTA-STS policy"
        if sts.allows(hop.host):
            try:
                return await open_session(hop.address, hop.port, helo=outbound.hostname, tls=TlsPolicy(
                    outbound.authenticated, required=True, server_name=hop.host,
                    outcome="verified by MTA-STS (testing)"))
            except TlsRequired as error:
                problem = str(error)
        session = await open_session(hop.address, hop.port, helo=outbound.hostname,
                                     tls=TlsPolicy(outbound.tls.client_context(verify=False), server_name=hop.host))
        session.tls_outcome = f"{session.tls_outcome}; MTA-STS testing failed: {problem}"
        return session

    def _finish_all(self, state: State, diagnostic: str, remote_mta: str | None, tls_outcome: str | None) -> None:
        for item in self._pending:
            for recipient in item.message.recipients:
                self.results.append(Result(recipient, state, diagnostic, remote_mta,
                                           tls_outcome and tls_outcome[:TLS_OUTCOME_LIMIT]))
            log.info("queue %d: %s", item.message.queue_id, state.value)
            log.debug("queue %d: %s: %s", item.message.queue_id, state.value, diagnostic)
        self._pending = []


def _describe(hop: Hop) -> str:
    """A hop for last_error, which only operators read (queue list)."""
    return f"{hop.host}[{hop.address}]:{hop.port}"


def _summary(replies: Iterable[Reply]) -> str:
    """Counts only: the log names no recipient (SPEC §7)."""
    codes = [reply.code // 100 for reply in replies]
    return f"{codes.count(2) + codes.count(3)} delivered, {codes.count(4)} deferred, {codes.count(5)} failed"
