"""Delivery status notifications (RFC 3464): bounces and delay warnings to the envelope sender.

A DSN is a multipart/report (RFC 6522) with three parts: a human-readable
explanation, the machine-readable message/delivery-status, and the original
message's header as text/rfc822-headers (never its body: the sender has it,
and a bounce should not carry content to whoever forged the sender). It is
sent with the null reverse-path (RFC 5321 §4.5.5), so it can never bounce
back, and carries Auto-Submitted (RFC 3834 §5) so auto-responders ignore it.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from runbox_mta.smtp import headers

CRLF = "\r\n"
_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


class Action(Enum):
    FAILED = "failed"  # RFC 3464 §2.3.3: a bounce, no further attempts
    DELAYED = "delayed"  # a warning: still queued, will retry


@dataclass(frozen=True)
class RecipientReport:
    recipient: str
    diagnostic: str  # the remote reply ("550 5.1.1 User unknown") or our own reason
    remote_mta: str | None = None  # the host that answered, if any


@dataclass(frozen=True)
class Report:
    action: Action
    reporting_mta: str  # our host name
    arrival: datetime  # when the message entered the queue
    now: datetime
    recipients: tuple[RecipientReport, ...]
    retry_until: datetime | None = None  # for delay warnings: when we give up


def status_code(action: Action, diagnostic: str) -> str:
    """The enhanced status code (RFC 3463) of a report: the remote's, else a generic one."""
    match = _ENHANCED.match(diagnostic)
    if match and match.group(1)[0] in "45":
        # A delay is "4.x.x" even when the last word was 5xx (RFC 3464 §2.3.4).
        return match.group(1) if action is Action.FAILED else "4" + match.group(1)[1:]
    return "5.0.0" if action is Action.FAILED else "4.0.0"


def build(report: Report, sender: str, original: bytes) -> bytes:
    """The whole DSN message to `sender`, CRLF line endings."""
    boundary = f"=_{secrets.token_hex(12)}"
    subject = ("Undelivered Mail Returned to Sender" if report.action is Action.FAILED
               else "Delayed Mail (still being retried)")
    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(report.now)}",
        headers.message_id(report.reporting_mta).decode().rstrip(CRLF),
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        _part("text/plain; charset=utf-8", _explanation(report)),
        _part("message/delivery-status", _delivery_status(report)),  # RFC 3464 §2
        _part("text/rfc822-headers", _original_header(original)),  # RFC 6522 §4
    ]
    body = "".join(f"--{boundary}{CRLF}{part}" for part in parts) + f"--{boundary}--{CRLF}"
    return (CRLF.join(header) + CRLF + CRLF + body).encode("utf-8")


def _part(content_type: str, text: str) -> str:
    return f"Content-Type: {content_type}{CRLF}{CRLF}{text}"


def _explanation(report: Report) -> str:
    if report.action is Action.FAILED:
        lines = [f"This is the mail system at {report.reporting_mta}.", "",
                 "Your message could not be delivered to the recipients below; no further attempts will be made."]
    else:
        until = email.utils.format_datetime(report.retry_until) if report.retry_until else "later"
        lines = [f"This is the mail system at {report.reporting_mta}.", "",
                 "Your message has not been delivered yet to the recipients below.",
                 f"Delivery will be retried until {until}; you need not send it again."]
    lines.append("")
    lines += [f"<{entry.recipient}>: {entry.diagnostic}" for entry in report.recipients]
    return CRLF.join(lines) + CRLF


def _delivery_status(report: Report) -> str:
    # RFC 3464 §2.2: per-message fields, then one block per recipient (§2.3).
    blocks = [[f"Reporting-MTA: dns; {report.reporting_mta}",
               f"Arrival-Date: {email.utils.format_datetime(report.arrival)}"]]
    for entry in report.recipients:
        block = [f"Final-Recipient: rfc822; {entry.recipient}",
                 f"Action: {report.action.value}",
                 f"Status: {status_code(report.action, entry.diagnostic)}"]
        if entry.remote_mta:
            block.append(f"Remote-MTA: dns; {entry.remote_mta}")
        kind = "smtp" if _ENHANCED.match(entry.diagnostic) or entry.diagnostic[:3].isdigit() else "x-unix"
        block.append(f"Diagnostic-Code: {kind}; {_one_line(entry.diagnostic)}")
        block.append(f"Last-Attempt-Date: {email.utils.format_datetime(report.now)}")
        if report.retry_until is not None:
            block.append(f"Will-Retry-Until: {email.utils.format_datetime(report.retry_until)}")
        blocks.append(block)
    return "".join(CRLF.join(block) + CRLF + CRLF for block in blocks)


def _original_header(original: bytes) -> str:
    return original[:headers.header_end(original)].decode("utf-8", "replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())
