"""SPF, DKIM and DMARC for inbound MX mail, and the Authentication-Results
header that records them (SPEC §5, RFC 8601).

`authenticate_message` runs SPF (RFC 7208, pyspf) and DKIM (RFC 6376,
dkimpy) in worker threads, because both libraries are synchronous, while the
DMARC record (RFC 7489, evaluated here) is looked up on the event loop.

DNS: every lookup goes through the `Resolver` passed in.

- dkimpy takes a `dnsfunc` per call: `_key_lookup(resolver)`.
- pyspf has no per-query hook, only the module-level function
  `spf.DNSLookup`. It is replaced once, at import, by `_spf_dns_lookup`, which
  answers through the Resolver bound to the current context (`_SPF_RESOLVER`,
  set inside the worker thread for one check). Concurrent checks with
  different resolvers never mix, and pyspf used anywhere else in the process
  gets a temperror rather than silently bypassing the configured nameservers.

Invariants:

- Nothing in the message or the envelope makes this raise: broken headers,
  8-bit garbage and malformed signatures become permerror/none results.
- Nothing about the message, its addresses or its domains is logged (SPEC §7);
  dkimpy's own logging, which names key domains, is silenced.
- Only strict host-name syntax (letters, digits, "-", "_", ".") reaches the
  header, so a crafted From, MAIL FROM or d= cannot inject header text.
- Our DNS trouble never fails DMARC: it yields temperror and policy "none".
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from email.errors import ObsoleteHeaderDefect
from email.policy import default as email_policy
from functools import cache, lru_cache
from typing import Any

import dkim
import spf
from publicsuffixlist import PublicSuffixList

from runbox_mta.dns import DnsPermError, DnsTempError, Resolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DkimResult:
    """The verdict on one DKIM-Signature field."""

    result: str  # pass | fail | temperror | permerror (RFC 8601 §2.7.1)
    domain: str | None  # d=, None unless a well-formed domain
    selector: str | None  # s=, likewise


@dataclass(frozen=True)
class MessageAuthentication:
    """SPF, DKIM and DMARC verdicts on one message, and the header recording them."""

    spf: str  # pass | fail | softfail | neutral | none | temperror | permerror (RFC 7208 §2.6)
    dkim: tuple[DkimResult, ...]  # one per signature; empty when unsigned ("dkim=none")
    dmarc: str  # pass | fail | none | temperror | permerror (RFC 7489 §11.2)
    dmarc_policy: str  # none | quarantine | reject: the policy to apply, "none" unless dmarc=fail
    from_domain: str | None  # the RFC5322.From domain (A-labels), None unless exactly one address
    header: str  # "Authentication-Results: ...", folded, ending in CRLF: prepend it to the message


async def authenticate_message(
    data: bytes,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
    resolver: Resolver,
    authserv_id: str,
    sampler: Callable[[], float] = random.random,
) -> MessageAuthentication:
    """Authenticate one received message.

    `mail_from` is the reverse-path without angle brackets ("" for the null
    sender), `authserv_id` this server's host name. `sampler` draws the
    DMARC pct= sample, uniform in [0, 1); tests pin it. Raises ValueError only
    for an `authserv_id` that is not a host name.
    """
    server_id = _domain(authserv_id)
    if server_id is None:
        raise ValueError("authserv_id must be a host name")
    fields = _header_fields(data)
    from_domain = _author_domain(fields)
    signatures = sum(1 for name, _ in fields if name == "dkim-signature")
    # No signature, nothing to verify: no trip to a worker thread for it.
    dkim_check = asyncio.to_thread(_check_dkim, resolver, data, signatures) if signatures else _no_signatures()
    spf_outcome, dkim_results, policy = await asyncio.gather(
        asyncio.to_thread(_check_spf, resolver, client_ip, helo, mail_from, server_id),
        dkim_check,
        _discover_dmarc(resolver, from_domain),
    )
    if isinstance(policy, _DmarcPolicy):
        dmarc, applied = _dmarc_verdict(policy, spf_outcome, dkim_results, sampler)
    else:
        dmarc, applied = policy, "none"
    return MessageAuthentication(
        spf=spf_outcome.result,
        dkim=dkim_results,
        dmarc=dmarc,
        dmarc_policy=applied,
        from_domain=from_domain,
        header=_header(server_id, spf_outcome, dkim_results, dmarc, from_domain),
    )


# --- names ------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_DOMAIN = 253  # RFC 1035 §2.3.4, in text form


def _domain(text: str | bytes | None) -> str | None:
    """The lower-case A-label form of a host name, or None unless it is one.

    Every value in the header passes here, and so do the From domain and a
    signature's d= and s= before they are looked up: anything with ";",
    spaces, quotes, CR/LF or backslash escapes is refused.
    """
    if text is None:
        return None
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ascii_form = text.strip().encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if len(ascii_form) > _MAX_DOMAIN or not _DOMAIN.fullmatch(ascii_form):
        return None
    return ascii_form


@cache
def _public_suffixes() -> PublicSuffixList:
    # The list shipped inside the package, never fetched at run time; parsed
    # once, on first use.
    return PublicSuffixList()


def _organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label; a public suffix stands for itself."""
    return _public_suffixes().privatesuffix(domain) or domain


# --- header section ---------------------------------------------------------

_LINE = re.compile(rb"[^\n]*\n?")
# RFC 5322 §2.2: printable ASCII except ":"; obsolete syntax allows WSP before the colon (§4.5).
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)", re.DOTALL)
# Far longer than any From with one address; bounds the address parser's work.
_MAX_FROM_LENGTH = 4096


def _header_fields(data: bytes) -> list[tuple[str, str]]:
    """The header section as (lower-case name, unfolded value) pairs.

    Lenient like a mail reader: a malformed line is skipped instead of ending
    the header section, so a From: placed after garbage is still seen.
    """
    fields: list[tuple[bytes, list[bytes]]] = []
    for match in _LINE.finditer(data):
        line = match.group().rstrip(b"\n").removesuffix(b"\r")
        if not line:
            break  # the empty line before the body (RFC 5322 §2.1)
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
        elif field := _FIELD.fullmatch(line):
            fields.append((field[1].lower(), [field[2]]))
    return [(name.decode("ascii"), b"".join(parts).decode("utf-8", "replace")) for name, parts in fields]


def _author_domain(fields: list[tuple[str, str]]) -> str | None:
    """The RFC5322.From domain (RFC 7489 §3.1), or None unless the message
    has exactly one From field (RFC 5322 §3.6) holding exactly one address."""
    values = [value for name, value in fields if name == "from"]
    if len(values) != 1 or len(values[0]) > _MAX_FROM_LENGTH:
        return None
    return _from_field_domain(values[0])


# The email package's header parser is slow (a twentieth of the MX's CPU per
# message), and the same From field arrives again and again from one sender.
@lru_cache(maxsize=4096)
def _from_field_domain(value: str) -> str | None:
    try:
        header = email_policy.header_factory("from", value)
        addresses = header.addresses
    except Exception:  # the email package's parser has raised on hostile input before
        return None
    # A defective From may be displayed differently from how it was parsed
    # here (RFC 7489 §6.6.1), so no domain is taken from it; obsolete syntax
    # is still unambiguous.
    if len(addresses) != 1 or not all(isinstance(d, ObsoleteHeaderDefect) for d in header.defects):
        return None
    return _domain(addresses[0].domain)


# --- SPF --------------------------------------------------------------------

_SPF_RESOLVER: ContextVar[Resolver | None] = ContextVar("spf_resolver", default=None)
_SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
_SPF_QUERY_TIME = 20  # seconds of DNS per check (RFC 7208 §4.6.4)


@dataclass(frozen=True)
class _SpfOutcome:
    result: str
    identity: str  # "mailfrom", or "helo" for the null reverse-path (RFC 7208 §2.4)
    domain: str | None  # the domain checked, when well-formed


def _spf_dns_lookup(name: str, qtype: str, strict: object = True, timeout: object = None) -> list[Any]:
    """pyspf's `DNSLookup`, answered by the Resolver bound to this SPF check.

    Returns pyspf's shape: [((name, qtype), value), ...]. The Resolver's own
    timeout bounds each lookup; pyspf still enforces its overall query time.
    """
    resolver = _SPF_RESOLVER.get()
    if resolver is None:
        raise spf.TempError("no Resolver bound: run SPF through authenticate_message")
    try:
        records = resolver.sync_query(name, qtype).records
    except DnsTempError as error:
        raise spf.TempError("DNS lookup failed") from error  # RFC 7208 §2.6.6
    except DnsPermError as error:
        raise spf.PermError("invalid domain name") from error  # RFC 7208 §4.8
    # pyspf concatenates a TXT record's strings itself, and wants bytes.
    return [((name, qtype), (record.encode(),) if qtype == "TXT" else record) for record in records]


spf.DNSLookup = _spf_dns_lookup


def _check_spf(resolver: Resolver, client_ip: str, helo: str, mail_from: str, receiver: str) -> _SpfOutcome:
    """Check the MAIL FROM identity, or HELO for the null sender (RFC 7208 §2.3, §2.4)."""
    identity = "mailfrom" if mail_from else "helo"
    domain = _domain(mail_from.rpartition("@")[2] if mail_from else helo)
    token = _SPF_RESOLVER.set(resolver)
    try:
        query = spf.query(i=client_ip, s=mail_from, h=helo, receiver=receiver, querytime=_SPF_QUERY_TIME)
        result = query.check()[0]
    except Exception as error:  # pyspf raises on a bad client address and on odd input
        log.debug("SPF check raised %s", type(error).__name__)
        result = "permerror"
    finally:
        _SPF_RESOLVER.reset(token)
    return _SpfOutcome(result if result in _SPF_RESULTS else "permerror", identity, domain)


# --- DKIM -------------------------------------------------------------------

# dkimpy logs key names, i.e. correspondents' domains, at ERROR. A logger
# outside the logging tree with a level above CRITICAL drops every record.
_SILENT = logging.Logger("runbox_mta.smtp.dkimpy", logging.CRITICAL + 1)
# RFC 6376 §6.1: verifiers may limit the signatures they check; each costs a
# DNS lookup an attacker chooses.
_MAX_SIGNATURES = 8


class _KeyUnavailable(Exception):
    """DNS trouble while fetching the key: TEMPFAIL (RFC 6376 §6.1.2)."""


class _KeyUnusable(Exception):
    """No key record, or not a valid one: PERMFAIL (RFC 6376 §6.1.2)."""


def _key_lookup(resolver: Resolver) -> Callable[..., bytes]:
    """A dkimpy `dnsfunc` that tells missing keys and DNS trouble apart,
    which dkimpy itself reports as a plain failed verification."""

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        try:
            records = resolver.sync_txt(name.decode("utf-8"))
        except DnsTempError as error:
            raise _KeyUnavailable from error
        except (DnsPermError, UnicodeDecodeError) as error:
            raise _KeyUnusable from error
        if not records:
            raise _KeyUnusable("no key for signature")
        key = records[0].encode()  # RFC 6376 §3.6.2.2: several records give undefined results
        try:
            dkim.evaluate_pk(name, key)
        except Exception as error:  # KeyFormatError, binascii.Error, missing ed25519 support
            raise _KeyUnusable("key syntax error") from error
        return key

    return lookup


async def _no_signatures() -> tuple[DkimResult, ...]:
    return ()


def _check_dkim(resolver: Resolver, data: bytes, signatures: int) -> tuple[DkimResult, ...]:
    """One DkimResult per DKIM-Signature field, topmost first (`signatures` > 0: where our
    header parsing finds none, dkimpy's stricter one finds none either)."""
    try:
        verifier = dkim.DKIM(data, logger=_SILENT)
    except Exception:  # dkimpy refuses the header section: no signature can be verified
        return (DkimResult("permerror", None, None),) * min(signatures, _MAX_SIGNATURES)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    lookup = _key_lookup(resolver)
    return tuple(_verify_signature(verifier, index, lookup) for index in range(min(count, _MAX_SIGNATURES)))


def _verify_signature(verifier: dkim.DKIM, index: int, lookup: Callable[..., bytes]) -> DkimResult:
    try:
        verifier.verify_headerprep(index)
    except Exception:  # missing or malformed tags: PERMFAIL (RFC 6376 §6.1.1)
        return DkimResult("permerror", None, None)
    domain, selector = _domain(verifier.domain), _domain(verifier.selector)
    if domain is None or selector is None:
        return DkimResult("permerror", domain, selector)
    if verifier.signature_fields.get(b"a") == b"rsa-sha1":
        return DkimResult("permerror", domain, selector)  # RFC 8301 §3.1: MUST NOT be used for verifying
    return DkimResult(_signature_result(verifier, index, lookup), domain, selector)


def _signature_result(verifier: dkim.DKIM, index: int, lookup: Callable[..., bytes]) -> str:
    try:
        valid = verifier.verify(idx=index, dnsfunc=lookup)
    except _KeyUnavailable:
        return "temperror"
    except _KeyUnusable:
        return "permerror"
    except dkim.ValidationError:  # the body hash; the tags were validated before
        return "fail"
    except Exception:  # e.g. a key under 1024 bits (RFC 8301 §3.2)
        return "permerror"
    return "pass" if valid else "fail"


# --- DMARC ------------------------------------------------------------------

_POLICIES = frozenset({"none", "quarantine", "reject"})
_NEXT_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_DMARC_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(?:;|$)")  # RFC 7489 §6.4: v=DMARC1 first
_PCT = re.compile(r"[0-9]{1,3}")


@dataclass(frozen=True)
class _DmarcPolicy:
    author_domain: str
    policy: str  # p=, or sp= when From is a subdomain covered by its organizational domain's record
    strict_dkim: bool  # adkim=s
    strict_spf: bool  # aspf=s
    pct: int


async def _discover_dmarc(resolver: Resolver, from_domain: str | None) -> _DmarcPolicy | str:
    """The policy for the From domain (RFC 7489 §6.6.3), or a final result:
    "none", "temperror" or "permerror"."""
    if from_domain is None:
        return "permerror"
    organizational = _organizational_domain(from_domain)
    try:
        records = await _dmarc_records(resolver, from_domain)
        subdomain = not records and organizational != from_domain
        if subdomain:
            records = await _dmarc_records(resolver, organizational)
    except DnsTempError:
        return "temperror"
    except DnsPermError:
        return "permerror"
    if len(records) != 1:
        return "none"  # §6.6.3 step 3: no record, or several, means no DMARC processing
    return _parse_dmarc(records[0], from_domain, subdomain) or "permerror"


async def _dmarc_records(resolver: Resolver, domain: str) -> list[str]:
    # §6.6.3: records that do not start with v=DMARC1 are discarded.
    return [record for record in await resolver.txt(f"_dmarc.{domain}") if _DMARC_VERSION.match(record)]


def _parse_dmarc(record: str, from_domain: str, subdomain: bool) -> _DmarcPolicy | None:
    """The record's policy, or None when it has no usable one (dmarc=permerror)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, _, value = part.partition("=")
        tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()  # §6.3: without sp=, p= applies to subdomains
    if p not in _POLICIES or sp not in _POLICIES:
        if not tags.get("rua"):
            return None  # §6.6.3: an invalid p= or sp= and no rua=: no DMARC processing
        p = sp = "none"  # §6.6.3: with rua=, act as if p=none
    pct = tags.get("pct", "")
    return _DmarcPolicy(
        author_domain=from_domain,
        policy=sp if subdomain else p,
        # §6.3: syntax errors in the other tags fall back to their defaults.
        strict_dkim=tags.get("adkim", "").lower() == "s",
        strict_spf=tags.get("aspf", "").lower() == "s",
        pct=int(pct) if _PCT.fullmatch(pct) and int(pct) <= 100 else 100,
    )


def _aligned(domain: str, author_domain: str, strict: bool) -> bool:
    # RFC 7489 §3.1.1, §3.1.2: strict is an exact match, relaxed compares
    # organizational domains.
    if strict:
        return domain == author_domain
    return _organizational_domain(domain) == _organizational_domain(author_domain)


def _dmarc_verdict(
    policy: _DmarcPolicy,
    spf_outcome: _SpfOutcome,
    dkim_results: tuple[DkimResult, ...],
    sampler: Callable[[], float],
) -> tuple[str, str]:
    """(dmarc result, policy to apply), RFC 7489 §6.6.2 and §6.6.4."""
    author = policy.author_domain
    aligned = {
        result.result
        for result in dkim_results
        if result.domain and _aligned(result.domain, author, policy.strict_dkim)
    }
    # The SPF-authenticated domain is the MAIL FROM one; for the null sender
    # that is the HELO domain (RFC 7489 §4.1 via RFC 7208 §2.4).
    if spf_outcome.domain and _aligned(spf_outcome.domain, author, policy.strict_spf):
        aligned.add(spf_outcome.result)
    if "pass" in aligned:
        return "pass", "none"
    if "temperror" in aligned:
        # An aligned identifier might have passed: our DNS trouble must not
        # get mail quarantined or rejected.
        return "temperror", "none"
    if sampler() * 100 < policy.pct:
        return "fail", policy.policy
    return "fail", _NEXT_LOWER[policy.policy]  # §6.6.4: outside the pct= sample


# --- Authentication-Results -------------------------------------------------

_FOLD = "\r\n\t"
_FOLD_WIDTH = 78  # RFC 5322 §2.1.1
_TAB_WIDTH = 8
_CONTINUATION = "  "


def _header(
    server_id: str,
    spf_outcome: _SpfOutcome,
    dkim_results: tuple[DkimResult, ...],
    dmarc: str,
    from_domain: str | None,
) -> str:
    """RFC 8601 §2.2: the authserv-id, then one resinfo per line."""
    dkim_infos = [
        [f"dkim={result.result}", *_property("header.d", result.domain), *_property("header.s", result.selector)]
        for result in dkim_results
    ]
    resinfos = [
        [f"spf={spf_outcome.result}", *_property(f"smtp.{spf_outcome.identity}", spf_outcome.domain)],
        *(dkim_infos or [["dkim=none"]]),
        [f"dmarc={dmarc}", *_property("header.from", from_domain)],
    ]
    lines = [f"Authentication-Results: {server_id};"]
    for number, words in enumerate(resinfos, start=1):
        separator = ";" if number < len(resinfos) else ""
        lines.extend(_wrap([*words[:-1], words[-1] + separator]))
    return _FOLD.join(lines) + "\r\n"


def _property(ptype: str, value: str | None) -> list[str]:
    # Values come from _domain(): nothing that could end the field or a resinfo.
    return [f"{ptype}={value}"] if value else []


def _wrap(words: list[str]) -> list[str]:
    """Fill lines greedily up to the fold width; a resinfo's own continuation
    lines are indented further, so each method still starts a line of its own."""
    lines = [words[0]]
    for word in words[1:]:
        if _TAB_WIDTH + len(lines[-1]) + 1 + len(word) > _FOLD_WIDTH:
            lines.append(_CONTINUATION + word)
        else:
            lines[-1] += " " + word
    return lines
