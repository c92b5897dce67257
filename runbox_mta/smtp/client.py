"""The outbound SMTP client: one session to one hop, several transactions on it.

`open_session` connects, reads the greeting, sends EHLO (HELO if EHLO is
refused) and, whenever STARTTLS is offered, upgrades (RFC 3207). TLS modes:

- opportunistic (no policy, Postfix `may`, RFC 7435): no certificate check;
  a failed handshake is retried on a new connection to the same hop in
  plaintext, and a server without STARTTLS gets plaintext;
- required (a policy applies): the server is authenticated by the given
  context (CA and host name: `verify`, MTA-STS) and/or a check of the
  certificate chain it sent (DANE), and there is no plaintext fallback:
  `TlsRequired` (temporary).

`Session.send` runs one transaction, pipelined when the server offers
PIPELINING (RFC 2920), and returns one final reply per recipient. SIZE
(RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531) are checked before
anything is sent, so a message the server cannot take fails at once.
"""

from __future__ import annotations

import _ssl
import asyncio
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runbox_mta.tls import describe_tls

# RFC 5321 §4.5.3.2: initial 220 5 min, MAIL/RCPT 5 min, DATA init 2 min,
# data blocks 3 min, final dot 10 min. One bound per reply is simpler and the
# longest of them (10 min) is too long to hold a lease; replies get 5 min,
# except the final dot, which gets the RFC's 10 min.
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 300.0
FINAL_DOT_TIMEOUT = 600.0
TLS_HANDSHAKE_TIMEOUT = 60.0
# QUIT's reply and the close handshake change nothing already delivered, and
# a daemon stopping has only seconds: wait briefly. (asyncio.timeout rather
# than wait_for throughout: on Python 3.11 wait_for can swallow a cancellation.)
CLOSE_TIMEOUT = 1.0
# A reply line is at most 512 octets (RFC 5321 §4.5.3.1.5); be lenient, not unbounded.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 100
_REPLY_LINE = re.compile(r"([2-5]\d\d)([ -]?)(.*)")


class SmtpClientError(Exception):
    """The session cannot go on; `temporary` tells deferral from bounce."""

    def __init__(self, message: str, temporary: bool = True) -> None:
        super().__init__(message)
        self.temporary = temporary


class TlsRequired(SmtpClientError):
    """A TLS policy applies and authenticated TLS could not be set up: keep the mail queued."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as one line, e.g. "550 5.1.1 User unknown" (for DSNs and last_error)."""
        return f"{self.code} {' '.join(self.lines)}".strip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


@dataclass(frozen=True)
class PeerVerdict:
    """A policy's judgement of the server's certificate chain (e.g. DANE)."""

    accepted: bool
    why: str  # accepted: how the TLS outcome names the authentication; else the reason for refusal


@dataclass(frozen=True)
class TlsPolicy:
    """How to use STARTTLS: when `required`, no plaintext fallback, and the server is
    authenticated by `context` (it verifies) and/or `peer_check` (e.g. DANE) on its certificate chain."""

    context: ssl.SSLContext
    required: bool = False
    server_name: str | None = None  # SNI and the name checked when the context verifies
    # Judges the server's chain as sent (DER, its own certificate first); its
    # verdict, when accepted, names the authentication instead of `outcome`.
    peer_check: Callable[[Sequence[bytes]], PeerVerdict] | None = None
    outcome: str = "unverified"  # how the TLS outcome names the authentication, e.g. "verified"


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    data: bytes  # CRLF line endings, not dot-stuffed


class Session:
    """One open SMTP connection after EHLO (and STARTTLS, when it happened)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 extensions: dict[str, str], tls_outcome: str) -> None:
        self._reader = reader
        self._writer = writer
        self.extensions = extensions  # keyword (upper case) -> parameters
        self.tls_outcome = tls_outcome  # e.g. "TLS1.3 TLS_AES_256_GCM_SHA384 unverified", or "plaintext ..."
        self._dirty = False  # a transaction was aborted: RSET before the next

    async def send(self, envelope: Envelope) -> dict[str, Reply]:
        """Deliver one message; the final reply for each recipient (RCPT's, or DATA's if RCPT passed)."""
        refused = self._refuse(envelope)
        if refused is not None:
            return dict.fromkeys(envelope.recipients, refused)
        if self._dirty:
            await self._command("RSET")
        self._dirty = True
        commands = [self._mail_from(envelope), *(f"RCPT TO:<{to}>" for to in envelope.recipients), "DATA"]
        if "PIPELINING" in self.extensions:
            replies = await self._pipelined(commands)  # RFC 2920 §3.1
        else:
            replies = await self._one_by_one(commands)
        mail, data = replies[0], replies[-1]
        rcpts = [reply for reply in replies[1:-1] if reply is not None]
        if mail is None or not mail.positive:
            return dict.fromkeys(envelope.recipients, mail or Reply(451, ("4.3.0 no reply to MAIL",)))
        results = dict(zip(envelope.recipients, rcpts))
        accepted = [to for to, reply in results.items() if reply.positive]
        if data is not None and data.code == 354:
            # With nobody accepted, an empty message only ends the DATA (RFC 2920 §3.1).
            final = await self._data(envelope.data if accepted else b"")
            self._dirty = not accepted
            results.update(dict.fromkeys(accepted, final))
        elif data is not None:
            results.update(dict.fromkeys(accepted, data))
        return results

    async def quit(self) -> None:
        """QUIT politely, then close; errors here change nothing already delivered."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._command("QUIT")
        except (SmtpClientError, OSError, TimeoutError):
            pass
        await close(self._writer)

    def _refuse(self, envelope: Envelope) -> Reply | None:
        """A local 5xx when the server cannot take this message as it is."""
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) and len(envelope.data) > int(limit):
            return Reply(552, ("5.3.4 message too big for the destination (RFC 1870)",))
        if _non_ascii(envelope) and "SMTPUTF8" not in self.extensions:
            return Reply(553, ("5.6.7 non-ASCII address and the destination lacks SMTPUTF8 (RFC 6531)",))
        if _eight_bit(envelope.data) and "8BITMIME" not in self.extensions:
            # RFC 6152 §3: 8-bit data only to a server that offers 8BITMIME; we do not convert.
            return Reply(554, ("5.6.3 8-bit message and the destination lacks 8BITMIME",))
        return None

    def _mail_from(self, envelope: Envelope) -> str:
        parameters = []
        if "SIZE" in self.extensions:
            parameters.append(f"SIZE={len(envelope.data)}")  # RFC 1870 §6
        if _eight_bit(envelope.data):
            parameters.append("BODY=8BITMIME")  # RFC 6152 §2
        if _non_ascii(envelope) and "SMTPUTF8" in self.extensions:
            parameters.append("SMTPUTF8")  # RFC 6531 §3.4
        return " ".join([f"MAIL FROM:<{envelope.sender}>", *parameters])

    async def _pipelined(self, commands: Sequence[str]) -> list[Reply | None]:
        """All commands in one write, then the replies in order (RFC 2920 §3.1)."""
        self._writer.write("".join(f"{command}\r\n" for command in commands).encode())
        await self._writer.drain()
        return [await read_reply(self._reader) for _ in commands]

    async def _one_by_one(self, commands: Sequence[str]) -> list[Reply | None]:
        """Stop after a refused MAIL, and send DATA only if some RCPT passed."""
        mail = await self._command(commands[0])
        if not mail.positive:
            return [mail] * (len(commands) - 1) + [None]
        rcpts = [await self._command(command) for command in commands[1:-1]]
        data = await self._command("DATA") if any(reply.positive for reply in rcpts) else None
        return [mail, *rcpts, data]

    async def _data(self, data: bytes) -> Reply:
        self._writer.write(dot_stuff(data) + b".\r\n")  # RFC 5321 §4.5.2
        await self._writer.drain()
        return await read_reply(self._reader, FINAL_DOT_TIMEOUT)

    async def _command(self, line: str) -> Reply:
        self._writer.write(line.encode() + b"\r\n")
        await self._writer.drain()
        return await read_reply(self._reader)


async def open_session(address: str, port: int, *, helo: str, tls: TlsPolicy) -> Session:
    """Connect, greet, EHLO and STARTTLS per `tls`; SmtpClientError if no session comes of it."""
    reader, writer = await _connect(address, port)
    try:
        extensions = await _greet(reader, writer, helo)
        if "STARTTLS" not in extensions:
            if tls.required:
                raise TlsRequired("TLS is required but the server does not offer STARTTLS")
            return Session(reader, writer, extensions, "plaintext (STARTTLS not offered)")
        reply = await _command(reader, writer, "STARTTLS")
        if reply.code != 220:
            if tls.required:
                raise TlsRequired(f"TLS is required but STARTTLS was refused: {reply.text}")
            return Session(reader, writer, extensions, f"plaintext (STARTTLS refused: {reply.code})")
        handshake_error = await _start_tls(writer, tls)
        verdict = _peer_verdict(writer, tls) if handshake_error is None else None
        if verdict is not None and not verdict.accepted:
            raise TlsRequired(f"the server certificate is not authenticated: {verdict.why}")
    except BaseException:
        await close(writer)
        raise
    if handshake_error is None:
        try:
            extensions = await _ehlo(reader, writer, helo)  # RFC 3207 §4.2: forget what was said before
        except BaseException:
            await close(writer)
            raise
        authentication = verdict.why if verdict is not None else tls.outcome
        return Session(reader, writer, extensions, f"{describe_tls(writer.get_extra_info('ssl_object'))} {authentication}")
    await close(writer)
    if tls.required:
        raise TlsRequired(f"TLS is required but the handshake failed: {handshake_error}")
    return await _plaintext_retry(address, port, helo, handshake_error)


async def _plaintext_retry(address: str, port: int, helo: str, handshake_error: str) -> Session:
    """SPEC §4, Postfix `may`: the same hop again, without STARTTLS."""
    reader, writer = await _connect(address, port)
    try:
        extensions = await _greet(reader, writer, helo)
    except BaseException:
        await close(writer)
        raise
    return Session(reader, writer, extensions, f"plaintext (TLS handshake failed: {handshake_error})")


async def _start_tls(writer: asyncio.StreamWriter, tls: TlsPolicy) -> str | None:
    """Upgrade the connection; None on success, else why the handshake failed."""
    try:
        await writer.start_tls(tls.context, server_hostname=tls.server_name,
                               ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    except ssl.SSLCertVerificationError as error:
        return f"certificate not verified: {error.verify_message}"
    except (ssl.SSLError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
        return type(error).__name__ if not str(error) else f"{type(error).__name__}: {error}"
    return None


def _peer_verdict(writer: asyncio.StreamWriter, tls: TlsPolicy) -> PeerVerdict | None:
    if tls.peer_check is None:
        return None
    chain = peer_chain(writer.get_extra_info("ssl_object"))
    return tls.peer_check(chain) if chain else PeerVerdict(False, "the server sent no certificate")


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, as it sent them (DER, its own first), unverified.

    DANE-TA needs them (RFC 7672 §3.1.2) and `getpeercert` gives only the
    first. Python 3.13 made `get_unverified_chain` public; 3.11 and 3.12 have
    the same OpenSSL call (SSL_get_peer_cert_chain) on the private `_sslobj`,
    which those maintenance-only branches keep. The TLS session itself stays
    in asyncio's (or uvloop's) hands either way.
    """
    public = getattr(ssl_object, "get_unverified_chain", None)
    chain = public() if public is not None else ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER) for item in chain or ()]


async def _connect(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await asyncio.open_connection(address, port, limit=MAX_REPLY_LINE)
    except TimeoutError:
        raise SmtpClientError("connection timed out") from None
    except OSError as error:
        raise SmtpClientError(f"connection failed: {error.strerror or error}") from None


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, helo: str) -> dict[str, str]:
    greeting = await read_reply(reader)
    if greeting.code != 220:
        # RFC 5321 §3.1: a 554 greeting means "no service here"; another MX may serve.
        raise SmtpClientError(f"greeting: {greeting.text}", temporary=True)
    return await _ehlo(reader, writer, helo)


async def _ehlo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, helo: str) -> dict[str, str]:
    reply = await _command(reader, writer, f"EHLO {helo}")
    if reply.positive:
        return _extensions(reply)
    reply = await _command(reader, writer, f"HELO {helo}")  # RFC 5321 §3.2: fall back for old servers
    if not reply.positive:
        raise SmtpClientError(f"HELO: {reply.text}", temporary=reply.temporary)
    return {}


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> Reply:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return await read_reply(reader)


async def read_reply(reader: asyncio.StreamReader, timeout: float = REPLY_TIMEOUT) -> Reply:
    """One (possibly multi-line) reply; SmtpClientError on timeout, EOF or garbage."""
    try:
        async with asyncio.timeout(timeout):  # for the whole reply (RFC 5321 §4.5.3.2 times replies)
            return await _reply_lines(reader)
    except TimeoutError:
        raise SmtpClientError("timed out waiting for a reply") from None
    except (ValueError, asyncio.LimitOverrunError):
        raise SmtpClientError("reply line too long") from None
    except OSError as error:
        raise SmtpClientError(f"connection lost: {error.strerror or error}") from None


async def _reply_lines(reader: asyncio.StreamReader) -> Reply:
    lines: list[str] = []
    while len(lines) < MAX_REPLY_LINES:
        raw = await reader.readline()
        match = _REPLY_LINE.fullmatch(raw.decode("utf-8", "replace").rstrip("\r\n"))
        if not raw.endswith(b"\n") or match is None:
            raise SmtpClientError("connection lost" if not raw else "malformed reply")
        lines.append(match.group(3))
        if match.group(2) != "-":
            return Reply(int(match.group(1)), tuple(lines))
    raise SmtpClientError("reply too long")


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the first line is the greeting."""
    extensions = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        extensions[keyword.upper()] = parameters
    return extensions


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, and a final CRLF so the dot stands on its own line."""
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def _eight_bit(data: bytes) -> bool:
    return not data.isascii()


def _non_ascii(envelope: Envelope) -> bool:
    return not all(address.isascii() for address in (envelope.sender, *envelope.recipients))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass
