"""POP3 framing and message form: the line receiver (fed whole, byte by byte and split at
every offset), dot-stuffing, exact sizes, TOP and the UIDL format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runbox_mta.pop3.message import top, transmitted, transmitted_size, uidl
from runbox_mta.pop3.wire import LINE_TOO_LONG, MAX_COMMAND_LINE, Line, LineReceiver, NeedMore

L, TOO_LONG = Line, LINE_TOO_LONG


def events(chunks: list[bytes], max_line: int = MAX_COMMAND_LINE) -> list[object]:
    receiver = LineReceiver()
    seen: list[object] = []
    for chunk in chunks:
        receiver.feed(chunk)
        while not isinstance(event := receiver.next_event(max_line), NeedMore):
            seen.append(event)
    return seen


def splits(data: bytes) -> list[list[bytes]]:
    """The data whole, byte by byte, and cut in two at every offset."""
    return [[data], [data[i:i + 1] for i in range(len(data))],
            *([data[:i], data[i:]] for i in range(1, len(data)))]


WIRE = [
    (b"CAPA\r\n", [L(b"CAPA")]),
    (b"capa\n", [L(b"capa")]),  # bare LF ends a line too
    (b"USER a\r\nPASS b c\r\n", [L(b"USER a"), L(b"PASS b c")]),
    (b"\r\n", [L(b"")]),
    (b"A\rB\r\n", [L(b"A\rB")]),  # a lone CR is content; the session rejects it
    (b"NOOP", []),  # unfinished
    (b"x" * 253 + b"\r\n", [L(b"x" * 253)]),  # 255 octets with CRLF: the limit
    (b"x" * 254 + b"\n", [L(b"x" * 254)]),  # 255 with a bare LF
    (b"x" * 254 + b"\r\nSTAT\r\n", [TOO_LONG, L(b"STAT")]),  # 256: one too many
    (b"x" * 1000 + b"\r\nSTAT\r\n", [TOO_LONG, L(b"STAT")]),  # reported once, rest discarded
    (b"x" * 300, [TOO_LONG]),  # reported before the client finishes it
    (b"x" * 300 + b"\r\n" + b"y" * 300 + b"\r\nQUIT\r\n", [TOO_LONG, TOO_LONG, L(b"QUIT")]),
]


@pytest.mark.parametrize("data, expected", WIRE)
def test_receiver_events_do_not_depend_on_splits(data, expected):
    for chunks in splits(data):
        assert events(chunks) == expected, chunks


def test_the_limit_is_read_at_each_line():
    receiver = LineReceiver()
    receiver.feed(b"x" * 300 + b"\r\n" + b"x" * 300 + b"\r\n")
    assert receiver.next_event(4096) == Line(b"x" * 300)  # e.g. a SASL response
    assert receiver.next_event(255) == LINE_TOO_LONG


def test_an_endless_line_does_not_grow_the_buffer():
    receiver = LineReceiver()
    for _ in range(1000):
        receiver.feed(b"x" * 1000)
        while not isinstance(receiver.next_event(255), NeedMore):
            pass
    assert len(receiver._buffer) < 2000


def test_many_lines_in_one_feed_are_linear():
    data = b"NOOP\r\n" * 50_000
    assert len(events([data])) == 50_000


def test_line_repr_hides_passwords():
    assert "secret" not in repr(Line(b"PASS secret"))


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_receiver_never_raises_and_never_loses_a_short_line(chunks):
    data = b"".join(chunks)
    seen = events(chunks)
    assert seen == events([data])
    short_lines = [line for line in data.split(b"\n")[:-1] if len(line) + 1 <= MAX_COMMAND_LINE]
    assert [event.text for event in seen if isinstance(event, Line)] == [
        line[:-1] if line.endswith(b"\r") else line for line in short_lines]


# --- what a client receives -------------------------------------------------------------

MESSAGES = [
    (b"", b""),
    (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n"),
    (b"Subject: x\n\nbare LF\n", b"Subject: x\r\n\r\nbare LF\r\n"),
    (b"Subject: x\r\n\r\n.dot\r\n..two\r\n.\r\nend", b"Subject: x\r\n\r\n..dot\r\n...two\r\n..\r\nend\r\n"),
    (b".first line", b"..first line\r\n"),
    (b"a\r\r\nb\r", b"a\r\r\nb\r\r\n"),  # lone CRs are content
]


@pytest.mark.parametrize("stored, sent", MESSAGES)
def test_transmitted_form_and_its_size(stored, sent):
    assert transmitted(stored) == sent
    assert transmitted_size(stored) == len(sent)


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\n."]), max_size=40))
def test_size_is_exactly_what_is_sent_and_unstuffing_restores_the_lines(parts):
    data = b"".join(parts)
    sent = transmitted(data)
    assert transmitted_size(data) == len(sent)
    if not data:
        return
    lines = sent.split(b"\r\n")
    assert lines[-1] == b""  # every line ends in CRLF
    assert b"." not in lines[:-1]  # no line can pass for the terminator
    # A client removes one leading dot per line (RFC 1939 §3) and gets the stored lines back.
    restored = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    complete = data if data.endswith(b"\n") else data + b"\r\n"
    assert restored.replace(b"\r\n", b"\n") == complete.replace(b"\r\n", b"\n")


TOP_MESSAGE = b"Subject: t\r\nFrom: a@b\r\n\r\nline 1\r\n.line 2\r\nline 3\r\n"


@pytest.mark.parametrize("lines, expected", [
    (0, b"Subject: t\r\nFrom: a@b\r\n\r\n"),
    (2, b"Subject: t\r\nFrom: a@b\r\n\r\nline 1\r\n..line 2\r\n"),
    (99, transmitted(TOP_MESSAGE)),
])
def test_top_sends_the_header_and_n_body_lines(lines, expected):
    assert top(TOP_MESSAGE, lines) == expected


def test_top_of_odd_messages():
    assert top(b"Subject: only a header", 5) == b"Subject: only a header\r\n"
    assert top(b"\r\nbody only\r\nmore\r\n", 1) == b"\r\nbody only\r\n"
    assert top(b"A: b\n\nbare\nlf\n", 1) == b"A: b\r\n\r\nbare\r\n"


def test_uidl_is_dovecots_default_format():
    # %08Xu%08Xv: UID then UIDVALIDITY, upper-case hex.
    assert uidl(0x2A, 0x65A1B2C3) == "0000002A65A1B2C3"
    assert uidl(4_294_967_295, 1) == "FFFFFFFF00000001"
