"""SMTP replies, by name (aiosmtpd's testing/statuscodes.py does the same for its own).

Every reply after the greeting carries an enhanced status code (RFC 2034 §3,
codes from RFC 3463), because EHLO advertises ENHANCEDSTATUSCODES. Replies
we write spell theirs out; replies aiosmtpd writes itself ("503 Error: need
MAIL command") get the default code for their basic code from
`with_enhanced_code`, the way Postfix fills in a detail code.

The constants below hold the exact reply text, so tests compare whole lines.
"""

from __future__ import annotations

import re

# --- success ------------------------------------------------------------------------------
OK = "250 2.0.0 OK"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 OK: queued as {queue_id}"
AUTH_OK = "235 2.7.0 Authentication successful"
BYE = "221 2.0.0 Bye"
READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
CANNOT_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"

# --- closing the connection (RFC 5321 §3.8: 421, then close) --------------------------------
BUSY = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TIMEOUT = "421 4.4.2 Error: timeout exceeded"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
TOO_MANY_COMMANDS = "421 4.7.0 Error: too many commands without a message"

# --- temporary failures --------------------------------------------------------------------
STORAGE_FAILURE = "451 4.3.0 Temporary storage failure, try again later"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"  # RFC 5321 §4.5.3.1.10
MAILBOX_FULL_AT_RCPT = "452 4.2.2 Mailbox full"  # the sender retries; the user may make room
AUTH_LOCKED = "454 4.7.0 Temporary authentication failure, try again later"  # RFC 4954 §6
TLS_NOT_AVAILABLE = "454 4.7.0 TLS not available"

# --- syntax and sequence (aiosmtpd writes most of these itself) -----------------------------
UNRECOGNISED = "500 5.5.2 Error: command not recognized"
BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_BAD_RESPONSE = "501 5.5.2 Invalid SASL response"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"  # RFC 4954 §4
EXPN_DISABLED = "502 5.5.1 EXPN not implemented"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
SEND_EHLO_FIRST = "503 5.5.1 Error: send EHLO first"
SEND_HELO_FIRST = "503 5.5.1 Error: send HELO first"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
AUTH_ALREADY_DONE = "503 5.5.1 Error: already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"  # RFC 4954 §4
AUTH_MECHANISM_UNKNOWN = "504 5.5.4 Unrecognized authentication type"
TLS_ALREADY_ACTIVE = "503 5.5.1 Error: TLS already active"

# --- refusals --------------------------------------------------------------------------------
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"  # RFC 3207 §4
AUTH_REQUIRED = "530 5.7.0 Authentication required"  # RFC 4954 §6
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"  # RFC 4954 §6
UNKNOWN_USER = "550 5.1.1 User unknown"
BARE_LINE_ENDING = "550 5.6.2 Message contains a bare CR or LF (RFC 5321 §2.3.8)"
DMARC_REJECT = "550 5.7.1 Rejected by the sender domain's DMARC policy"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed maximum message size"
TOO_MUCH_DATA = "552 5.3.4 Error: Too much mail data"
MAILBOX_FULL_AT_DATA = "552 5.2.2 Mailbox full"
BAD_RECIPIENT = "553 5.1.3 Bad recipient address syntax"
BAD_SENDER = "553 5.1.7 Bad sender address syntax"
NON_ASCII_ADDRESS = "553 5.6.7 Non-ASCII address needs SMTPUTF8"  # RFC 6531 §3.5
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated user"
RELAY_DENIED = "554 5.7.1 Relay access denied"

# RFC 3463 detail for replies that come without one (aiosmtpd's own), by basic code.
_DEFAULT_DETAIL = {
    "211": "2.0.0", "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.0.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "535": "5.7.8", "538": "5.7.11", "552": "5.3.4", "553": "5.1.3", "554": "5.7.0", "555": "5.5.4",
}
_HAS_DETAIL = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_BASIC = re.compile(r"([245])\d\d[ -]")


def with_enhanced_code(reply: str) -> str:
    """`reply` with an enhanced status code after its basic code, if it has none (RFC 2034 §3)."""
    if _HAS_DETAIL.match(reply) or not _BASIC.match(reply):
        return reply  # already coded, or a 3xx continuation, which takes none
    code, separator, text = reply[:3], reply[3], reply[4:]
    detail = _DEFAULT_DETAIL.get(code, f"{code[0]}.0.0")
    return f"{code}{separator}{detail} {text}" if text else f"{code}{separator}{detail}"


def is_permanent_failure(reply: str) -> bool:
    return reply.startswith("5")
