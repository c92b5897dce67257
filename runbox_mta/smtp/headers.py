"""The header fields runbox-mta adds to mail, and the little header parsing that needs.

Messages stay bytes throughout: fields are added or removed as whole lines
and nothing else is touched, so the stored message is the sent one plus our
fields, byte for byte (and DKIM signatures over the rest stay valid).
"""

from __future__ import annotations

import base64
import email.utils
import re
import secrets
from collections.abc import Iterator
from datetime import datetime

CRLF = b"\r\n"
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")  # RFC 5322 §3.6.8 ftext, then the colon
_FIELD_START = re.compile(rb"(?:^|(?<=\r\n))[^ \t\r\n]")  # a line that does not continue a field
_FOLD = re.compile(rb"\r\n(?=[ \t])")
# What a HELO/EHLO argument may be to appear as is in a Received field: a
# domain or an address literal. Anything else is recorded as "unknown".
_HELO = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,252}|\[[A-Za-z0-9.:]{1,60}\]")


def new_queue_id() -> str:
    """The id in our Received field and in the 250 reply, e.g. "4XB2K9QH7M3ZA"."""
    return base64.b32encode(secrets.token_bytes(8)).decode("ascii").rstrip("=")


def header_end(data: bytes) -> int:
    """Offset of the empty line that ends the header section (len(data) if there is none)."""
    if data.startswith(CRLF):
        return 0
    end = data.find(CRLF + CRLF)
    return len(data) if end < 0 else end + 2


def fields(data: bytes) -> Iterator[tuple[str, int, int]]:
    """(lowercase name, start, end) of each header field, folded lines included."""
    section = data[:header_end(data)]
    starts = [match.start() for match in _FIELD_START.finditer(section)]
    for start, end in zip(starts, [*starts[1:], len(section)]):
        match = _FIELD_NAME.match(section, start)
        if match:
            yield match.group(1).decode("ascii").lower(), start, end


def field_names(data: bytes) -> set[str]:
    """The lowercase names of the header fields present (one pass for several questions)."""
    return {name for name, _, _ in fields(data)}


def field_value(data: bytes, name: str) -> str | None:
    """The first `name` field's value, unfolded, or None."""
    for field, start, end in fields(data):
        if field == name.lower():
            raw = data[start:end].split(b":", 1)[1]
            return _FOLD.sub(b"", raw).strip().decode("utf-8", "replace")
    return None


def author_domain(data: bytes) -> str | None:
    """The domain of the From: address (RFC 5322 §3.6.2), lowercase, if there is one."""
    value = field_value(data, "From")
    if value is None:
        return None
    addresses = [address for _, address in email.utils.getaddresses([value]) if "@" in address]
    return addresses[0].rpartition("@")[2].lower() if addresses else None


def prepend(data: bytes, *new_fields: bytes) -> bytes:
    """Put complete fields (each ending in CRLF) on top, in the order given."""
    return b"".join(new_fields) + data


def append_to_header(data: bytes, *new_fields: bytes) -> bytes:
    """Add complete fields at the end of the header section."""
    end = header_end(data)
    return data[:end] + b"".join(new_fields) + data[end:]


def remove_fields(data: bytes, name: str, matching: re.Pattern[bytes]) -> bytes:
    """Drop every `name` field whose whole text matches `matching`."""
    doomed = [(start, end) for field, start, end in fields(data)
              if field == name.lower() and matching.match(data, start, end)]
    for start, end in reversed(doomed):
        data = data[:start] + data[end:]
    return data


def without_forged_auth_results(data: bytes, authserv_id: str) -> bytes:
    """RFC 8601 §5: remove Authentication-Results fields claiming to come from us (MUST)."""
    ours = re.compile(rb"(?i)authentication-results[ \t]*:\s*(?:\([^)]*\)\s*)?" + re.escape(authserv_id.encode())
                      + rb"(?![A-Za-z0-9.\-])")
    return remove_fields(data, "Authentication-Results", ours)


def received(*, source: tuple[str, str] | None, hostname: str, protocol: str, tls: str,
             queue_id: str, now: datetime) -> bytes:
    """A Received trace field (RFC 5321 §4.4) recording the TLS version and cipher (SPEC §4).

    `source` is (HELO argument, client IP), or None to withhold both: a
    submission client is a user's own device, so its address and name stay
    out of the message (what privacy-first providers such as Posteo and
    Proton do). The FROM clause RFC 5321 requires then names the service.
    """
    if source is None:
        origin = "submission"
    else:
        helo, ip = source
        origin = f"{helo if _HELO.fullmatch(helo) else 'unknown'} ({address_literal(ip)})"
    if tls == "none":
        tls_comment = "(no TLS)"
    else:
        version, _, cipher = tls.partition(" ")
        tls_comment = f"(using {version} with cipher {cipher})"
    text = (f"Received: from {origin}\r\n\tby {hostname} (runbox-mta) {tls_comment}\r\n"
            f"\twith {protocol} id {queue_id}; {email.utils.format_datetime(now)}\r\n")
    return text.encode("ascii")


def protocol_keyword(*, extended: bool, tls: bool, authenticated: bool) -> str:
    """The WITH clause: SMTP for HELO, else ESMTP with S for TLS and A for AUTH (RFC 3848)."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3: [192.0.2.1] or [IPv6:2001:db8::1]."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def return_path(sender: str) -> bytes:
    """RFC 5321 §4.4: added at final delivery; "<>" for the null reverse-path."""
    path = "<>" if sender in ("", "<>") else f"<{sender}>"
    return f"Return-Path: {path}\r\n".encode("utf-8")


def message_id(hostname: str) -> bytes:
    return f"Message-ID: <{secrets.token_hex(16)}@{hostname}>\r\n".encode("ascii")


def date(now: datetime) -> bytes:
    return f"Date: {email.utils.format_datetime(now)}\r\n".encode("ascii")
