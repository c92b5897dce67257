"""One SMTP connection: aiosmtpd's grammar with our replies, limits, EHLO and AUTH.

aiosmtpd owns the command loop, the path syntax and DATA (only CRLF.CRLF
ends it: aiosmtpd >= 1.4.5 reads DATA with readuntil(b"\\r\\n"), so "\\n.\\n"
and friends never split a message). This subclass changes what aiosmtpd
leaves to its users or gets wrong for us:

- every reply after the greeting gets an enhanced status code (codes.py);
- 5xx replies are counted and the session is closed with 421 at
  HARD_ERROR_LIMIT; commands that move no mail are counted and closed at
  JUNK_COMMAND_LIMIT; unknown verbs count as errors (aiosmtpd would hang up
  after five on its own terms);
- EHLO advertises what we do (PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
  ENHANCEDSTATUSCODES, STARTTLS, AUTH) and nothing else;
- AUTH PLAIN/LOGIN (with SASL-IR) through the shared AuthService, which is
  asynchronous (aiosmtpd's authenticator callback is not);
- an idle timeout, a daemon shutdown and the limits say 421 before closing,
  and the idle timer restarts on any input, so a slow DATA upload is not
  "idle" (aiosmtpd only restarts it per command).

STARTTLS stays aiosmtpd's: it discards plaintext pipelined after the
command (RFC 3207 §4.2, CVE-2011-0411) and works under uvloop, which
tests/test_smtp_tls.py checks on both event loops.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, syntax

from runbox_mta.auth.sasl import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    Credentials,
    SaslCancelled,
    SaslError,
    decode_login_password,
    decode_login_username,
    decode_plain,
)
from runbox_mta.auth.service import AuthFailure, AuthResult
from runbox_mta.config import LimitsConfig
from runbox_mta.smtp import codes
from runbox_mta.smtp.policy import (
    AUTH_MECHANISMS,
    HARD_ERROR_LIMIT,
    JUNK_COMMAND_LIMIT,
    JUNK_COMMANDS,
    auth_refusal,
)
from runbox_mta.store.recipients import Resolution

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets; RFC 1870 §3
# (SIZE=) and RFC 6531 §3.4 (SMTPUTF8) let MAIL FROM grow by 26 and 10.
COMMAND_LINE_LIMIT = 512
MAIL_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 10
# RFC 4954 §4: an AUTH command line or SASL response of up to 12288 octets (CRLF included).
AUTH_LINE_LIMIT = 12288
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# MAIL/RCPT paths already parsed, shared by all sessions; emptied when full.
_PARSED_PATHS: dict[tuple[str, int], tuple[str | None, str | None]] = {}
MAX_PARSED_PATHS = 4096

Authenticator = Callable[[str, str, str], Awaitable[AuthResult]]  # (user, password, client IP)


@dataclass(frozen=True)
class SessionSettings:
    """What one listener's sessions share."""

    hostname: str
    submission: bool  # AUTH offered and required; the authenticated may relay
    starttls: ssl.SSLContext | None  # STARTTLS offered with this context
    require_tls: bool  # nothing but EHLO, NOOP, STARTTLS and QUIT before TLS (RFC 3207 §4)
    limits: LimitsConfig
    authenticate: Authenticator


class MailEnvelope(Envelope):
    """aiosmtpd's per-transaction state, plus each accepted recipient's resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.resolutions: list[Resolution] = []


class _Commands(dict[str, Any]):
    """aiosmtpd's verb -> method table, answering unknown verbs with `fallback`."""

    def __init__(self, methods: dict[str, Any], fallback: Callable[[str | None], Awaitable[None]]) -> None:
        super().__init__(methods)
        self._fallback = fallback

    def get(self, verb: str, default: Any = None) -> Any:
        return super().get(verb, self._fallback)


class SmtpSession(SMTP):
    """One connection's protocol object; aiosmtpd calls the handler's hooks with it as `server`."""

    def __init__(self, handler: object, settings: SessionSettings, client_ip: str) -> None:
        # super().__init__ sizes its StreamReader with this: the longest line any
        # state reads, an AUTH line or SASL response (RFC 4954 §4).
        self.line_length_limit = AUTH_LINE_LIMIT
        super().__init__(
            handler, data_size_limit=settings.limits.message_size, enable_SMTPUTF8=True, decode_data=False,
            hostname=settings.hostname, ident="ESMTP", tls_context=settings.starttls,
            require_starttls=settings.require_tls, timeout=settings.limits.smtp_idle_timeout,
            auth_required=settings.submission, loop=asyncio.get_running_loop(),
        )
        # What DATA lines are held to: RFC 5321 §4.5.3.1.6 text line (CRLF
        # included) plus a transparency dot. Command lines have their own limits.
        self.line_length_limit = settings.limits.smtp_line_length + 1
        self.settings = settings
        self.client_ip = client_ip
        # An instance table: aiosmtpd's is shared by all sessions and grows with each EHLO.
        self.command_size_limits = defaultdict(lambda: COMMAND_LINE_LIMIT, {
            "MAIL": MAIL_LINE_LIMIT, "AUTH": AUTH_LINE_LIMIT,
        })
        self._smtp_methods = self._command_table(self._smtp_methods)
        self._greeted = False
        self._errors = 0
        self._junk = 0
        self._busy = False  # in DATA or AUTH: a drain waits for the reply
        self._held: list[bytes] = []  # replies not yet written (see _write)
        self._stop_when_done = False

    # --- what serve_protocol needs (net.listener.SessionProtocol) ------------------------------

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    def shutdown(self) -> None:
        self._say_and_close(codes.SHUTTING_DOWN)

    def stop_when_idle(self) -> None:
        # Only DATA and AUTH hold work that must not be cut off (a commit whose
        # 250 would be lost, so the client sends the message again; an Argon2
        # check); anywhere else the client has nothing acknowledged to lose.
        if self._busy:
            self._stop_when_done = True
        else:
            self.shutdown()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        await self._unless_stopped(super().smtp_DATA(arg))

    async def _unless_stopped(self, command: Awaitable[None]) -> None:
        """Run a command that must not be cut off by a drain; end the session after it if one began."""
        self._busy = True
        try:
            await command
        finally:
            self._busy = False
            if self._stop_when_done:
                self.shutdown()

    # --- state for the handlers ------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return None if self.transport is None else self.transport.get_extra_info("ssl_object")

    @property
    def tls_active(self) -> bool:
        return self.ssl_object is not None

    def message_accepted(self) -> None:
        """A message was stored: the client is doing useful work, its junk allowance restarts."""
        self._junk = 0

    def _create_envelope(self) -> MailEnvelope:
        return MailEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses each MAIL/RCPT path with the email package's header
        # parser (a twelfth of the MX's CPU); the same paths come again and again.
        key = (arg, self.local_part_limit)
        parsed = _PARSED_PATHS.get(key)
        if parsed is None:
            parsed = super()._getaddr(arg)
            if len(_PARSED_PATHS) >= MAX_PARSED_PATHS:
                _PARSED_PATHS.clear()
            _PARSED_PATHS[key] = parsed
        return parsed

    # --- replies, errors and closing -------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        reply = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if self._greeted:
            reply = codes.with_enhanced_code(reply)
        self._greeted = True  # RFC 2034 §3: the greeting carries no enhanced code
        await self._write(reply)
        if codes.is_permanent_failure(reply):
            self._errors += 1
            if self._errors >= HARD_ERROR_LIMIT:
                await self._hang_up(codes.TOO_MANY_ERRORS)

    async def _write(self, reply: str) -> None:
        # Replies may echo client input (aiosmtpd's "Could not VRFY <arg>"):
        # no control characters, and no bytes that are not UTF-8.
        self._held.append(_CONTROL.sub("?", reply).encode("utf-8", "replace") + b"\r\n")
        # RFC 2920 §3.1: replies to pipelined commands may go out together. A 250
        # while the client's next command line already waits in the input is not
        # awaited by the client: hold it, and write all held replies at once with
        # the next reply sent while the input has run dry (a syscall a reply saved).
        if reply.startswith("250") and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return
        self._writer.write(self._take_held())
        await self._writer.drain()

    def _take_held(self) -> bytes:
        replies = b"".join(self._held)
        self._held.clear()
        return replies

    async def _hang_up(self, reply: str) -> None:
        """Send a closing 421 and end the session before another pipelined command is read."""
        self._say_and_close(reply)
        assert self._handler_coroutine is not None
        self._handler_coroutine.cancel()
        await asyncio.sleep(0)  # the cancellation lands here (we run in that task)

    def _say_and_close(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(self._take_held() + reply.encode("ascii") + b"\r\n")
        self.transport.close()

    def _timeout_cb(self) -> None:
        self._say_and_close(codes.TIMEOUT)
        super()._timeout_cb()

    def data_received(self, data: bytes) -> None:
        # Idle means silent (RFC 5321 §4.5.3.2.7): a long DATA upload is not idle.
        self._reset_timeout()
        super().data_received(data)

    # --- commands ----------------------------------------------------------------------------------

    def _command_table(self, methods: dict[str, Any]) -> _Commands:
        table = _Commands(methods, self._unrecognised)
        for verb in JUNK_COMMANDS:
            table[verb] = self._junk_counted(table[verb])
        return table

    def _junk_counted(self, method: Callable[[str | None], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(method)  # keeps aiosmtpd's HELP syntax attributes
        async def counted(arg: str | None) -> None:
            self._junk += 1
            if self._junk > JUNK_COMMAND_LIMIT:
                await self._hang_up(codes.TOO_MANY_COMMANDS)
                return
            await method(arg)

        return counted

    async def _unrecognised(self, arg: str | None) -> None:
        await self.push(codes.UNRECOGNISED)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        if await self._greet("HELO", hostname, extended=False):
            await self._write(f"250 {self.hostname}")  # RFC 2034 §3: no enhanced code on HELO/EHLO

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        if await self._greet("EHLO", hostname, extended=True):
            lines = [self.hostname, *self._extensions()]
            for line in lines[:-1]:
                await self._write(f"250-{line}")
            await self._write(f"250 {lines[-1]}")

    async def _greet(self, verb: str, hostname: str | None, *, extended: bool) -> bool:
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return False
        # RFC 5321 §4.1.4: HELO/EHLO resets the transaction, like RSET.
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = extended
        self.session.host_name = hostname
        return True

    def _extensions(self) -> list[str]:
        extensions = ["PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.tls_active:
            extensions.append("STARTTLS")  # RFC 3207 §4.2: not again once TLS is on
        if self.settings.submission and self.tls_active:
            extensions.append("AUTH " + " ".join(AUTH_MECHANISMS))  # RFC 4954 §4: only over TLS
        return extensions

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_active:
            await self.push(codes.TLS_ALREADY_ACTIVE)  # aiosmtpd would nest a second TLS layer
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH mechanism [initial-response]")
    async def smtp_AUTH(self, arg: str | None) -> None:
        await self._unless_stopped(self._auth(arg))

    async def _auth(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        refusal = auth_refusal(
            offered=self.settings.submission, tls=self.tls_active, extended=self.session.extended_smtp,
            authenticated=bool(self.session.authenticated), in_transaction=self.envelope.mail_from is not None,
        )
        mechanism, _, initial = (arg or "").strip().partition(" ")
        if refusal is None and mechanism.upper() not in AUTH_MECHANISMS:
            refusal = codes.AUTH_SYNTAX if not mechanism else codes.AUTH_MECHANISM_UNKNOWN
        if refusal is not None:
            await self.push(refusal)
            return
        try:
            credentials = await self._sasl(mechanism.upper(), initial.strip() or None)
        except SaslCancelled:
            await self.push(codes.AUTH_CANCELLED)
            return
        except SaslError:
            await self.push(codes.AUTH_BAD_RESPONSE)
            return
        await self.push(await self._check(credentials))

    async def _sasl(self, mechanism: str, initial: str | None) -> Credentials:
        """Run the PLAIN or LOGIN exchange (RFC 4616, draft-murchison-sasl-login; SASL-IR per RFC 4954 §4)."""
        if mechanism == "PLAIN":
            return decode_plain(initial if initial is not None else await self._challenge(""))
        username = decode_login_username(initial if initial is not None
                                         else await self._challenge(LOGIN_USERNAME_CHALLENGE))
        return Credentials(username, decode_login_password(await self._challenge(LOGIN_PASSWORD_CHALLENGE)))

    async def _challenge(self, text: str) -> bytes:
        await self._write(f"334 {text}")  # RFC 4954 §4: the space is there even with no text
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._discard_line(error.consumed)
            raise SaslError("response line too long") from None

    async def _discard_line(self, consumed: int) -> None:
        while True:
            await self._reader.read(consumed)
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as error:
                consumed = error.consumed

    async def _check(self, credentials: Credentials) -> str:
        result = await self.settings.authenticate(credentials.username, credentials.password, self.client_ip)
        if result.ok:
            assert self.session is not None
            self.session.authenticated = True
            self.session.auth_data = result
            return codes.AUTH_OK
        return codes.AUTH_LOCKED if result.failure is AuthFailure.TEMPORARILY_LOCKED else codes.AUTH_INVALID
