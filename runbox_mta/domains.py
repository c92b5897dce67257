"""Hosted-domain set-up: the DKIM key a domain signs with, and the DNS records to publish.

`domain add` stores an RSA-2048 key (RFC 8301 §3.2: at least 1024, 2048
recommended; RSA rather than Ed25519 because many verifiers still lack RFC 8463).
The selector carries the creation month so a later key can be rolled in beside
the old one. `domain dns` prints zone-file lines for MX, SPF, DKIM, DMARC,
MTA-STS, TLS-RPT and the RFC 6186/8314 SRV records mail clients use to
configure themselves.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runbox_mta.errors import RunboxError

DKIM_KEY_BITS = 2048
# DNS character-strings hold at most 255 octets (RFC 1035 §3.3); longer TXT
# values are split into several strings that verifiers concatenate.
TXT_STRING_MAX = 255


def new_dkim_key(now: datetime | None = None) -> tuple[str, str]:
    """A fresh (selector, private key PEM) pair for a newly hosted domain."""
    now = now or datetime.now(timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=DKIM_KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return f"rb{now:%Y%m}", pem


def dkim_public_record(private_key_pem: str) -> str:
    """The `v=DKIM1` TXT value for a stored private key (RFC 6376 §3.6.1)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except ValueError as error:
        raise RunboxError(f"stored DKIM key is unreadable: {error}") from None
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def mta_sts_policy(hostname: str) -> str:
    """The policy file served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 §3.2)."""
    return f"version: STSv1\r\nmode: enforce\r\nmx: {hostname}\r\nmax_age: 604800\r\n"


def dns_records(domain: str, hostname: str, dkim_selector: str, dkim_private_key: str) -> str:
    """Zone-file text for everything `domain` should publish, with comments for the operator."""
    policy = mta_sts_policy(hostname)
    # The id must change whenever the policy does (RFC 8461 §3.1); deriving it
    # from the policy text makes that automatic and the output reproducible.
    policy_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
    d, h = f"{domain}.", f"{hostname}."
    rows = [
        ("; Mail exchanger and sender policy", None, None),
        (d, "MX", f"10 {h}"),
        (d, "TXT", _txt("v=spf1 mx -all")),
        (f"; DKIM public key (selector {dkim_selector})", None, None),
        (f"{dkim_selector}._domainkey.{d}", "TXT", _txt(dkim_public_record(dkim_private_key))),
        ("; DMARC: start with p=none while you check reports, then quarantine or reject", None, None),
        (f"_dmarc.{d}", "TXT", _txt(f"v=DMARC1; p=quarantine; adkim=s; aspf=s; rua=mailto:postmaster@{domain}")),
        ("; MTA-STS (RFC 8461) and TLS reporting (RFC 8460)", None, None),
        (f"_mta-sts.{d}", "TXT", _txt(f"v=STSv1; id={policy_id}")),
        (f"mta-sts.{d}", "CNAME", h),
        (f"_smtp._tls.{d}", "TXT", _txt(f"v=TLSRPTv1; rua=mailto:tls-reports@{domain}")),
        ("; Client autoconfiguration (RFC 6186, RFC 8314: implicit TLS preferred)", None, None),
        (f"_submissions._tcp.{d}", "SRV", f"0 1 465 {h}"),
        (f"_submission._tcp.{d}", "SRV", f"10 1 587 {h}"),
        (f"_imaps._tcp.{d}", "SRV", f"0 1 993 {h}"),
        (f"_imap._tcp.{d}", "SRV", f"10 1 143 {h}"),
        (f"_pop3s._tcp.{d}", "SRV", f"0 1 995 {h}"),
        (f"_pop3._tcp.{d}", "SRV", f"10 1 110 {h}"),
    ]
    width = max(len(name) for name, kind, _ in rows if kind)
    lines = [name if kind is None else f"{name:<{width}}  3600  IN  {kind:<5}  {value}" for name, kind, value in rows]
    lines.append(f"; Serve this file at https://mta-sts.{domain}/.well-known/mta-sts.txt (HTTPS, valid certificate):")
    lines.extend(f";   {line}" for line in policy.splitlines())
    return "\n".join(lines) + "\n"


def _txt(value: str) -> str:
    """A TXT value as quoted character-strings of at most 255 octets each."""
    chunks = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)
