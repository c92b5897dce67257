"""The POP3 line receiver: bytes in, lines out, with the length limit enforced here.

`LineReceiver` is sans-I/O: the glue feeds whatever the socket produced and
calls `next_event(max_line)` until it answers `NeedMore`. Events:

- `Line(text)`: one line without its line end.
- `LineTooLong()`: a line longer than `max_line` octets (its line end
  included). It is reported as soon as that is certain (the client may never
  finish it) and the rest of it, up to its line end, is discarded unseen.

Invariants: the events depend only on the bytes, never on how they were split
into `feed` calls; `next_event` never raises; each byte is searched for a line
end once, so the work is linear in the input; the buffer holds at most what one
`feed` brought plus `max_line`.

A line ends at LF and the CR before it is optional, so bare-LF clients
(netcat, scripts) work, as with Dovecot; a CR elsewhere is part of the line
and the session rejects it as a control character.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 2449 §4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
# RFC 5034 §4 limits the AUTH command line, not the responses to a challenge:
# a PLAIN response carrying a 320-octet login (RFC 3696 errata 1690) and a
# 1 KiB passphrase is under 2 KiB of base64; twice that leaves room.
MAX_SASL_LINE = 4096
# Consumed bytes are dropped once they pass this size and half the buffer,
# so compaction stays amortised linear.
_COMPACT_AFTER = 64 * 1024


@dataclass(frozen=True)
class Line:
    text: bytes

    def __repr__(self) -> str:  # PASS and AUTH lines carry passwords
        return f"Line(<{len(self.text)} bytes>)"


@dataclass(frozen=True)
class LineTooLong:
    pass


@dataclass(frozen=True)
class NeedMore:
    pass


Event = Line | LineTooLong | NeedMore

NEED_MORE = NeedMore()
LINE_TOO_LONG = LineTooLong()


class LineReceiver:
    """Incremental line framing for one connection; see the module doc."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the current line begins in _buffer
        self._scanned = 0  # bytes of the current line already searched for LF
        self._skipping = False  # discarding the rest of an over-long line

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self, max_line: int) -> Event:
        while True:
            newline = self._buffer.find(b"\n", self._start + self._scanned)
            if newline < 0:
                return self._incomplete(max_line)
            line = bytes(self._buffer[self._start:newline + 1])
            self._consume(newline + 1)
            if self._skipping:
                self._skipping = False
                continue  # the end of a line already reported as too long
            if len(line) > max_line:
                return LINE_TOO_LONG
            return Line(line[:-2] if line.endswith(b"\r\n") else line[:-1])

    def _incomplete(self, max_line: int) -> Event:
        pending = len(self._buffer) - self._start
        if self._skipping:
            self._consume(len(self._buffer))  # nobody will read these bytes: do not keep them
            return NEED_MORE
        # With its line end still to come, a line of max_line octets is too long already.
        if pending < max_line:
            self._scanned = pending
            return NEED_MORE
        self._skipping = True
        self._consume(len(self._buffer))
        return LINE_TOO_LONG

    def _consume(self, end: int) -> None:
        self._start, self._scanned = end, 0
        if self._start >= len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start > _COMPACT_AFTER and self._start * 2 > len(self._buffer):
            del self._buffer[:self._start]
            self._start = 0
