"""mbox files (RFC 4155), read and written as mboxrd.

Each message starts with a "From SENDER DATE" line, at the start of the file
or after an empty line, and ends with an empty line. mboxrd quotes every
body line matching ">*From " with one more ">", so quoting is reversible;
reading undoes it the same way, which also reads mboxo files (only a body
line that was ">From " to begin with comes back as "From ").

Flags travel in header fields, as mutt and Dovecot write them: Status (R
seen, O old), X-Status (A answered, F flagged, T draft, D deleted) and
X-Keywords (keywords, space separated). Dovecot's own X-UID, X-IMAP and
X-IMAPbase fields are dropped on import, and the pseudo message carrying
X-IMAP (UW-IMAP's "DON'T DELETE THIS MESSAGE") is skipped.

The internal date is the "From " line's date (asctime, UTC unless a numeric
zone follows), else the Date field, else the file's mtime. Export writes the
UTC asctime form, so internal dates round-trip to the second.

The stdlib `mailbox.mbox` is not used: it neither undoes mboxrd quoting on
reading nor writes it (its ">From " quoting is mboxo, ambiguous).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

from runbox_mta.smtp.headers import field_value, fields
from runbox_mta.transfer.messages import SourceMessage, canonical, is_keyword, to_lf

FROM_LINE = b"From "
NO_SENDER = "MAILER-DAEMON"
# Status/X-Status letters as mutt and Dovecot use them; "O" (old, not recent) carries nothing here.
STATUS_FLAGS = {"R": "\\Seen"}
X_STATUS_FLAGS = {"A": "\\Answered", "F": "\\Flagged", "T": "\\Draft", "D": "\\Deleted"}
# Fields that hold mbox bookkeeping rather than message content (Dovecot hides the same ones).
BOOKKEEPING_FIELDS = frozenset({"status", "x-status", "x-keywords", "x-uid", "x-imap", "x-imapbase"})

_QUOTED_FROM = re.compile(rb"^>+From ")
_TO_QUOTE = re.compile(rb"^(>*From )", re.MULTILINE)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ASCTIME = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) +(" + b"|".join(name.encode() for name in _MONTHS) + rb") +(\d{1,2})"
    rb" +(\d{1,2}):(\d{2})(?::(\d{2}))?(?: +(?:[A-Z]{3,5}|([+-]\d{4})))? +(\d{4})(?: +([+-]\d{4}))?")


def is_mbox(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(len(FROM_LINE)) == FROM_LINE


def read_mbox(path: Path) -> Iterator[SourceMessage]:
    fallback_date = datetime.fromtimestamp(int(path.stat().st_mtime), UTC)
    with open(path, "rb") as file:
        for from_line, lines in _entries(file):
            message = _message(from_line, lines, fallback_date)
            if message is not None:
                yield message


def mbox_entry(data: bytes, flags: frozenset[str], internal_date: datetime) -> bytes:
    """One message as an mboxrd entry: From line, flag fields, quoted message, empty line."""
    when = time.asctime(internal_date.astimezone(UTC).timetuple())
    head = f"From {envelope_sender(data)} {when}\n" + flag_fields(flags)
    body = to_lf(data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return head.encode("utf-8") + _TO_QUOTE.sub(rb">\1", body) + b"\n"


def flag_fields(flags: frozenset[str]) -> str:
    status = "R" if "\\Seen" in flags else ""
    x_status = "".join(letter for letter, flag in X_STATUS_FLAGS.items() if flag in flags)
    keywords = " ".join(sorted(flag for flag in flags if not flag.startswith("\\")))
    text = f"Status: {status}O\n"  # every exported message is "old": seen by some client before
    if x_status:
        text += f"X-Status: {x_status}\n"
    if keywords:
        text += f"X-Keywords: {keywords}\n"
    return text


def envelope_sender(data: bytes) -> str:
    """The Return-Path address delivery recorded, else MAILER-DAEMON (also for the null path)."""
    address = (field_value(data, "Return-Path") or "").strip().strip("<>").strip()
    return address if address and not any(char.isspace() for char in address) else NO_SENDER


def _is_empty(line: bytes) -> bool:
    return line in (b"\n", b"\r\n")


def _entries(file: BinaryIO) -> Iterator[tuple[bytes, list[bytes]]]:
    """Each "From " line with the lines up to the next one that starts an entry: at the start
    of the file or after an empty line (so an mboxo body line "From ..." mid-paragraph stays)."""
    from_line: bytes | None = None
    lines: list[bytes] = []
    for line in file:
        if line.startswith(FROM_LINE) and (from_line is None or not lines or _is_empty(lines[-1])):
            if from_line is not None:
                yield from_line, lines
            from_line, lines = line, []
        elif from_line is not None:
            lines.append(line)
    if from_line is not None:
        yield from_line, lines


def _message(from_line: bytes, lines: list[bytes], fallback_date: datetime) -> SourceMessage | None:
    if lines and _is_empty(lines[-1]):
        lines = lines[:-1]  # the empty line that ends every entry
    data = canonical(b"".join(line[1:] if _QUOTED_FROM.match(line) else line for line in lines))
    bookkeeping = [(name, start, end) for name, start, end in fields(data) if name in BOOKKEEPING_FIELDS]
    if any(name == "x-imap" for name, _, _ in bookkeeping):
        return None  # the folder's pseudo message, not mail
    values: dict[str, str] = {}
    for name, start, end in bookkeeping:
        values.setdefault(name, data[start:end].split(b":", 1)[1].decode("utf-8", "replace").strip())
    for _, start, end in reversed(bookkeeping):
        data = data[:start] + data[end:]
    when = _from_line_date(from_line) or _header_date(data) or fallback_date
    return SourceMessage(data, _flags(values), when)


def _flags(values: dict[str, str]) -> frozenset[str]:
    flags = {flag for letter, flag in STATUS_FLAGS.items() if letter in values.get("status", "")}
    flags |= {flag for letter, flag in X_STATUS_FLAGS.items() if letter in values.get("x-status", "")}
    flags |= {word for word in re.split(r"[\s,]+", values.get("x-keywords", "")) if is_keyword(word)}
    return frozenset(flags)


def _from_line_date(line: bytes) -> datetime | None:
    match = _ASCTIME.search(line, len(FROM_LINE))
    if match is None:
        return None
    month, day, hour, minute, second, zone, year, zone_after = match.groups()
    offset = zone or zone_after
    tz = UTC
    if offset:
        minutes = int(offset[1:3]) * 60 + int(offset[3:5])
        tz = timezone(timedelta(minutes=-minutes if offset.startswith(b"-") else minutes))
    try:
        return datetime(int(year), _MONTHS.index(month.decode()) + 1, int(day), int(hour), int(minute),
                        int(second or 0), tzinfo=tz)
    except ValueError:
        return None


def _header_date(data: bytes) -> datetime | None:
    value = field_value(data, "Date")
    try:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None
    return parsed.replace(microsecond=0)
