"""IMAP command framing: every table entry gives the same events fed whole,
byte by byte and split at every offset (the Stalwart receiver.rs / h11
test_io style). Limits are small here so the tables stay readable."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbox_mta.config import LimitsConfig
from runbox_mta.imap.commands import CommandError, parse_command
from runbox_mta.imap.wire import (
    NEED_MORE,
    Event,
    IdleDone,
    Literal,
    NeedLiteral,
    ProtocolError,
    RawCommand,
    Receiver,
    SaslResponse,
)

LIMITS = {"max_line": 64, "max_literal": 40}
TOO_LONG = "command line too long (limit 64 bytes without literals)"


def receiver(**overrides: object) -> Receiver:
    return Receiver(**{**LIMITS, **overrides})  # type: ignore[arg-type]


def drive(rx: Receiver, chunks: list[bytes]) -> list[Event]:
    """Feed chunks and collect events like the glue would, switching modes
    after IDLE and after an AUTHENTICATE without initial response."""
    events: list[Event] = []
    for chunk in chunks:
        rx.feed(chunk)
        while (event := rx.next_event()) != NEED_MORE:
            events.append(event)
            if isinstance(event, RawCommand) and event.name == "IDLE":
                rx.expect_done()
            if isinstance(event, RawCommand) and event.name == "AUTHENTICATE" and event.parts == (b" PLAIN",):
                rx.expect_sasl_response()
    return events


def splits(data: bytes) -> list[list[bytes]]:
    """The input whole, byte by byte, and cut in two at every offset."""
    ways = [[data], [data[i:i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


def cmd(tag: str, name: str, *parts: bytes | Literal) -> RawCommand:
    return RawCommand(tag, name, parts or (b"",))


def error(tag: str | None, message: str, **kwargs: object) -> ProtocolError:
    return ProtocolError(tag, message, **kwargs)  # type: ignore[arg-type]


LOGOUT_LINE = b"c LOGOUT\r\n"  # literal data that must never run as a command

WIRE_TABLE: list[tuple[str, bytes, list[Event], dict]] = [
    ("simple command", b"a NOOP\r\n", [cmd("a", "NOOP")], {}),
    ("name is upper-cased", b"a1 noop\r\n", [cmd("a1", "NOOP")], {}),
    ("tag may contain ]", b"A]1 NOOP\r\n", [cmd("A]1", "NOOP")], {}),
    ("pipelined commands", b"a NOOP\r\nb CAPABILITY\r\n", [cmd("a", "NOOP"), cmd("b", "CAPABILITY")], {}),
    ("arguments keep their leading space", b"a SELECT INBOX\r\n", [cmd("a", "SELECT", b" INBOX")], {}),
    (
        "quoted strings with escapes and braces are text",
        b'a LOGIN "al\\"ice" "p\\\\w{5}"\r\n',
        [cmd("a", "LOGIN", b' "al\\"ice" "p\\\\w{5}"')],
        {},
    ),
    ("8-bit bytes inside quotes pass", b'a SELECT "caf\xc3\xa9"\r\n', [cmd("a", "SELECT", b' "caf\xc3\xa9"')], {}),
    (
        "synchronising literals ask for a continuation each",
        b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\n",
        [NeedLiteral(5), NeedLiteral(6),
         cmd("a", "LOGIN", b" ", Literal(b"alice"), b" ", Literal(b"secret"), b"")],
        {},
    ),
    (
        "non-synchronising literals need no continuation",
        b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n",
        [cmd("a", "LOGIN", b" ", Literal(b"alice"), b" ", Literal(b"secret"), b"")],
        {},
    ),
    (
        "literal8 may hold NUL and CRLF",
        b"a APPEND x ~{4}\r\n\x00\r\nx\r\n",
        [NeedLiteral(4), cmd("a", "APPEND", b" x ", Literal(b"\x00\r\nx", binary=True), b"")],
        {},
    ),
    (
        "literal data that looks like a command is data",
        b"a APPEND x {10}\r\n" + LOGOUT_LINE + b"\r\n",
        [NeedLiteral(10), cmd("a", "APPEND", b" x ", Literal(LOGOUT_LINE), b"")],
        {},
    ),
    (
        "MULTIAPPEND: text continues after each literal",
        b"a APPEND x {2+}\r\nm1 (\\Seen) {2+}\r\nm2\r\n",
        [cmd("a", "APPEND", b" x ", Literal(b"m1"), b" (\\Seen) ", Literal(b"m2"), b"")],
        {},
    ),
    (
        "zero-length literals",
        b"a LOGIN {0}\r\n {0+}\r\n\r\n",
        [NeedLiteral(0), cmd("a", "LOGIN", b" ", Literal(b""), b" ", Literal(b""), b"")],
        {},
    ),
    ("bare LF ends a line", b"a NOOP\nb LOGIN {1}\nx y\n",
     [cmd("a", "NOOP"), NeedLiteral(1), cmd("b", "LOGIN", b" ", Literal(b"x"), b" y")], {}),
    ("empty lines are ignored", b"\r\n\na NOOP\r\n\r\n", [cmd("a", "NOOP")], {}),
    (
        "IDLE ends with DONE in any case",
        b"a IDLE\r\ndone\r\nb NOOP\r\n",
        [cmd("a", "IDLE"), IdleDone(), cmd("b", "NOOP")],
        {},
    ),
    (
        "IDLE answered by anything but DONE",
        b"a IDLE\r\nb NOOP\r\nc NOOP\r\n",
        [cmd("a", "IDLE"), error(None, 'expected "DONE" to end IDLE'), cmd("c", "NOOP")],
        {},
    ),
    (
        "AUTHENTICATE continuation lines are not commands",
        b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nb AUTHENTICATE PLAIN\r\n*\r\nc NOOP\r\n",
        [cmd("a", "AUTHENTICATE", b" PLAIN"), SaslResponse(b"AGFsaWNlAHNlY3JldA=="),
         cmd("b", "AUTHENTICATE", b" PLAIN"), SaslResponse(b"*"), cmd("c", "NOOP")],
        {},
    ),
    ("line starting with a space", b" NOOP\r\na NOOP\r\n",
     [error(None, "line starts with a space instead of a tag"), cmd("a", "NOOP")], {}),
    ("blank line of spaces", b"   \r\n", [error(None, "missing tag")], {}),
    ("missing command name", b"a\r\nb \r\n",
     [error("a", "missing command name"), error("b", "missing command name")], {}),
    ("NUL in an atom", b"a LOGIN al\x00ice x\r\nb NOOP\r\n",
     [error("a", "NUL byte in command line"), cmd("b", "NOOP")], {}),
    ("8-bit byte in an atom", b"a SELECT caf\xc3\xa9\r\n",
     [error("a", "8-bit byte outside a quoted string or literal")], {}),
    ("bare CR inside a line", b"a NOOP\rb NOOP\r\n", [error("a", "bare CR in command line")], {}),
    ("tab is a control character", b"a NOOP\t\r\n", [error("a", "byte 0x09 in command line")], {}),
    ("unterminated quoted string", b'a LOGIN "abc\r\n', [error("a", "unterminated quoted string")], {}),
    ("NUL inside a quoted string", b'a LOGIN "a\x00" x\r\n', [error("a", "NUL byte inside a quoted string")], {}),
    ("invalid escape in a quoted string", b'a LOGIN "a\\bc" x\r\n',
     [error("a", 'invalid escape in quoted string (only \\" and \\\\ are allowed)')], {}),
    (
        "over-long line is rejected and the next line parses",
        b"a NOOP " + b"x" * 100 + b"\r\nb NOOP\r\n",
        [error("a", TOO_LONG), cmd("b", "NOOP")],
        {},
    ),
    (
        "the limit counts every line of the command, not literals",
        b"a LOGIN {30+}\r\n" + b"L" * 30 + b" " + b"y" * 48 + b"\r\nb NOOP\r\n",
        [error("a", TOO_LONG), cmd("b", "NOOP")],
        {},
    ),
    (
        "over-long line ending in a non-sync literal: the literal is skipped",
        b"a APPEND x " + b"y" * 70 + b" {10+}\r\n" + LOGOUT_LINE + b"\r\nb NOOP\r\n",
        [error("a", TOO_LONG), cmd("b", "NOOP")],
        {},
    ),
    (
        "over-long line ending in a sync literal closes",
        b"a APPEND x " + b"y" * 70 + b" {10}\r\n" + LOGOUT_LINE,
        [error("a", TOO_LONG, close=True)],
        {},
    ),
    (
        "oversized sync literal: NO [TOOBIG] without continuation, then close",
        b"a APPEND x {41}\r\n" + LOGOUT_LINE,
        [error("a", "literal of 41 bytes exceeds the limit of 40", close=True, status="NO", code="TOOBIG")],
        {},
    ),
    (
        "oversized non-sync literal is read, discarded and the command rejected",
        b"a APPEND x {50+}\r\n" + LOGOUT_LINE * 5 + b"\r\nb NOOP\r\n",
        [error("a", "literal of 50 bytes exceeds the limit of 40", status="NO", code="TOOBIG"), cmd("b", "NOOP")],
        {},
    ),
    (
        "a rejected command's later non-sync literals are skipped too",
        b"a APPEND x {50+}\r\n" + LOGOUT_LINE * 5 + b" {10+}\r\n" + LOGOUT_LINE + b"\r\nb NOOP\r\n",
        [error("a", "literal of 50 bytes exceeds the limit of 40", status="NO", code="TOOBIG"), cmd("b", "NOOP")],
        {},
    ),
    (
        "a rejected command's later sync literal closes",
        b"a APPEND x {50+}\r\n" + LOGOUT_LINE * 5 + b" {10}\r\n" + LOGOUT_LINE,
        [error("a", "literal of 50 bytes exceeds the limit of 40", status="NO", code="TOOBIG"),
         error(None, "synchronizing literal in a rejected command", close=True)],
        {},
    ),
    (
        "literals of one command share a budget",
        b"a APPEND x {30+}\r\n" + b"m" * 30 + b" {20+}\r\n" + b"n" * 20 + b"\r\nb NOOP\r\n",
        [error("a", "literals of one command exceed 40 bytes", status="NO", code="TOOBIG"), cmd("b", "NOOP")],
        {},
    ),
    (
        "number of literals per command is capped",
        b"a X {1+}\r\n1 {1+}\r\n2 {1+}\r\n3\r\nb NOOP\r\n",
        [error("a", "more than 2 literals in one command"), cmd("b", "NOOP")],
        {"max_literals": 2},
    ),
    (
        "error on a line with a sync literal closes (its data may follow)",
        b"a LOGIN \x00 {5}\r\nhello\r\n",
        [error("a", "NUL byte in command line", close=True)],
        {},
    ),
    (
        "invalid tag character with a non-sync literal: untagged BAD, literal skipped",
        b"a(b LOGIN {10+}\r\n" + LOGOUT_LINE + b"\r\nb NOOP\r\n",
        [error(None, "invalid character '(' in tag"), cmd("b", "NOOP")],
        {},
    ),
    (
        "over-long IDLE line",
        b"a IDLE\r\n" + b"x" * 100 + b"\r\nb NOOP\r\n",
        [cmd("a", "IDLE"), error(None, TOO_LONG), cmd("b", "NOOP")],
        {},
    ),
    (
        "LITERAL-: non-sync literals above 4096 bytes are rejected and skipped",
        b"a APPEND x {4097+}\r\n" + b"z" * 4097 + b"\r\nb APPEND x {4096+}\r\n" + b"z" * 4096 + b"\r\n",
        [error("a", "non-synchronizing literals are limited to 4096 bytes", code="TOOBIG"),
         cmd("b", "APPEND", b" x ", Literal(b"z" * 4096), b"")],
        {"literal_minus": True, "max_literal": 10_000},
    ),
]

TAG_SPECIALS = [b"*", b"+", b"(", b")", b"{", b"%", b'"', b"\\"]


@pytest.mark.parametrize(("data", "expected", "options"), [row[1:] for row in WIRE_TABLE],
                         ids=[row[0] for row in WIRE_TABLE])
def test_wire_table(data: bytes, expected: list[Event], options: dict) -> None:
    for chunks in splits(data):
        assert drive(receiver(**options), chunks) == expected, chunks


@pytest.mark.parametrize("special", TAG_SPECIALS, ids=[s.decode() for s in TAG_SPECIALS])
def test_tag_with_a_special_character_gets_untagged_bad(special: bytes) -> None:
    for data in (special + b"1 NOOP\r\n", b"a" + special + b"1 NOOP\r\n"):
        events = drive(receiver(), [data, b"b NOOP\r\n"])
        assert events == [error(None, f"invalid character {special.decode()!r} in tag"), cmd("b", "NOOP")]


def test_need_literal_comes_before_the_literal_arrives() -> None:
    rx = receiver()
    rx.feed(b"a LOGIN {5}\r\n")
    assert rx.next_event() == NeedLiteral(5)
    assert rx.next_event() == NEED_MORE
    rx.feed(b"alice x\r\n")
    assert rx.next_event() == cmd("a", "LOGIN", b" ", Literal(b"alice"), b" x")


def test_closed_receiver_ignores_further_input() -> None:
    rx = receiver()
    events = drive(rx, [b"a APPEND x {41}\r\n"])
    assert events[-1].close  # type: ignore[union-attr]
    assert rx.closed
    assert drive(rx, [b"b NOOP\r\n"]) == []


def test_take_pending_hands_over_pipelined_bytes() -> None:
    """After STARTTLS the glue drops them; after COMPRESS they are compressed data."""
    rx = receiver()
    rx.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert rx.next_event() == cmd("a", "STARTTLS")
    assert rx.take_pending() == b"b LOGIN x y\r\n"
    assert rx.next_event() == NEED_MORE


def test_modes_switch_only_between_commands() -> None:
    rx = receiver()
    rx.feed(b"a LOGIN {5}\r\n")
    assert rx.next_event() == NeedLiteral(5)
    for switch in (rx.expect_done, rx.expect_sasl_response, rx.take_pending):
        with pytest.raises(RuntimeError):
            switch()


def test_reprs_hide_arguments_and_literals() -> None:
    events = drive(receiver(), [b"a LOGIN alice {7+}\r\nhunter2\r\nb AUTHENTICATE PLAIN\r\nc2VjcmV0\r\n"])
    text = repr(events)
    assert "hunter2" not in text and "alice" not in text and "c2VjcmV0" not in text


def test_from_limits_uses_the_configured_limits() -> None:
    rx = Receiver.from_limits(LimitsConfig(imap_command_length=100, imap_literal_size=1000))
    assert (rx.max_line, rx.max_literal, rx.max_command_literals) == (100, 1000, 1000)


# -- linear work ------------------------------------------------------------


def test_20_mb_literal_in_16_kb_chunks_is_linear() -> None:
    size, chunk = 20 * 1024 * 1024, 16 * 1024
    rx = Receiver(max_literal=size)
    header = f"a APPEND INBOX {{{size}+}}\r\n".encode()
    body = b"x" * chunk
    started = time.perf_counter()
    rx.feed(header)
    assert rx.next_event() == NEED_MORE
    for _ in range(size // chunk):
        rx.feed(body)
        assert rx.next_event() == NEED_MORE
    rx.feed(b"\r\n")
    event = rx.next_event()
    assert isinstance(event, RawCommand) and len(event.parts[1].data) == size  # type: ignore[union-attr]
    assert rx.bytes_examined <= 2 * (size + len(header) + 2)
    assert time.perf_counter() - started < 5  # generous; the counter is the real check


def test_long_line_byte_by_byte_is_linear() -> None:
    line = b"a SEARCH " + b"TEXT x " * 9000 + b"\r\n"
    rx = Receiver(max_line=len(line))
    for byte in range(len(line)):
        rx.feed(line[byte:byte + 1])
        event = rx.next_event()
    assert isinstance(event, RawCommand)
    assert rx.bytes_examined <= 3 * len(line)


def test_many_pipelined_commands_in_one_read_are_linear() -> None:
    data = b"a NOOP\r\n" * 100_000
    rx = Receiver()
    events = drive(rx, [data])
    assert len(events) == 100_000
    assert rx.bytes_examined <= 3 * len(data)


# -- properties -------------------------------------------------------------

TOKENS = [b"a ", b"b1 ", b"NOOP", b"IDLE", b"DONE", b"AUTHENTICATE PLAIN", b"LOGIN", b"APPEND x", b" ",
          b"{3}", b"{2+}", b"~{1}", b"{45+}", b"{99}", b'"', b"\\", b"\r\n", b"\n", b"\r", b"\x00", b"\xff",
          b"x" * 30, b"(", b")", b"*", b"}", b"{"]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join), st.lists(st.integers(0, 10_000), max_size=8))
def test_events_do_not_depend_on_chunking(data: bytes, cuts: list[int]) -> None:
    assert drive(receiver(), chunked(data, cuts)) == drive(receiver(), [data])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
def test_arbitrary_bytes_only_ever_yield_events_or_command_errors(data: bytes, cuts: list[int], utf8: bool) -> None:
    for event in drive(receiver(), chunked(data, cuts)):
        assert isinstance(event, (RawCommand, NeedLiteral, IdleDone, SaslResponse, ProtocolError))
        if isinstance(event, RawCommand):
            with contextlib.suppress(CommandError):
                parse_command(event, utf8=utf8)
