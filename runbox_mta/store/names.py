"""The canonical spelling of what the store looks things up by.

Domains and addresses are stored lowercase, domains as A-labels (so lookups
are plain equality on every backend); mailbox names keep their case except INBOX, which RFC 9051
§5.1 makes case-insensitive. Each function raises RunboxError with a one-line
message for input an operator or client could have typed.
"""

from __future__ import annotations

import re

from runbox_mta.errors import RunboxError

INBOX = "INBOX"
HIERARCHY_DELIMITER = "/"
# RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1: 63-octet labels, 253-octet names,
# 64-octet local parts; SMTPUTF8 (RFC 6531) allows UTF-8 in local parts.
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LOCAL_PART = re.compile(r"[^\s@<>()\[\]\\,;:\"]{1,64}")
# Control characters cannot be sent in an IMAP mailbox name (RFC 9051 §5.1).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalise_domain(name: str) -> str:
    """Lowercase ASCII; an internationalised name becomes its A-label form (RFC 5890 §2.3.2.1)."""
    domain = name.strip().lower().removesuffix(".")
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise RunboxError(f"not a valid domain name: {name!r}") from None
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise RunboxError(f"not a valid domain name: {name!r}")
    return domain


def normalise_address(address: str) -> str:
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local):
        raise RunboxError(f"not an email address: {address!r}")
    try:
        return f"{local}@{normalise_domain(domain)}"
    except RunboxError:
        raise RunboxError(f"not an email address: {address!r}") from None


def domain_of(address: str) -> str:
    """The domain part of a normalised address or catch-all source ("@example.com")."""
    return address.rpartition("@")[2]


def normalise_alias_source(source: str) -> str:
    """An address, or "@domain" for a catch-all."""
    stripped = source.strip()
    if stripped.startswith("@"):
        return "@" + normalise_domain(stripped[1:])
    return normalise_address(stripped)


def normalise_mailbox_name(name: str) -> str:
    parts = name.split(HIERARCHY_DELIMITER)
    if not name or any(not part for part in parts) or _CONTROL.search(name):
        raise RunboxError(f"invalid mailbox name: {name!r}")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return HIERARCHY_DELIMITER.join(parts)
