"""MTA-STS (RFC 8461): a recipient domain's published demand for authenticated TLS to its MX hosts.

Discovery (§3): a TXT record at _mta-sts.DOMAIN ("v=STSv1; id=...") says
that a policy exists and names its version; the policy itself comes from
https://mta-sts.DOMAIN/.well-known/mta-sts.txt, over TLS with a certificate
valid for that name (PKIX), without following redirects, within a time and
size limit (§3.3). The policy host is resolved through the daemon's
`Resolver` like every other name; `[outbound] mta_sts_port` and `ca_file`
exist so tests can serve policies from 127.0.0.1.

Cache (§5.1), in memory per daemon: a policy is reused while its max_age
lasts and the TXT id stays the same; a new id or an expired policy means a
fetch. When the TXT record is gone or unreadable, or a fetch fails, the
cached policy keeps applying until it expires (§3.3, §5.1): whoever can
block DNS or HTTPS on the path must not be able to switch enforcement off.

Application (§4, §5) is in queue/attempt.py: `enforce` admits only MX hosts
matching the policy and requires PKIX-valid TLS there, with no plaintext;
`testing` delivers as if there were no policy and records what enforcement
would have refused; `none` is no policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runbox_mta.dns import DnsError, Resolver
from runbox_mta.queue.dane import name_matches

log = logging.getLogger(__name__)

MODES = ("enforce", "testing", "none")
POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.2
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is at most one year
# RFC 8461 §3.3: a fetch needs a time limit and a size limit (64 KB is its figure).
FETCH_TIMEOUT = 60.0
MAX_POLICY_SIZE = 64 * 1024
# HTTP response header lines and their number; a policy server needs few.
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
# A failed fetch for one TXT id is not repeated sooner than this (§3.3 lets
# senders rate-limit fetches); meanwhile a cached policy, if any, applies.
RETRY_FETCH_AFTER = 300.0
# Domains with a cached policy; beyond this, expired entries go, then the oldest.
MAX_CACHED_DOMAINS = 10000

_RECORD_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")  # RFC 8461 §3.1
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_POLICY_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")  # RFC 8461 §3.2
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r?\n")


class MtaStsError(Exception):
    """No valid policy could be had from the policy host; the message never names the domain."""


class PolicyError(MtaStsError):
    """The policy text does not follow RFC 8461 §3.2."""


@dataclass(frozen=True)
class Policy:
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # MX host patterns, "*." standing for one left-most label
    max_age: int  # seconds

    def allows(self, host: str) -> bool:
        """Whether the MX host matches one of the policy's patterns (RFC 8461 §4.1)."""
        return any(name_matches(pattern, host) for pattern in self.mx)


def record_id(texts: Sequence[str]) -> str | None:
    """The policy id of the domain's one valid STSv1 TXT record, else None (RFC 8461 §3.1)."""
    records = [text for text in texts if text.startswith("v=STSv1")]
    if len(records) != 1:
        return None  # none, or several: as if the domain had no policy
    fields = [field.strip(" \t") for field in records[0].split(";")]
    if fields[0] != "v=STSv1":
        return None
    if fields[-1] == "":
        fields.pop()  # a final ";" is allowed
    values: dict[str, str] = {}
    for field in fields[1:]:
        match = _RECORD_FIELD.fullmatch(field)
        if match is None:
            return None
        values.setdefault(match.group(1), match.group(2))
    policy_id = values.get("id", "")
    return policy_id if _RECORD_ID.fullmatch(policy_id) else None


def parse_policy(text: str) -> Policy:
    """The policy in `text`, or PolicyError. Unknown fields are ignored; of a repeated field
    other than mx, the first counts (RFC 8461 §3.2)."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line:
            continue
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise PolicyError("policy line is not key: value")
        key, value = match.groups()
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value.lower()):
                raise PolicyError("policy mx is not a host name pattern")
            mx.append(value.lower())
        else:
            fields.setdefault(key, value)
    for key in ("version", "mode", "max_age"):
        if key not in fields:
            raise PolicyError(f"policy lacks {key}")
    if fields["version"] != "STSv1":
        raise PolicyError("policy version is not STSv1")
    if fields["mode"] not in MODES:
        raise PolicyError("policy mode is not enforce, testing or none")
    if not re.fullmatch(r"\d{1,10}", fields["max_age"]):
        raise PolicyError("policy max_age is not a number of seconds")
    if not mx and fields["mode"] != "none":
        raise PolicyError("policy lists no mx")
    return Policy(fields["mode"], tuple(mx), min(int(fields["max_age"]), MAX_AGE_LIMIT))


async def fetch_policy(domain: str, resolver: Resolver, port: int, context: ssl.SSLContext) -> Policy:
    """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 §3.3); MtaStsError on any failure."""
    host = f"mta-sts.{domain}"
    try:
        addresses = [*await resolver.aaaa(host), *await resolver.a(host)]
    except DnsError as error:
        raise MtaStsError(f"policy host lookup failed: {error}") from None
    if not addresses:
        raise MtaStsError("the policy host has no address")
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            reader, writer = await _connect(addresses, port, host, context)
            try:
                body = await _get(reader, writer, host if port == 443 else f"{host}:{port}")
            finally:
                writer.close()
    except TimeoutError:
        raise MtaStsError("policy fetch timed out") from None
    try:
        return parse_policy(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None


async def _connect(addresses: Sequence[str], port: int, host: str,
                   context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS to the first address that answers; the certificate must be valid for `host`."""
    failure = "no address"
    for address in addresses:
        try:
            return await asyncio.open_connection(address, port, ssl=context, server_hostname=host,
                                                 limit=MAX_HEADER_LINE)
        except ssl.SSLCertVerificationError as error:
            failure = f"policy host certificate not verified: {error.verify_message}"
        except (ssl.SSLError, OSError) as error:
            failure = f"policy host unreachable: {type(error).__name__}"
    raise MtaStsError(failure)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host_header: str) -> bytes:
    """One HTTP/1.1 GET of the policy; only a 200 answer counts (RFC 8461 §3.3: no redirects)."""
    writer.write(f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: runbox-mta\r\n"
                 "Accept: text/plain\r\nConnection: close\r\n\r\n".encode())
    try:
        await writer.drain()
        status = _STATUS_LINE.fullmatch(await reader.readline())
        if status is None:
            raise MtaStsError("policy host sent no HTTP response")
        if status.group(1) != b"200":
            raise MtaStsError(f"policy host answered HTTP {status.group(1).decode()}")
        headers = await _headers(reader)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _chunked(reader)
        length = headers.get("content-length")
        if length is not None:
            if int(length) > MAX_POLICY_SIZE:  # int() refuses junk: ValueError, below
                raise MtaStsError("policy too large")
            return await reader.readexactly(int(length))
        body = b""  # delimited by the end of the connection
        while len(body) <= MAX_POLICY_SIZE and (more := await reader.read(MAX_POLICY_SIZE + 1 - len(body))):
            body += more
        if len(body) > MAX_POLICY_SIZE:
            raise MtaStsError("policy too large")
        return body
    except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise MtaStsError("malformed HTTP response from the policy host") from None
    except (ssl.SSLError, OSError) as error:
        raise MtaStsError(f"policy fetch failed: {type(error).__name__}") from None


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            return headers
        name, colon, value = line.partition(":")
        if not colon:
            raise MtaStsError("malformed HTTP header from the policy host")
        headers[name.strip().lower()] = value.strip()
    raise MtaStsError("too many HTTP headers from the policy host")


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    """An HTTP/1.1 chunked body (RFC 9112 §7.1), at most MAX_POLICY_SIZE octets."""
    body = b""
    while size := int((await reader.readline()).split(b";")[0].strip(), 16):
        if len(body) + size > MAX_POLICY_SIZE:
            raise MtaStsError("policy too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
    return body


@dataclass(frozen=True)
class _Cached:
    policy: Policy
    policy_id: str
    expires: float  # on the cache's clock


class MtaSts:
    """The daemon's MTA-STS policies (RFC 8461 §5.1), looked up and cached per recipient domain."""

    def __init__(self, resolver: Resolver, port: int, context: ssl.SSLContext,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resolver = resolver
        self._port = port  # of the policy hosts: 443 but in tests
        self._context = context  # verifies: PKIX and the policy host's name
        self._clock = clock
        self._cached: dict[str, _Cached] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # domain -> (TXT id whose fetch failed, retry after)

    async def policy(self, domain: str) -> Policy | None:
        """The policy that governs mail to `domain` now; None when there is none, or its mode is none."""
        policy = await self._current(domain)
        return policy if policy is not None and policy.mode != "none" else None

    async def _current(self, domain: str) -> Policy | None:
        now = self._clock()
        cached = self._cached.get(domain)
        if cached is not None and cached.expires <= now:
            del self._cached[domain]
            cached = None
        try:
            policy_id = record_id(await self._resolver.txt(f"_mta-sts.{domain}"))
        except DnsError:
            policy_id = None  # no live policy to be had: the cached one applies (§3.3)
        if policy_id is None or (cached is not None and cached.policy_id == policy_id):
            return cached.policy if cached is not None else None
        failed_id, retry_after = self._failed.get(domain, ("", 0.0))
        if failed_id == policy_id and now < retry_after:
            return cached.policy if cached is not None else None
        try:
            policy = await fetch_policy(domain, self._resolver, self._port, self._context)
        except MtaStsError as error:
            log.info("MTA-STS: no policy fetched (%s); %s", error,
                     "the cached one applies" if cached is not None else "none applies")
            log.debug("MTA-STS: the policy fetch for %s failed", domain)
            self._remember_failure(domain, policy_id, now)
            return cached.policy if cached is not None else None
        self._failed.pop(domain, None)
        self._remember(domain, _Cached(policy, policy_id, now + policy.max_age), now)
        return policy

    def _remember(self, domain: str, entry: _Cached, now: float) -> None:
        if domain not in self._cached and len(self._cached) >= MAX_CACHED_DOMAINS:
            for name in [name for name, cached in self._cached.items() if cached.expires <= now]:
                del self._cached[name]
            if len(self._cached) >= MAX_CACHED_DOMAINS:
                del self._cached[next(iter(self._cached))]  # the oldest
        self._cached[domain] = entry

    def _remember_failure(self, domain: str, policy_id: str, now: float) -> None:
        if domain not in self._failed and len(self._failed) >= MAX_CACHED_DOMAINS:
            self._failed = {name: failure for name, failure in self._failed.items() if failure[1] > now}
            if len(self._failed) >= MAX_CACHED_DOMAINS:
                del self._failed[next(iter(self._failed))]
        self._failed[domain] = (policy_id, now + RETRY_FETCH_AFTER)
