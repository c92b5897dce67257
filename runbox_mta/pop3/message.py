"""A stored message as a POP3 client receives it, and its unique-id listing.

RFC 1939 §3: a multi-line response is CRLF-terminated lines, each line that
starts with "." gets another "." in front, and ".CRLF" ends it. Stored mail
is normally CRLF already; a bare LF (IMAP APPEND, imports) is sent as CRLF,
and a last line without a line end gets one, so the client always receives
well-formed lines. `transmitted_size` is the length of `transmitted` without
building it, so STAT and LIST can announce exactly what RETR will send.

UIDL: Dovecot's default `pop3_uidl_format = %08Xu%08Xv` (UID, then
UIDVALIDITY, 8 upper-case hex digits each). The pair is the identity IMAP
uses, so a message has the same identity on both protocols and keeps its
unique-id for its whole life (UIDs are never reused within a UIDVALIDITY);
and a client that moves from a Dovecot server whose mail was imported with
UIDs and UIDVALIDITY intact does not download everything again.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"
# RFC 1939 §3: "."-initial lines of a multi-line response are byte-stuffed.
_LINE_START_DOT = re.compile(rb"^\.", re.MULTILINE)
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 5322 §2.1: the header ends at the first empty line (CRLF or bare LF).
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")


def transmitted(data: bytes) -> bytes:
    """The octets between a RETR "+OK" line and the terminating ".CRLF"."""
    if not data:
        return b""
    text = _LINE_START_DOT.sub(b"..", _BARE_LF.sub(CRLF, data))
    return text if text.endswith(CRLF) else text + CRLF


def transmitted_size(data: bytes) -> int:
    """len(transmitted(data)), counted without copying the message."""
    if not data:
        return 0
    bare_lfs = data.count(b"\n") - data.count(CRLF)
    stuffed_dots = data.startswith(b".") + data.count(b"\n.")
    size = len(data) + bare_lfs + stuffed_dots
    return size if data.endswith(b"\n") else size + len(CRLF)


def top(data: bytes, body_lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then `body_lines` body lines, transmitted."""
    match = _HEADER_END.search(data)
    end = match.end() if match else len(data)
    for _ in range(body_lines):
        newline = data.find(b"\n", end)
        if newline < 0:
            end = len(data)
            break
        end = newline + 1
    return transmitted(data[:end])


def uidl(uid: int, uidvalidity: int) -> str:
    """The unique-id of a message (RFC 1939 §7: 1 to 70 characters 0x21-0x7E)."""
    return f"{uid:08X}{uidvalidity:08X}"
