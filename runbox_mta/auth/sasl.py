"""SASL PLAIN and LOGIN decoding shared by SMTP AUTH, IMAP AUTHENTICATE and POP3 AUTH.

Pure functions, no I/O: the protocol code reads a client response line
(an initial response or the reply to a challenge), hands it here and gets
credentials back or a `SaslError` whose message suits its error reply.
The exchange rules are the same in the three protocols: a response is
base64, ``=`` is an empty initial response and ``*`` cancels (RFC 4954 §4,
RFC 9051 §6.2.2, RFC 5034 §4).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

# The LOGIN mechanism (draft-murchison-sasl-login) prompts with these
# base64 challenges; clients ignore the text but expect it in this order.
LOGIN_USERNAME_CHALLENGE = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD_CHALLENGE = base64.b64encode(b"Password:").decode("ascii")


class SaslError(Exception):
    """The client's SASL response is malformed; str(error) says how."""


class SaslCancelled(SaslError):
    """The client cancelled the exchange with ``*``; RFC 4954 §4 wants a 501 reply."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep passwords out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def decode_response(line: str | bytes) -> bytes:
    """One client response: base64 text, ``=`` for empty, ``*`` to cancel."""
    text = line.strip() if isinstance(line, bytes) else line.strip().encode("ascii", "replace")
    if text == b"*":
        raise SaslCancelled("authentication cancelled")
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64 in SASL response") from None


def parse_plain(message: bytes) -> Credentials:
    """An RFC 4616 PLAIN message: ``[authzid] NUL authcid NUL passwd``.

    The authorization identity must be empty or name the authenticating
    user itself: acting as another user is not offered.
    """
    fields = message.split(b"\0")
    if len(fields) != 3:
        raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
    authzid, authcid, password = (_utf8(field, "PLAIN response") for field in fields)
    if not authcid or not password:
        raise SaslError("PLAIN response has an empty user name or password")
    if authzid and authzid.lower() != authcid.lower():
        raise SaslError("PLAIN authorization identity must be empty or the user name")
    return Credentials(authcid, password)


def decode_plain(line: str | bytes) -> Credentials:
    """A base64 PLAIN response line (initial response or reply to an empty challenge)."""
    return parse_plain(decode_response(line))


def decode_login_username(line: str | bytes) -> str:
    """The reply to `LOGIN_USERNAME_CHALLENGE` (or a LOGIN initial response)."""
    return _login_value(line, "user name")


def decode_login_password(line: str | bytes) -> str:
    """The reply to `LOGIN_PASSWORD_CHALLENGE`."""
    return _login_value(line, "password")


def _login_value(line: str | bytes, what: str) -> str:
    value = _utf8(decode_response(line), what)
    if not value:
        raise SaslError(f"empty {what}")
    if "\0" in value:
        raise SaslError(f"NUL in {what}")
    return value


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not valid UTF-8") from None
