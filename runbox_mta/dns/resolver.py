"""The daemon's one DNS interface: plain data in, plain data out.

Protocol code asks a `Resolver` and never sees dnspython objects. Three
outcomes are kept apart, because SPF, DKIM, DMARC and MX logic treat them
differently (RFC 7208 §2.6 "none" vs "temperror", RFC 5321 §5.1):

- the name or its records do not exist: an empty result; `Answer.nxdomain`
  tells NXDOMAIN from "the name exists but has no records of that type";
- `DnsTempError`: no usable answer right now (timeout, SERVFAIL, REFUSED,
  network trouble); asking again later may succeed;
- `DnsPermError`: the question cannot be asked at all (a malformed name, a
  record type this interface does not serve); asking again cannot help.

Every query carries the AD and DO flags and `Answer.authenticated` is the AD
bit of the reply. Like Postfix, the daemon does not validate DNSSEC itself: it
trusts the configured resolver, which must validate and sit on a trusted path
(localhost) for DANE to mean anything.

The async methods serve the event loop; `sync_query` and `sync_txt` serve the
libraries that run in worker threads (pyspf, dkimpy). Both kinds are built from
the same settings, so a test's nameserver answers every lookup.

Both share one in-process cache (dnspython's LRU cache, which honours each
answer's TTL and caches NXDOMAIN and no-data answers too, with converted
answers kept in front of it until their TTL runs out): every message from
one sender domain asks the same SPF and DMARC questions, and asking even a
local caching resolver again costs a socket, a round trip and a parse per
question (a sixth of the MX's CPU under load, measured). Failures (timeouts,
SERVFAIL) are never cached.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

DEFAULT_PORT = 53
# The longest single try at one nameserver. A silent server (or, over
# asyncio's UDP, an unreachable one) costs a whole try, so each try is also
# capped at an equal share of the overall timeout: every nameserver gets its turn.
_ATTEMPT_TIMEOUT = 2.0
# The EDNS buffer size of DNS flag day 2020: large answers come back truncated
# instead of fragmented, and the resolver then retries over TCP.
_EDNS_PAYLOAD = 1232
# Distinct questions kept: a busy MX sees a few thousand sender domains an hour.
CACHE_SIZE = 20_000


class DnsError(Exception):
    """A lookup gave no answer; the message never names the domain (SPEC §7)."""


class DnsTempError(DnsError):
    """Timeout, SERVFAIL, REFUSED or network trouble: try again later."""


class DnsPermError(DnsError):
    """The question itself is invalid (malformed name, unsupported type)."""


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 §2.1): usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


# TXT, A, AAAA, PTR: str; MX: (preference, exchange); TLSA: TlsaRecord.
Record: TypeAlias = str | tuple[int, str] | TlsaRecord


@dataclass(frozen=True)
class Answer:
    """The records of one lookup, empty when there are none."""

    records: tuple[Record, ...]
    nxdomain: bool = False
    # The resolver's AD bit: it validated the answer (or the denial) with DNSSEC.
    authenticated: bool = False


def _name_text(name: dns.name.Name) -> str:
    # Lower case without the final dot; the root stays "." so a null MX
    # (RFC 7505) reads as (0, ".").
    return name.to_text(omit_final_dot=True).lower()


def _txt(rdata: Any) -> str:
    # A record's character-strings are concatenated without separator
    # (RFC 7208 §3.3, RFC 6376 §3.6.2.2, RFC 7489 §6.1).
    return b"".join(rdata.strings).decode("utf-8", "replace")


def _mx(rdata: Any) -> tuple[int, str]:
    return rdata.preference, _name_text(rdata.exchange)


def _address(rdata: Any) -> str:
    return str(rdata.address)


def _target(rdata: Any) -> str:
    return _name_text(rdata.target)


def _tlsa(rdata: Any) -> TlsaRecord:
    return TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, bytes(rdata.cert))


_CONVERTERS: dict[dns.rdatatype.RdataType, Callable[[Any], Record]] = {
    dns.rdatatype.TXT: _txt,
    dns.rdatatype.MX: _mx,
    dns.rdatatype.A: _address,
    dns.rdatatype.AAAA: _address,
    dns.rdatatype.PTR: _target,
    dns.rdatatype.TLSA: _tlsa,
}


def parse_nameserver(entry: str) -> tuple[str, int]:
    """("host", port) from "ip", "ip:port", "[ipv6]" or "[ipv6]:port".

    A bare IPv6 address ("::1") is accepted without a port. Raises ValueError
    for anything else: nameservers are addresses, never host names.
    """
    text = entry.strip()
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {entry!r}: expected [address]:port")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"nameserver {entry!r}: expected an IP address and optional :port") from None
    if not 0 < number < 65536:
        raise ValueError(f"nameserver {entry!r}: port out of range")
    return str(address), number


_R = TypeVar("_R", bound=dns.resolver.BaseResolver)


def _configure(resolver: _R, servers: Sequence[tuple[str, int]], timeout: float,
               cache: dns.resolver.LRUCache) -> _R:
    resolver.cache = cache
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.lifetime = timeout
    resolver.timeout = min(_ATTEMPT_TIMEOUT, timeout / max(1, len(resolver.nameservers)))
    # DO and AD ask a validating resolver to report the AD bit (RFC 6840 §5.7,
    # RFC 4035 §3.2.3); DANE (RFC 7672 §2.2) needs it for MX and TLSA alike.
    resolver.use_edns(0, dns.flags.DO, _EDNS_PAYLOAD)
    resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def _new(kind: type[_R], system: bool) -> _R:
    try:
        return kind(configure=system)
    except dns.resolver.NoResolverConfiguration:
        # No usable /etc/resolv.conf: every lookup becomes a DnsTempError,
        # which keeps mail queued rather than bouncing it.
        return kind(configure=False)


def _question(name: str, rdtype: str) -> tuple[dns.name.Name, dns.rdatatype.RdataType]:
    try:
        qtype = dns.rdatatype.RdataType.make(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise DnsPermError(f"unsupported record type {rdtype!r}") from None
    if qtype not in _CONVERTERS:
        raise DnsPermError(f"unsupported record type {rdtype!r}")
    if not name.strip("."):
        raise DnsPermError("empty name")
    try:
        # Always absolute: mail never wants resolv.conf search domains.
        return dns.name.from_text(name), qtype
    except (dns.exception.DNSException, UnicodeError) as error:
        raise DnsPermError(f"malformed name ({type(error).__name__})") from None


def _answer(answer: dns.resolver.Answer) -> Answer:
    rrset = answer.rrset
    records = tuple(_CONVERTERS[rrset.rdtype](rdata) for rdata in rrset) if rrset else ()
    return Answer(records, authenticated=bool(answer.response.flags & dns.flags.AD))


def _failure(error: dns.exception.DNSException) -> Answer:
    """The Answer for NXDOMAIN; raises the typed error for everything else."""
    if isinstance(error, dns.resolver.NXDOMAIN):
        responses = error.responses().values()
        secure = bool(responses) and all(r.flags & dns.flags.AD for r in responses)
        return Answer((), nxdomain=True, authenticated=secure)
    if isinstance(error, dns.resolver.YXDOMAIN):
        # A DNAME made the name too long: the zone data is wrong, not the network.
        raise DnsPermError("name too long after DNAME substitution") from None
    raise DnsTempError(f"no usable answer ({type(error).__name__})") from None


class Resolver:
    """DNS lookups through the configured nameservers, or the system's.

    A lookup gives up after `timeout` seconds (plus dnspython's short retry
    back-off), trying each nameserver in turn and retrying over UDP within
    that time.
    """

    def __init__(self, nameservers: Sequence[str] = (), *, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        servers = [parse_nameserver(entry) for entry in nameservers]
        self.timeout = timeout
        cache = dns.resolver.LRUCache(CACHE_SIZE)  # thread-safe: the sync side runs in worker threads
        self._sync = _configure(_new(dns.resolver.Resolver, not servers), servers, timeout, cache)
        self._async = _configure(_new(dns.asyncresolver.Resolver, not servers), servers, timeout, cache)
        # In front of dnspython's cache: answers already converted, until their TTL runs
        # out. A hit skips dnspython's resolution machinery, which cost more CPU per
        # message than the rest of the DMARC check (dict operations are atomic under the GIL).
        self._answers: dict[tuple[str, str], tuple[float, Answer]] = {}

    async def query(self, name: str, rdtype: str) -> Answer:
        """Records of `rdtype` ("TXT", "MX", "A", "AAAA", "PTR", "TLSA") at `name`.

        CNAMEs are followed; truncated UDP answers are retried over TCP.
        """
        cached = self._cached(name, rdtype)
        if cached is not None:
            return cached
        qname, qtype = _question(name, rdtype)
        try:
            return self._remember(name, rdtype, await self._async.resolve(qname, qtype, raise_on_no_answer=False))
        except dns.exception.DNSException as error:
            return _failure(error)

    def sync_query(self, name: str, rdtype: str) -> Answer:
        """`query` for worker threads; blocks for up to `timeout` seconds."""
        cached = self._cached(name, rdtype)
        if cached is not None:
            return cached
        qname, qtype = _question(name, rdtype)
        try:
            return self._remember(name, rdtype, self._sync.resolve(qname, qtype, raise_on_no_answer=False))
        except dns.exception.DNSException as error:
            return _failure(error)

    def _cached(self, name: str, rdtype: str) -> Answer | None:
        entry = self._answers.get((name.lower(), rdtype))
        return entry[1] if entry is not None and entry[0] > time.time() else None

    def _remember(self, name: str, rdtype: str, answer: dns.resolver.Answer) -> Answer:
        result = _answer(answer)
        if len(self._answers) >= CACHE_SIZE:
            self._answers.clear()
        self._answers[(name.lower(), rdtype)] = (answer.expiration, result)
        return result

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], list((await self.query(name, "TXT")).records))

    def sync_txt(self, name: str) -> list[str]:
        return cast(list[str], list(self.sync_query(name, "TXT").records))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs as published; a null MX is [(0, ".")]."""
        return cast(list[tuple[int, str]], list((await self.query(name, "MX")).records))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], list((await self.query(name, "A")).records))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], list((await self.query(name, "AAAA")).records))

    async def ptr(self, ip: str) -> list[str]:
        """Host names of an IPv4 or IPv6 address."""
        try:
            name = dns.reversename.from_address(ip).to_text()
        except (dns.exception.DNSException, ValueError):
            raise DnsPermError("not an IP address") from None
        return cast(list[str], list((await self.query(name, "PTR")).records))

    async def tlsa(self, name: str) -> tuple[list[TlsaRecord], bool]:
        """TLSA records at e.g. "_25._tcp.mx.example.org", and whether the
        resolver authenticated them (DANE needs both, RFC 7672 §2.2)."""
        answer = await self.query(name, "TLSA")
        return cast(list[TlsaRecord], list(answer.records)), answer.authenticated
