"""DANE for SMTP (RFC 7672), DANE-EE records: when a hop's TLSA records bind its key.

DANE applies to a hop only when its MX RRset was DNSSEC-authenticated
(RFC 7672 §2.2.1) and its TLSA RRset at _PORT._tcp.HOST is too (§2.2). Then
TLS is mandatory, with no plaintext fallback (§2.2). This increment
authenticates with DANE-EE(3) records (selector 0 or 1, matching type 0, 1
or 2), which bind the server's own certificate or key: no name or expiry
checks apply (§3.1.1). Secure TLSA records of which none is usable (e.g.
DANE-TA(2), whose chain Python 3.11's ssl module does not expose) still make
TLS mandatory, if unauthenticated (§2.2).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runbox_mta.dns import DnsError, Resolver, TlsaRecord

DANE_EE = 3  # RFC 6698 §2.1.1 usage
_SELECTORS = (0, 1)  # full certificate, SubjectPublicKeyInfo
_MATCHING = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


class DaneLookupFailed(Exception):
    """The TLSA lookup failed: RFC 7672 §2.2 forbids delivering to this host now."""


@dataclass(frozen=True)
class DanePolicy:
    """Secure TLSA records for one hop: TLS is required; `records` authenticate it when not empty."""

    records: tuple[TlsaRecord, ...]

    def check(self, certificate_der: bytes) -> bool:
        """Whether the server's certificate matches a usable record (vacuously, if none is usable)."""
        return not self.records or any(matches(record, certificate_der) for record in self.records)


async def dane_policy(resolver: Resolver, host: str, port: int) -> DanePolicy | None:
    """The hop's DANE policy, or None when DANE does not apply (no secure TLSA records)."""
    try:
        records, authenticated = await resolver.tlsa(f"_{port}._tcp.{host}")
    except DnsError as error:
        raise DaneLookupFailed(f"TLSA lookup failed: {error}") from None
    if not records or not authenticated:
        return None
    return DanePolicy(tuple(record for record in records if usable(record)))


def usable(record: TlsaRecord) -> bool:
    return record.usage == DANE_EE and record.selector in _SELECTORS and record.mtype in _MATCHING


def matches(record: TlsaRecord, certificate_der: bytes) -> bool:
    subject = certificate_der
    if record.selector == 1:
        key = x509.load_der_x509_certificate(certificate_der).public_key()
        subject = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = _MATCHING[record.mtype]
    return hmac.compare_digest(subject if digest is None else digest(subject).digest(), record.data)
