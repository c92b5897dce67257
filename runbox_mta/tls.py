"""The one TLS context factory: every listener and the SMTP client get their contexts here.

Policy (SPEC §4), and why:

- TLS 1.2 is the floor and TLS 1.3 is enabled (and wins whenever the client
  has it): everything older lacks AEAD ciphers and has known downgrade attacks
  (RFC 8996 deprecates 1.0 and 1.1).
- TLS 1.2 suites are ECDHE + AEAD only (AES-GCM, ChaCha20-Poly1305), for ECDSA
  and RSA certificates alike: no RSA key exchange (no forward secrecy), no CBC
  (padding oracles), no DHE (slow, weak parameters in the wild), no
  RC4/3DES/NULL/EXPORT. TLS 1.3 suites are OpenSSL's defaults, all AEAD.
  @SECLEVEL=2 also refuses keys under 112-bit strength (e.g. RSA < 2048) and
  SHA-1 signatures.
- Forward secrecy is real: each handshake makes a fresh ephemeral ECDHE key
  (OpenSSL >= 1.1 always does; OP_SINGLE_ECDH_USE states it), and the server
  issues no session tickets at all (OP_NO_TICKET for 1.2, num_tickets = 0
  for 1.3), because one long-lived ticket key would decrypt every recorded
  session that used a ticket. TLS 1.3 therefore never resumes. TLS 1.2
  clients can still resume by session ID from OpenSSL's in-memory cache:
  no key is shared between sessions there, but each entry keeps its master
  secret for OpenSSL's default 2 hours, and Python 3.11 exposes no way to
  shorten that or turn the cache off (SSL_CTX_set_timeout,
  SSL_CTX_set_session_cache_mode).
- Key exchange groups: Python 3.11 can only narrow the list to ONE group
  (`set_ecdh_curve`), which would lose either X25519 or P-256, so OpenSSL 3's
  default list stays: X25519, P-256, X448, P-521, P-384 and, for TLS 1.3
  only, the RFC 7919 FFDHE groups; all ephemeral. A TLS 1.2 client gets the
  first of these it supports (X25519 for any current client); a TLS 1.3
  client gets the first of its own key shares that is on the list.
- No compression (CRIME), no renegotiation (a client could force expensive
  handshakes and renegotiation has a history of injection bugs), and the
  server's cipher order wins over the client's.

Certificates: the default pair from [tls] plus one pair per [[tls.sni]]
host name. Listeners hold the one front context from `server_context()` for
the daemon's lifetime; its SNI callback switches each new handshake to the
context that holds the *current* certificate for the requested name (or the
default, also when the client sends no name: OpenSSL runs the callback for
every ClientHello). `reload()` builds fresh contexts and swaps them in with
one assignment, so new handshakes get the new certificates, connections that
are already up keep theirs, and a bad file changes nothing.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from runbox_mta.config import TlsConfig
from runbox_mta.errors import RunboxError

# SPEC §4: ECDHE key exchange with AEAD only, for ECDSA and RSA certificates.
# Server preference order as in Mozilla's "intermediate" profile: AES-128-GCM
# (ample, and fastest with AES-NI), AES-256-GCM, then ChaCha20-Poly1305.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "@SECLEVEL=2",
])


@dataclass(frozen=True)
class _Certificates:
    """One generation of loaded certificates; replaced whole on reload."""

    default: ssl.SSLContext
    by_name: Mapping[str, ssl.SSLContext]


class TlsContextFactory:
    """Builds the daemon's server context and outbound client contexts from [tls]."""

    def __init__(self, tls: TlsConfig) -> None:
        self._config = tls
        self._front = _server_context_for(tls.cert, tls.key)
        self._front.sni_callback = self._choose_certificate
        self._certificates = _Certificates(self._front, _load_sni(tls))
        self._clients: dict[bool, ssl.SSLContext] = {}

    def server_context(self) -> ssl.SSLContext:
        """The context every listener uses, implicit TLS and STARTTLS; never replaced."""
        return self._front

    def reload(self) -> None:
        """Re-read every certificate and key; on any error keep the old ones and raise."""
        default = _server_context_for(self._config.cert, self._config.key)
        self._certificates = _Certificates(default, _load_sni(self._config))

    def client_context(self, verify: bool) -> ssl.SSLContext:
        """Outbound SMTP: opportunistic (verify=False) or authenticated TLS against system CAs."""
        if verify not in self._clients:
            self._clients[verify] = _client_context(verify)
        return self._clients[verify]

    def _choose_certificate(self, ssl_object: ssl.SSLObject, server_name: str | None,
                            _front: ssl.SSLContext) -> None:
        # Read the generation once: a reload in between cannot mix two of them.
        certificates = self._certificates
        name = (server_name or "").rstrip(".").lower()
        ssl_object.context = certificates.by_name.get(name, certificates.default)


def describe_tls(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """Protocol and cipher for a Received header, e.g. "TLS1.3 TLS_AES_256_GCM_SHA384"."""
    if ssl_object is None:
        return "none"
    version = (ssl_object.version() or "unknown").replace("TLSv", "TLS")
    cipher = ssl_object.cipher()
    return f"{version} {cipher[0] if cipher else 'unknown'}"


def _load_sni(tls: TlsConfig) -> dict[str, ssl.SSLContext]:
    return {entry.hostname: _server_context_for(entry.cert, entry.key) for entry in tls.sni}


def _server_context_for(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_common_policy(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    # SPEC §4: no long-lived session-ticket key (1.2 tickets; 1.3 tickets).
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    _load_pair(context, cert, key)
    return context


def _client_context(verify: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_common_policy(context)
    if verify:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        # Opportunistic STARTTLS (RFC 7435): encrypt, authenticate nobody.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _apply_common_policy(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # SPEC §4, RFC 8996
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # SPEC §4


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a certificate chain and its key, naming the culprit file in any error."""
    cert_pem, key_pem = _read(cert), _read(key)
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise RunboxError(f"{cert}: not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        # Caught here, before OpenSSL would prompt on the terminal for a passphrase.
        raise RunboxError(f"{key}: the private key is encrypted; the daemon needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise RunboxError(f"{key}: not a PEM private key") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise RunboxError(f"{key}: does not match the certificate {cert}") from None
        raise RunboxError(f"{cert}, {key}: cannot use certificate: {error.reason or error}") from None
    except OSError as error:  # replaced or removed since we read it
        raise RunboxError(f"{cert}, {key}: cannot read: {error.strerror or error}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise RunboxError(f"{path}: cannot read: {error.strerror or error}") from None
