"""The IMAP command receiver: bytes in, framed commands out (RFC 9051 §2.2, §4.3).

`Receiver` is a sans-I/O state machine, one per connection. The glue feeds
it whatever the socket produced and then calls `next_event()` until it
answers `NeedMore`. Events:

- `RawCommand(tag, name, parts)`: a complete command. `parts` alternates
  line text and `Literal`s (text, literal, text, ..., text); the literal
  markers are gone, so `commands.parse_command` sees where each literal
  sat without re-reading the stream.
- `NeedLiteral(size)`: a synchronising literal {n} was announced; the glue
  sends "+ Ready for literal data" and keeps feeding (RFC 9051 §7.5).
  Non-synchronising literals {n+} (RFC 7888) produce no event.
- `IdleDone`, `SaslResponse(line)`: the one line after `expect_done()`
  (IDLE, RFC 2177) or `expect_sasl_response()` (AUTHENTICATE, RFC 9051
  §6.2.2): those lines are not tagged commands.
- `ProtocolError(tag, message, close, status, code)`: the stream broke the
  framing rules or a limit. With `close` the glue replies and disconnects.

Invariants:

- Events depend only on the bytes, never on how they were split into
  `feed()` calls. `next_event()` never raises; misuse by the glue (switching
  modes in the middle of a command) raises RuntimeError.
- Work is linear in the input: a line is searched for its end once (from
  where the last search stopped) and checked once when complete; literal
  bytes are copied once. `bytes_examined` counts that work for tests.
- Limits are enforced here: command text excluding literals
  (`max_line`, counted with line ends), each literal (`max_literal`), all
  literals of one command (`max_command_literals`, bounding the memory one
  command can hold), and the number of literals (`max_literals`).

Decisions (see the tests of the same names):

- A line ends at LF; the CR before it is optional, so bare-LF clients
  (netcat, scripts) work, as with Dovecot. A CR anywhere else is an error.
- Empty lines between commands are ignored.
- After an error the receiver resynchronises at the end of the command:
  the rest of an over-long line is discarded, and a non-synchronising
  literal announced at the end of a rejected line is read and discarded
  (its length is known, so its bytes are never taken for commands), as
  Stalwart does.
- A rejected line that announces a *synchronising* literal closes the
  connection (`close=True`). The client must wait for "+" (RFC 9051 §4.3),
  and one that does would simply send its next command; but a client that
  sends the literal anyway would have its data - possibly a message
  written by a stranger - executed as IMAP commands, and no byte-exact
  rule can tell the two apart. This covers an oversized APPEND: the reply
  is NO [TOOBIG] without a continuation, then the connection closes
  (Dovecot likewise disconnects on a too-large literal).
- Markers are recognised at the very end of a line, outside quoted
  strings, as `{n}`, `{n+}`, `~{n}` or `~{n+}` with at most 20 digits.
  When a line is rejected, its end is taken at face value.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from runbox_mta.config import LimitsConfig

# Enough for MULTIAPPEND of a few hundred messages or a SEARCH with many
# literal strings; the literal bytes are bounded separately.
MAX_LITERALS_PER_COMMAND = 256
# RFC 7888 §5: with LITERAL- only non-synchronising literals up to 4096 bytes.
LITERAL_MINUS_MAX = 4096
# The longest marker "~{" + 20 digits + "+}" is 24 bytes; a rejected line keeps
# this much of its end so its marker can be honoured after the rest is dropped.
_TAIL = 32
# Consumed bytes are dropped from the buffer once they pass this size and
# half the buffer, so compaction stays amortised linear.
_COMPACT_AFTER = 64 * 1024


@dataclass(frozen=True)
class Literal:
    data: bytes = field(repr=False)
    binary: bool = False  # literal8 ~{n} (RFC 3516 §4.3): may contain NUL

    def __repr__(self) -> str:  # literals carry passwords and mail
        return f"Literal(<{len(self.data)} bytes>{', binary' if self.binary else ''})"


@dataclass(frozen=True)
class RawCommand:
    tag: str
    name: str  # upper-case, e.g. "UID" or "FETCH"
    parts: tuple[bytes | Literal, ...] = (b"",)  # text after the name, literal, text, ...

    def __repr__(self) -> str:  # arguments carry passwords
        size = sum(len(part.data if isinstance(part, Literal) else part) for part in self.parts)
        return f"RawCommand(tag={self.tag!r}, name={self.name!r}, <{size} bytes of arguments>)"


@dataclass(frozen=True)
class NeedMore:
    pass


@dataclass(frozen=True)
class NeedLiteral:
    size: int


@dataclass(frozen=True)
class IdleDone:
    pass


@dataclass(frozen=True)
class SaslResponse:
    line: bytes  # without the line end; base64, "" or "*" when well-formed

    def __repr__(self) -> str:
        return f"SaslResponse(<{len(self.line)} bytes>)"


@dataclass(frozen=True)
class ProtocolError:
    tag: str | None  # None: reply untagged (RFC 9051 §7.1.3)
    message: str
    close: bool = False
    status: str = "BAD"  # or "NO"
    code: str | None = None  # response code, e.g. "TOOBIG"


Event = RawCommand | NeedMore | NeedLiteral | IdleDone | SaslResponse | ProtocolError

NEED_MORE = NeedMore()


class _State(enum.Enum):
    LINE = enum.auto()
    LITERAL = enum.auto()
    SKIP_LINE = enum.auto()  # discarding the rest of a rejected line
    SKIP_LITERAL = enum.auto()  # discarding a rejected command's literal
    CLOSED = enum.auto()


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    IDLE = enum.auto()
    SASL = enum.auto()


@dataclass(frozen=True)
class _Marker:
    start: int  # offset of the marker in its line
    size: int
    sync: bool
    binary: bool


@dataclass(frozen=True)
class _Rejection:
    tag: str | None
    message: str
    status: str = "BAD"
    code: str | None = None


def _char_class(chars: bytes) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(chars)) + b"]"


_PRINTABLE = set(range(0x21, 0x7F))
# RFC 9051 §9: ATOM-CHAR excludes atom-specials; a tag is ASTRING-CHARs but "+".
ATOM_CHARS = bytes(_PRINTABLE - set(b'(){%*"\\]'))
TAG_CHARS = bytes((set(ATOM_CHARS) | {ord("]")}) - {ord("+")})
_TAG = re.compile(_char_class(TAG_CHARS) + b"+")
_NAME = re.compile(_char_class(ATOM_CHARS) + b"+")
# A command line outside literals: printable ASCII and complete quoted
# strings (RFC 9051 §9 quoted: no CR, LF or NUL; only \" and \\ escaped).
# The alternatives start with different bytes, so matching is linear.
_LEXICAL = re.compile(rb'(?:[\x20\x21\x23-\x7e]|"(?:[^"\\\r\n\x00]|\\["\\])*")*')
_QUOTED_BODY = re.compile(rb'(?:[^"\\\r\n\x00]|\\["\\])*')
_MARKER = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")


class Receiver:
    """Incremental IMAP command framing for one connection; see the module doc."""

    def __init__(
        self,
        max_line: int = LimitsConfig.imap_command_length,
        max_literal: int = LimitsConfig.imap_literal_size,
        *,
        max_command_literals: int | None = None,
        max_literals: int = MAX_LITERALS_PER_COMMAND,
        literal_minus: bool = False,
    ) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        # By default one command holds at most one maximal literal in memory;
        # a MULTIAPPEND of several messages must fit in it together.
        self.max_command_literals = max_literal if max_command_literals is None else max_command_literals
        self.max_literals = max_literals
        self.literal_minus = literal_minus  # LITERAL- (RFC 7888 §5) instead of LITERAL+
        self.bytes_examined = 0
        self._buf = bytearray()
        self._pos = 0  # first unconsumed byte
        self._scan = 0  # bytes before this (and after _pos) hold no LF
        self._state = _State.LINE
        self._mode = _Mode.COMMAND
        self._remaining = 0
        self._binary = False
        self._chunks: list[bytes] = []
        self._tail = b""
        self._pending: _Rejection | None = None
        # The command being received; reset by _new_command().
        self._tag: str | None = None
        self._name: str | None = None
        self._parts: list[bytes | Literal] = []
        self._line_total = 0
        self._literal_total = 0
        self._literal_count = 0

    @classmethod
    def from_limits(cls, limits: LimitsConfig, *, literal_minus: bool = False) -> Receiver:
        return cls(limits.imap_command_length, limits.imap_literal_size, literal_minus=literal_minus)

    @property
    def closed(self) -> bool:
        """A fatal ProtocolError was returned; further input is ignored."""
        return self._state is _State.CLOSED

    def feed(self, data: bytes) -> None:
        if self._state is not _State.CLOSED:
            self._buf += data

    def expect_done(self) -> None:
        """The next line ends IDLE: it yields IdleDone, or an error unless it is DONE."""
        self._switch(_Mode.IDLE)

    def expect_sasl_response(self) -> None:
        """The next line answers an AUTHENTICATE challenge: it yields SaslResponse."""
        self._switch(_Mode.SASL)

    def take_pending(self) -> bytes:
        """Remove and return the unprocessed input.

        After STARTTLS the glue discards it (pipelined plaintext must not
        run under TLS); after COMPRESS it is already compressed data.
        """
        self._require_boundary()
        pending = bytes(self._buf[self._pos:])
        self._buf.clear()
        self._pos = self._scan = 0
        return pending

    def next_event(self) -> Event:
        self._compact()
        while True:
            if self._state in (_State.LITERAL, _State.SKIP_LITERAL):
                if not self._take_literal_bytes():
                    return NEED_MORE
                continue
            if self._state is _State.CLOSED:
                return NEED_MORE
            end = self._find_line_end()
            if end < 0:
                self._wait_for_line_end()
                return NEED_MORE
            event = self._end_skipped_line(end) if self._state is _State.SKIP_LINE else self._line(end)
            if event is not None:
                return event

    # -- reading --------------------------------------------------------

    def _find_line_end(self) -> int:
        start = max(self._scan, self._pos)
        end = self._buf.find(b"\n", start)
        self._scan = len(self._buf) if end < 0 else end + 1
        self.bytes_examined += self._scan - start
        return end

    def _wait_for_line_end(self) -> None:
        if self._state is _State.SKIP_LINE:
            self._discard_into_tail(len(self._buf))
        elif self._line_total + len(self._buf) - self._pos + 1 > self.max_line:
            # The line will exceed the limit whatever follows: stop buffering,
            # keep only its start (for the tag) and later its end (for a marker).
            prefix = bytes(self._buf[self._pos:self._pos + self.max_line])
            self._pending = self._too_long(prefix)
            self._state = _State.SKIP_LINE
            self._tail = b""
            self._discard_into_tail(len(self._buf))

    def _discard_into_tail(self, end: int) -> None:
        self._tail = (self._tail + self._buf[max(self._pos, end - _TAIL):end])[-_TAIL:]
        self._pos = end

    def _take_literal_bytes(self) -> bool:
        """Move available literal bytes out of the buffer; True when the literal is complete."""
        count = min(self._remaining, len(self._buf) - self._pos)
        if count and self._state is _State.LITERAL:
            with memoryview(self._buf) as view:
                self._chunks.append(bytes(view[self._pos:self._pos + count]))
        self._pos += count
        self._remaining -= count
        self.bytes_examined += count
        if self._remaining:
            return False
        if self._state is _State.LITERAL:
            self._parts.append(Literal(b"".join(self._chunks), self._binary))
            self._chunks = []
            self._state = _State.LINE
        else:
            self._state = _State.SKIP_LINE
            self._tail = b""
        return True

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = self._scan = 0
        elif self._pos > _COMPACT_AFTER and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self.bytes_examined += len(self._buf)
            self._scan -= self._pos
            self._pos = 0

    # -- complete lines -------------------------------------------------

    def _line(self, end: int) -> Event | None:
        length = end + 1 - self._pos
        body = bytes(self._buf[self._pos:end])
        self._pos = end + 1
        if body.endswith(b"\r"):
            body = body[:-1]
        self.bytes_examined += len(body)
        if self._mode is not _Mode.COMMAND:
            return self._mode_line(body, length)
        first = self._tag is None
        if first and not body:
            return None
        if self._line_total + length > self.max_line:
            return self._resolve(self._too_long(body[:self.max_line]), body)
        self._line_total += length
        start = self._command_start(body) if first else _lexical_check(body, 0, self._tag)
        if isinstance(start, _Rejection):
            return self._resolve(start, body)
        marker = _marker(body)
        if marker is None:
            self._parts.append(body[start:])
            return self._finish()
        rejection = self._check_literal(marker)
        if rejection:
            return self._resolve(rejection, body)
        self._parts.append(body[start:marker.start])
        self._literal_total += marker.size
        self._literal_count += 1
        self._remaining, self._binary = marker.size, marker.binary
        self._state = _State.LITERAL
        return NeedLiteral(marker.size) if marker.sync else None

    def _mode_line(self, body: bytes, length: int) -> Event:
        mode, self._mode = self._mode, _Mode.COMMAND
        if length > self.max_line:
            return ProtocolError(None, self._too_long_message())
        if mode is _Mode.SASL:
            return SaslResponse(body)
        if body.upper() == b"DONE":  # RFC 2177 §3
            return IdleDone()
        return ProtocolError(None, 'expected "DONE" to end IDLE')

    def _command_start(self, body: bytes) -> int | _Rejection:
        """Check "tag SP name ..." (RFC 9051 §2.2.1); return where the arguments start."""
        tag = _TAG.match(body)
        if not tag:
            if not body.strip(b" "):
                return _Rejection(None, "missing tag")
            if body[0] == 0x20:
                return _Rejection(None, "line starts with a space instead of a tag")
            return _Rejection(None, f"invalid {_show(body[0])} in tag")
        after = tag.end()
        if after < len(body) and body[after] != 0x20:
            return _Rejection(None, f"invalid {_show(body[after])} in tag")
        self._tag = tag.group().decode("ascii")
        checked = _lexical_check(body, after, self._tag)
        if isinstance(checked, _Rejection):
            return checked
        name = _NAME.match(body, after + 1)
        if after == len(body) or not name:
            return _Rejection(self._tag, "missing command name")
        if name.end() < len(body) and body[name.end()] != 0x20:
            return _Rejection(self._tag, f"invalid {_show(body[name.end()])} in command name")
        self._name = name.group().decode("ascii").upper()
        return name.end()

    def _check_literal(self, marker: _Marker) -> _Rejection | None:
        if self._literal_count == self.max_literals:
            return _Rejection(self._tag, f"more than {self.max_literals} literals in one command")
        if marker.size > self.max_literal:
            return _Rejection(
                self._tag, f"literal of {marker.size} bytes exceeds the limit of {self.max_literal}", "NO", "TOOBIG"
            )
        if self.literal_minus and not marker.sync and marker.size > LITERAL_MINUS_MAX:
            # RFC 7888 §5: tagged BAD; the data is read and discarded.
            return _Rejection(
                self._tag, f"non-synchronizing literals are limited to {LITERAL_MINUS_MAX} bytes", code="TOOBIG"
            )
        if self._literal_total + marker.size > self.max_command_literals:
            return _Rejection(
                self._tag, f"literals of one command exceed {self.max_command_literals} bytes", "NO", "TOOBIG"
            )
        return None

    def _too_long(self, prefix: bytes) -> _Rejection:
        """Reject an over-long line, tagged if its first `max_line` bytes hold a tag.

        The prefix is cut at the limit whether the line arrived whole or in
        pieces, so the reply does not depend on the chunking.
        """
        tag = self._tag
        if tag is None and self._mode is _Mode.COMMAND:
            match = _TAG.match(prefix)
            if match and prefix[match.end():match.end() + 1] == b" ":
                tag = match.group().decode("ascii")
        return _Rejection(tag, self._too_long_message())

    def _too_long_message(self) -> str:
        return f"command line too long (limit {self.max_line} bytes without literals)"

    def _finish(self) -> RawCommand:
        assert self._tag is not None and self._name is not None
        command = RawCommand(self._tag, self._name, tuple(self._parts))
        self._new_command()
        return command

    # -- errors and resynchronisation -----------------------------------

    def _resolve(self, rejection: _Rejection, body: bytes) -> ProtocolError:
        """Reject the current command, given the full or trailing text of its last line."""
        marker = _marker(body)
        self._new_command()
        close = False
        if marker is None:
            self._state = _State.LINE
        elif marker.sync:
            close = True
            self._state = _State.CLOSED
            self._buf.clear()
            self._pos = self._scan = 0
        else:
            self._state = _State.SKIP_LITERAL
            self._remaining = marker.size
        return ProtocolError(rejection.tag, rejection.message, close, rejection.status, rejection.code)

    def _end_skipped_line(self, end: int) -> Event | None:
        self._discard_into_tail(end)
        self._pos = end + 1
        tail = self._tail[:-1] if self._tail.endswith(b"\r") else self._tail
        mode, self._mode = self._mode, _Mode.COMMAND
        if self._pending is not None:
            rejection, self._pending = self._pending, None
            if mode is not _Mode.COMMAND:
                self._state = _State.LINE
                return ProtocolError(rejection.tag, rejection.message)
            return self._resolve(rejection, tail)
        # The rest of an already rejected command, after a discarded literal.
        marker = _marker(tail)
        if marker is None:
            self._state = _State.LINE
            return None
        if not marker.sync:
            self._state = _State.SKIP_LITERAL
            self._remaining = marker.size
            return None
        self._state = _State.CLOSED
        return ProtocolError(None, "synchronizing literal in a rejected command", close=True)

    def _new_command(self) -> None:
        self._tag = None
        self._name = None
        self._parts = []
        self._line_total = 0
        self._literal_total = 0
        self._literal_count = 0
        self._mode = _Mode.COMMAND

    def _switch(self, mode: _Mode) -> None:
        self._require_boundary()
        self._mode = mode

    def _require_boundary(self) -> None:
        if self._state is not _State.LINE or self._tag is not None:
            raise RuntimeError("only allowed between commands")


def _marker(body: bytes) -> _Marker | None:
    """The literal marker ending `body`, looking only at its last _TAIL bytes."""
    match = _MARKER.search(body, max(0, len(body) - _TAIL))
    if not match:
        return None
    return _Marker(match.start(), int(match.group(2)), not match.group(3), bool(match.group(1)))


def _lexical_check(body: bytes, start: int, tag: str | None) -> int | _Rejection:
    """`start` if the line is printable ASCII outside complete quoted strings."""
    problem = _lexical_problem(body, start)
    return _Rejection(tag, problem) if problem else start


def _lexical_problem(body: bytes, start: int) -> str | None:
    match = _LEXICAL.match(body, start)  # never None: the pattern matches ""
    stop = match.end() if match else start
    if stop == len(body):
        return None
    byte = body[stop]
    if byte == ord('"'):
        inner_match = _QUOTED_BODY.match(body, stop + 1)
        inner = inner_match.end() if inner_match else stop + 1
        if inner == len(body):
            return "unterminated quoted string"
        byte = body[inner]
        if byte == ord("\\"):
            return 'invalid escape in quoted string (only \\" and \\\\ are allowed)'
        return f"{_show(byte)} inside a quoted string"
    if byte >= 0x80:
        return "8-bit byte outside a quoted string or literal"
    return f"{_show(byte)} in command line"


def _show(byte: int) -> str:
    names = {0x00: "NUL byte", 0x0D: "bare CR"}
    if byte in names:
        return names[byte]
    if 0x21 <= byte <= 0x7E:
        return f"character {chr(byte)!r}"
    return f"byte 0x{byte:02X}"
