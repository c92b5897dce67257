"""Pure decisions: each takes plain values and returns the refusal reply, or None to go ahead.

No I/O here, so a table test can pin every decision down; the aiosmtpd hooks
(inbound.py, submission.py) gather the facts and apply these.
"""

from __future__ import annotations

import enum

from runbox_mta.smtp import codes
from runbox_mta.smtp.address import NULL_REVERSE_PATH, needs_smtputf8, normalised, usable
from runbox_mta.store.recipients import Resolution, without_tag

# Replies starting with 5 a session may collect before it is closed with 421,
# like Postfix's smtpd_hard_error_limit (20 there; 10 is mox's and plenty for
# a client that is merely confused, while a scanner or a password guesser is
# cut off early).
HARD_ERROR_LIMIT = 10
# Postfix smtpd_junk_command_limit: commands that move no mail, allowed
# between two accepted messages, so a client cannot hold a connection open
# forever with NOOP or RSET.
JUNK_COMMAND_LIMIT = 100
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO"})
AUTH_MECHANISMS = ("PLAIN", "LOGIN")

class DmarcAction(enum.Enum):
    DELIVER = "deliver"
    QUARANTINE = "quarantine"  # into the recipient's Junk mailbox
    REJECT = "reject"


def auth_refusal(*, offered: bool, tls: bool, extended: bool, authenticated: bool,
                 in_transaction: bool) -> str | None:
    """Whether AUTH may start now (RFC 4954 §4)."""
    if not offered:
        return codes.AUTH_NOT_ENABLED  # the MX port relays nothing, so it authenticates nobody
    if not tls:
        return codes.TLS_REQUIRED  # passwords never cross the wire in clear text (SPEC §5)
    if not extended:
        return codes.SEND_EHLO_FIRST
    if authenticated:
        return codes.AUTH_ALREADY_DONE
    if in_transaction:
        return codes.AUTH_IN_TRANSACTION
    return None


def sender_refusal(address: str, *, smtputf8: bool, owned: frozenset[str] | None) -> str | None:
    """MAIL FROM; `owned` is the authenticated account's addresses on submission, None on the MX."""
    if address == NULL_REVERSE_PATH:
        # Bounces come from MTAs, never from a user's mail client.
        return codes.SENDER_NOT_OWNED if owned is not None else None
    if not usable(address):
        return codes.BAD_SENDER
    if needs_smtputf8(address) and not smtputf8:
        return codes.NON_ASCII_ADDRESS
    if owned is None:
        return None
    normal = normalised(address)
    if normal is None:
        return codes.BAD_SENDER
    return None if without_tag(normal) in owned or normal in owned else codes.SENDER_NOT_OWNED


def postmaster_candidates(address: str, hostname: str) -> tuple[str, ...]:
    """RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" (any case, no domain) MUST be accepted. It means
    postmaster at this host, or at the domain the host serves (Postfix appends $myorigin):
    the addresses to try, in order; () for any other address."""
    if address.lower() != "postmaster":
        return ()
    parent = hostname.partition(".")[2]
    return (f"postmaster@{hostname}",) + ((f"postmaster@{parent}",) if "." in parent else ())


def recipient_syntax_refusal(address: str, *, smtputf8: bool, accepted: int, limit: int) -> str | None:
    """RCPT TO, before any lookup."""
    if accepted >= limit:
        return codes.TOO_MANY_RECIPIENTS
    if normalised(address) is None:
        return codes.BAD_RECIPIENT
    if needs_smtputf8(address) and not smtputf8:
        return codes.NON_ASCII_ADDRESS
    return None


def recipient_refusal(resolution: Resolution, *, may_relay: bool, declared_size: int) -> str | None:
    """RCPT TO, once the address is resolved.

    A full mailbox refuses the recipient with a temporary 452 (the sender
    retries, and bounces after days): one full member of an alias refuses
    the alias, since SMTP has one reply per recipient and silently skipping
    a member would lose its mail.
    """
    if not resolution.hosted and not may_relay:
        return codes.RELAY_DENIED  # never an open relay (SPEC §5)
    if resolution.unknown:
        return codes.UNKNOWN_USER
    if not all(local.has_room_for(max(declared_size, 1)) for local in resolution.local):
        return codes.MAILBOX_FULL_AT_RCPT
    return None


def content_refusal(data: bytes) -> str | None:
    """The message as DATA delivered it (dot-unstuffed, CRLF line ends).

    RFC 5321 §2.3.8: CR and LF only ever appear together, as CRLF. A lone one
    is what SMTP smuggling hides a second message behind ("\\n.\\n" ends DATA
    for some receivers), so a message holding one is refused whole, as
    Postfix (smtpd_forbid_bare_newline) and sendmail do, instead of being
    stored or passed on to a server that might split it.
    """
    return codes.BARE_LINE_ENDING if has_bare_cr_or_lf(data) else None


def has_bare_cr_or_lf(data: bytes) -> bool:
    # Every CR is followed by LF and every LF preceded by CR exactly when the
    # three counts agree; bytes.count is ten times faster than a regex here.
    return not data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def dmarc_action(result: str, policy: str) -> DmarcAction:
    """RFC 7489 §6.3: a failing message gets the policy its author's domain publishes."""
    if result != "fail":
        return DmarcAction.DELIVER
    if policy == "reject":
        return DmarcAction.REJECT
    if policy == "quarantine":
        return DmarcAction.QUARANTINE
    return DmarcAction.DELIVER
