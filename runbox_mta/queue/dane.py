"""DANE for SMTP (RFC 7672): DNSSEC-authenticated TLSA records that authenticate a hop.

DANE applies to a hop only when its MX RRset was DNSSEC-authenticated
(RFC 7672 §2.2.1) and its TLSA RRset at _PORT._tcp.HOST is too (§2.2). Then
TLS is mandatory, with no plaintext fallback (§2.2), and the server is
judged by the certificate chain it sent:

- DANE-EE(3) records bind the server's own certificate or key: no name or
  expiry checks apply (§3.1.1).
- DANE-TA(2) records bind a trust anchor, which the server must send in its
  chain (§3.1.2). Each certificate of that chain matching such a record is
  made a trust anchor of an OpenSSL store (pyOpenSSL) that holds nothing
  else, with PARTIAL_CHAIN since the anchor is usually an intermediate CA.
  The server's certificate must chain to one through the rest of what it
  sent (signatures, CA constraints, validity periods: expired certificates
  fail) and carry a name that is the MX host or the recipient domain
  (§3.2.2), a wildcard standing only for a whole left-most label (§3.2.3).

Why the chain as sent (smtp/client.peer_chain) rather than a verifying ssl
context whose only CA is the anchor: a record with matching type 1 or 2
holds only a digest, and selector 1 only a key, so the anchor certificate
must come from the chain; reading the chain serves every selector and
matching type alike, and a stdlib context would only serve "2 0 0". The
path check is OpenSSL's own X509_verify_cert, as in Postfix.

Secure TLSA records none of which is usable (PKIX-TA(0) and PKIX-EE(1),
which SMTP does not use, §3.1.3; unknown selectors or matching types) still
make TLS mandatory, if unauthenticated (§2.2).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from runbox_mta.dns import DnsError, Resolver, TlsaRecord
from runbox_mta.smtp.client import PeerVerdict

DANE_TA, DANE_EE = 2, 3  # RFC 6698 §2.1.1 usages
_SELECTORS = (0, 1)  # full certificate, SubjectPublicKeyInfo
_MATCHING = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


class DaneLookupFailed(Exception):
    """The TLSA lookup failed: RFC 7672 §2.2 forbids delivering to this host now."""


@dataclass(frozen=True)
class DanePolicy:
    """Secure TLSA records for one hop: TLS is required; `records` authenticate it when not empty."""

    records: tuple[TlsaRecord, ...]
    # Names a DANE-TA-authenticated certificate must carry one of (RFC 7672 §3.2.2).
    names: tuple[str, ...] = ()

    def check(self, chain: Sequence[bytes]) -> PeerVerdict:
        """Judge the server's chain as sent (DER, its own certificate first)."""
        if not self.records:
            return PeerVerdict(True, "DANE, no usable TLSA record")
        if any(matches(record, chain[0]) for record in self.records if record.usage == DANE_EE):
            return PeerVerdict(True, "verified by DANE-EE")
        anchors = [der for der in chain
                   if any(matches(record, der) for record in self.records if record.usage == DANE_TA)]
        if not anchors:
            return PeerVerdict(False, "DANE: no TLSA record matches the certificate chain")
        problem = _chain_problem(chain, anchors) or _name_problem(chain[0], self.names)
        return PeerVerdict(problem is None, problem or "verified by DANE-TA")


async def dane_policy(resolver: Resolver, host: str, port: int, domain: str) -> DanePolicy | None:
    """The hop's DANE policy, or None when DANE does not apply (no secure TLSA records).

    `host` is the MX host (the TLSA base domain) and `domain` the recipient
    domain, the two names a DANE-TA certificate may carry (RFC 7672 §3.2.2).
    """
    try:
        records, authenticated = await resolver.tlsa(f"_{port}._tcp.{host}")
    except DnsError as error:
        raise DaneLookupFailed(f"TLSA lookup failed: {error}") from None
    if not records or not authenticated:
        return None
    return DanePolicy(tuple(record for record in records if usable(record)), tuple(dict.fromkeys((host, domain))))


def usable(record: TlsaRecord) -> bool:
    return record.usage in (DANE_TA, DANE_EE) and record.selector in _SELECTORS and record.mtype in _MATCHING


def matches(record: TlsaRecord, certificate_der: bytes) -> bool:
    subject = certificate_der
    if record.selector == 1:
        try:
            key = x509.load_der_x509_certificate(certificate_der).public_key()
        except ValueError:
            return False  # not a certificate we can read: it matches nothing
        subject = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = _MATCHING[record.mtype]
    return hmac.compare_digest(subject if digest is None else digest(subject).digest(), record.data)


def _chain_problem(chain: Sequence[bytes], anchors: Sequence[bytes]) -> str | None:
    """Why the server's certificate does not chain to an anchor (RFC 7672 §3.1.2), or None."""
    try:
        leaf, *sent = (crypto.load_certificate(crypto.FILETYPE_ASN1, der) for der in chain)
        store = crypto.X509Store()
        for anchor in anchors:
            store.add_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, anchor))
    except crypto.Error:
        return "DANE-TA: the server sent an unreadable certificate"
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)  # the anchor need not be a self-signed root
    try:
        crypto.X509StoreContext(store, leaf, sent).verify_certificate()
    except crypto.X509StoreContextError as error:
        return f"DANE-TA: the certificate does not chain to the trust anchor: {error}"
    return None


def _name_problem(certificate_der: bytes, names: Sequence[str]) -> str | None:
    """RFC 7672 §3.2.2-3: the certificate must carry one of `names`."""
    try:
        patterns = certificate_names(x509.load_der_x509_certificate(certificate_der))
    except ValueError:
        return "DANE-TA: the server's certificate is unreadable"
    if any(name_matches(pattern, name) for pattern in patterns for name in names):
        return None
    return f"DANE-TA: the certificate names {', '.join(patterns[:3]) or 'nothing'}, not {' or '.join(names)}"


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """DNS names from subjectAltName, or the subject CN when it has none (RFC 6125 §6.4.4)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = extension.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if names:
        return names
    return [str(attribute.value) for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_matches(pattern: str, name: str) -> bool:
    """Equal names, or "*.rest" for one whole label before "rest" (RFC 7672 §3.2.3, RFC 8461 §4.1)."""
    pattern, name = pattern.rstrip(".").lower(), name.rstrip(".").lower()
    if pattern.startswith("*."):
        label, _, rest = name.partition(".")
        return bool(label) and bool(pattern[2:]) and rest == pattern[2:]
    return pattern == name
