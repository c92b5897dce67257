"""`runbox-mta tls audit`: what each configured listener really accepts, probed from outside.

Each probe is a fresh connection and one handshake with a client that offers
exactly one protocol version, or exactly one TLS <= 1.2 cipher suite, with
OpenSSL's security level lowered to 0 so the client is willing to offer
obsolete choices. STARTTLS listeners get their protocol's preamble first
(SMTP EHLO/STARTTLS, IMAP STARTTLS, POP3 STLS). The audit fails when a
listener accepts anything older than TLS 1.2 or a suite without forward
secrecy (SPEC §2, §4), or cannot be reached at all.

TLS 1.3 suites cannot be restricted one at a time from Python 3.11; all of
them are AEAD with ephemeral key exchange, so the negotiated one is reported.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import warnings
from dataclasses import dataclass, field

from runbox_mta.config import Config, ListenerConfig

PROBE_TIMEOUT = 5.0
VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
FORBIDDEN_VERSIONS = ("TLSv1", "TLSv1.1")
# Key exchanges that make a fresh secret per handshake.
FORWARD_SECRET_KEX = ("kx-ecdhe", "kx-dhe")
# Suites a client can offer without extra credentials (PSK and SRP need a
# shared secret we do not have, so the server could never pick them anyway).
PROBED_KEX = ("kx-rsa", "kx-dhe", "kx-ecdhe")


class ProbeFailed(Exception):
    """The listener could not be reached or did not speak its protocol's preamble."""


@dataclass
class ListenerAudit:
    listener: ListenerConfig
    versions: list[str] = field(default_factory=list)
    suites: list[tuple[str, str]] = field(default_factory=list)  # (version, suite)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def audit(config: Config) -> list[ListenerAudit]:
    """Probe every configured TLS listener, one after the other (gentle on connection limits)."""
    # asyncio warns about every STARTTLS-upgraded stream closing; it is noise here.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    return [await audit_listener(listener) for listener in config.listeners]


async def audit_listener(listener: ListenerConfig) -> ListenerAudit:
    result = ListenerAudit(listener)
    if listener.tls == "none":
        return result  # a plaintext-only MX listener: nothing to audit, shown as such
    try:
        for name, version in VERSIONS.items():
            negotiated = await _probe(listener, _client(version=version))
            if negotiated:
                result.versions.append(name)
                if name == "TLSv1.3":
                    result.suites.append(negotiated)
        for suite, kex, auth in _tls12_suites():
            negotiated = await _probe(listener, _client(version=ssl.TLSVersion.TLSv1_2, suite=suite))
            if negotiated:
                result.suites.append(negotiated)
                if kex not in FORWARD_SECRET_KEX:
                    result.problems.append(f"accepts {suite} without forward secrecy")
                if auth == "auth-null":
                    result.problems.append(f"accepts {suite}, which authenticates no server (anonymous)")
    except ProbeFailed as error:
        result.problems.append(str(error))
        return result
    result.problems[:0] = [f"accepts {name}" for name in result.versions if name in FORBIDDEN_VERSIONS]
    if not result.versions:
        result.problems.append("no TLS handshake succeeded")
    return result


def report(audits: list[ListenerAudit]) -> str:
    lines = []
    for entry in audits:
        listener = entry.listener
        lines.append(f"{listener.protocol} on {listener.bind} port {listener.port} ({listener.tls})")
        if listener.tls == "none":
            lines.append("  plaintext listener: no TLS to audit")
            continue
        for version in VERSIONS:
            suites = [suite for v, suite in entry.suites if v == version]
            if version in entry.versions:
                lines.append(f"  {version}: {' '.join(dict.fromkeys(suites)) or 'accepted'}")
        refused = [v for v in VERSIONS if v not in entry.versions]
        if refused:
            lines.append(f"  refused: {', '.join(refused)}")
        lines.extend(f"  PROBLEM: {problem}" for problem in entry.problems)
    return "\n".join(lines)


def _tls12_suites() -> list[tuple[str, str, str]]:
    """(name, key exchange, authentication) of every TLS <= 1.2 suite worth offering."""
    context = _client(version=ssl.TLSVersion.TLSv1_2, suite="ALL:COMPLEMENTOFALL")
    return [
        (cipher["name"], cipher["kea"], cipher["auth"]) for cipher in context.get_ciphers()
        if cipher["protocol"] != "TLSv1.3" and cipher["kea"] in PROBED_KEX
        and cipher["auth"] not in ("auth-psk", "auth-srp")
    ]


def _client(version: ssl.TLSVersion, suite: str = "ALL") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the audit is about the policy, not the certificate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and 1.1 are deprecated: that is the point
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(f"{suite}:@SECLEVEL=0")  # OpenSSL 3 offers nothing obsolete above level 0
    return context


def _address(listener: ListenerConfig) -> str:
    """Where to reach a listener from this machine (a wildcard bind answers on loopback)."""
    if listener.bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listener.bind == "::":
        return "::1"
    return listener.bind


async def _probe(listener: ListenerConfig, context: ssl.SSLContext) -> tuple[str, str] | None:
    """(version, suite) if the listener completes a handshake with `context`, else None."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(_address(listener), listener.port), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as error:
        raise ProbeFailed(f"cannot connect: {getattr(error, 'strerror', None) or 'timed out'}") from None
    try:
        if listener.tls == "starttls":
            try:
                await asyncio.wait_for(_starttls_preamble(listener.protocol, reader, writer), PROBE_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                raise ProbeFailed("no answer to the STARTTLS preamble") from None
        try:
            await asyncio.wait_for(writer.start_tls(context), PROBE_TIMEOUT)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object.version(), ssl_object.cipher()[0]
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), PROBE_TIMEOUT)
        except (ssl.SSLError, OSError, asyncio.TimeoutError):
            pass


async def _starttls_preamble(protocol: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if protocol in ("smtp", "submission"):
        await _expect(reader, b"220")
        writer.write(b"EHLO tls-audit.invalid\r\n")
        while not (await _expect(reader, b"250")).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\n")
        await _expect(reader, b"220")
    elif protocol == "imap":
        await _expect(reader, b"* OK")
        writer.write(b"A1 STARTTLS\r\n")
        line = await reader.readline()
        while line.startswith(b"* "):  # untagged lines may come first
            line = await reader.readline()
        if not line.startswith(b"A1 OK"):
            raise ProbeFailed(f"unexpected reply to STARTTLS: {line[:80]!r}")
    elif protocol == "pop3":
        await _expect(reader, b"+OK")
        writer.write(b"STLS\r\n")
        await _expect(reader, b"+OK")


async def _expect(reader: asyncio.StreamReader, prefix: bytes) -> bytes:
    line = await reader.readline()
    if not line.startswith(prefix):
        raise ProbeFailed(f"unexpected reply before STARTTLS: {line[:80]!r}")
    return line
