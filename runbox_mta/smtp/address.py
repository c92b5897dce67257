"""Envelope addresses as MAIL FROM and RCPT TO carry them (after aiosmtpd has parsed the path).

aiosmtpd hands over the addr-spec of a path ("<user@example.org>" ->
"user@example.org") and the null reverse-path as "<>". With SMTPUTF8 on,
arguments are decoded as UTF-8 with surrogate escapes, so an address may
hold characters no database can store: `usable` rejects those before any
lookup. Plus-addressing lives with recipient resolution (store.recipients).
"""

from __future__ import annotations

from collections.abc import Sequence

from runbox_mta.errors import RunboxError
from runbox_mta.store.names import normalise_address

NULL_REVERSE_PATH = "<>"  # MAIL FROM:<> (bounces, RFC 5321 §4.5.5), as aiosmtpd passes it
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_ADDRESS_OCTETS = 254


def usable(address: str) -> bool:
    """Printable, encodable, not too long, and with a local part and a domain."""
    try:
        octets = address.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: the client sent bytes that are not UTF-8
        return False
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and address.isprintable() and len(octets) <= MAX_ADDRESS_OCTETS


def normalised(address: str) -> str | None:
    """The address as the store spells it (lowercase, IDNA domain), or None if it is not one."""
    if not usable(address):
        return None
    try:
        return normalise_address(address)
    except RunboxError:
        return None


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def domain_part(address: str) -> str:
    return address.rpartition("@")[2].lower()


def declared_size(mail_options: Sequence[str]) -> int:
    """The SIZE= a client declared on MAIL FROM (RFC 1870 §6), 0 when absent."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0
