"""FETCH content items (runbox_mta.imap.fetch): section numbering (RFC 9051
§6.4.5), section extraction, partial ranges, BINARY decoding (RFC 3516) and
the rendered response items, with the attributes parsed by the real command
parser."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbox_mta.imap.commands import (
    Fetch,
    FetchAttribute,
    FetchBinarySize,
    FetchBody,
    FetchItem,
    Section,
    parse_command,
)
from runbox_mta.imap.fetch import (
    UnknownCte,
    binary_content,
    find_part,
    needs_data,
    needs_structure,
    render_fetch_item,
    section_content,
    sets_seen,
)
from runbox_mta.imap.mime import MessageStructure, parse_structure
from runbox_mta.imap.wire import RawCommand, Receiver
from tests.test_imap_mime import damaged, mime_tree, sample


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def attributes(text: str) -> tuple[FetchAttribute, ...]:
    """FETCH attributes as the command parser produces them."""
    receiver = Receiver()
    receiver.feed(b"t FETCH 1 " + text.encode() + b"\r\n")
    event = receiver.next_event()
    assert isinstance(event, RawCommand)
    command = parse_command(event)
    assert isinstance(command, Fetch)
    return command.attributes


def fetch(data: bytes, text: str) -> bytes:
    """The rendered items for `text`, one FETCH attribute list, joined by spaces."""
    structure = parse_structure(data)
    return b" ".join(render_fetch_item(data, structure, attribute) for attribute in attributes(text))


def body(data: bytes, spec: str) -> bytes:
    """The content of BODY[spec], the way FETCH gets it."""
    (attribute,) = attributes(f"BODY.PEEK[{spec}]")
    assert isinstance(attribute, FetchBody)
    return section_content(data, parse_structure(data), attribute.section)


# -- part numbers ---------------------------------------------------------

# The shape of the RFC 9051 §6.4.5 example; each leaf's body names its part.
RFC_EXAMPLE = crlf("""Subject: part numbering
Content-Type: multipart/mixed; boundary=top

--top
Content-Type: text/plain

part 1
--top
Content-Type: application/octet-stream

part 2
--top
Content-Type: message/rfc822

Subject: part 3
Content-Type: multipart/mixed; boundary=three

--three
Content-Type: text/plain

part 3.1
--three
Content-Type: application/octet-stream

part 3.2
--three--
--top
Content-Type: multipart/mixed; boundary=four

--four
Content-Type: image/gif

part 4.1
--four
Content-Type: message/rfc822

Subject: part 4.2
Content-Type: multipart/mixed; boundary=fourtwo

--fourtwo
Content-Type: text/plain

part 4.2.1
--fourtwo
Content-Type: multipart/alternative; boundary=alt

--alt
Content-Type: text/plain

part 4.2.2.1
--alt
Content-Type: text/richtext

part 4.2.2.2
--alt--
--fourtwo--
--four--
--top--
""")


@pytest.mark.parametrize("number", ["1", "2", "3.1", "3.2", "4.1", "4.2.1", "4.2.2.1", "4.2.2.2"])
def test_rfc_example_leaves(number: str) -> None:
    assert body(RFC_EXAMPLE, number) == f"part {number}".encode()


@pytest.mark.parametrize(("number", "kind"), [
    ("3", ("message", "rfc822")), ("4", ("multipart", "mixed")), ("4.2", ("message", "rfc822")),
    ("4.2.2", ("multipart", "alternative")), ("4.2.2.2", ("text", "richtext")),
])
def test_rfc_example_composites(number: str, kind: tuple[str, str]) -> None:
    part = find_part(parse_structure(RFC_EXAMPLE), tuple(int(n) for n in number.split(".")))
    assert part is not None and (part.type, part.subtype) == kind


@pytest.mark.parametrize("number", ["5", "1.1", "2.1", "3.3", "3.1.1", "4.3", "4.2.3", "4.2.2.3", "4.1.1"])
def test_nonexistent_parts_are_empty(number: str) -> None:
    assert find_part(parse_structure(RFC_EXAMPLE), tuple(int(n) for n in number.split("."))) is None
    assert body(RFC_EXAMPLE, number) == b""
    assert body(RFC_EXAMPLE, number + ".MIME") == b""


def test_rfc_example_message_sections() -> None:
    assert body(RFC_EXAMPLE, "3.HEADER") == b"Subject: part 3\r\nContent-Type: multipart/mixed; boundary=three\r\n\r\n"
    assert body(RFC_EXAMPLE, "4.2.HEADER.FIELDS (subject)") == b"Subject: part 4.2\r\n\r\n"
    text = body(RFC_EXAMPLE, "3.TEXT")
    assert text.startswith(b"--three\r\n") and text.endswith(b"--three--")
    assert body(RFC_EXAMPLE, "4.1.MIME") == b"Content-Type: image/gif\r\n\r\n"
    assert body(RFC_EXAMPLE, "3.MIME") == b"Content-Type: message/rfc822\r\n\r\n"  # the part's own header


@pytest.mark.parametrize("spec", ["1.HEADER", "1.TEXT", "4.TEXT", "4.HEADER.FIELDS (x)", "4.1.HEADER"])
def test_header_and_text_exist_only_for_messages(spec: str) -> None:
    assert body(RFC_EXAMPLE, spec) == b""


NESTED_MESSAGES = crlf("""From: outer@example.com
Content-Type: message/rfc822

From: middle@example.com
Content-Type: message/rfc822

From: inner@example.com
Subject: innermost

Hello
""")


@pytest.mark.parametrize(("spec", "expected"), [
    ("1", "From: middle@example.com\nContent-Type: message/rfc822\n\n"
          "From: inner@example.com\nSubject: innermost\n\nHello\n"),
    ("1.HEADER", "From: middle@example.com\nContent-Type: message/rfc822\n\n"),
    ("1.1", "From: inner@example.com\nSubject: innermost\n\nHello\n"),
    ("1.1.HEADER", "From: inner@example.com\nSubject: innermost\n\n"),
    ("1.1.TEXT", "Hello\n"),
    ("1.1.1", "Hello\n"),
    ("1.1.1.MIME", "From: inner@example.com\nSubject: innermost\n\n"),
    ("2", ""),
    ("1.2", ""),
    ("1.1.2", ""),
])
def test_message_rfc822_at_the_top(spec: str, expected: str) -> None:
    assert body(NESTED_MESSAGES, spec) == crlf(expected)


def test_single_part_message_has_part_one() -> None:
    data = sample("plain.eml")
    text = crlf("Hi Bob,\n\nhere is the draft of the quarterly report.\n\nAlice\n")
    assert body(data, "1") == body(data, "TEXT") == text
    assert body(data, "1.MIME") == body(data, "HEADER")
    assert body(data, "2") == body(data, "1.1") == b""


# -- header sections ------------------------------------------------------


def test_header_fields_keep_order_case_and_folding() -> None:
    data = sample("plain.eml")
    assert body(data, "HEADER.FIELDS (subject TO x-missing)") == crlf(
        "To: Bob <bob@example.net>, carol@example.net\nSubject: Quarterly report\n  draft\n\n"
    )
    assert body(data, "HEADER.FIELDS (x-missing)") == b"\r\n"


def test_header_fields_not() -> None:
    data = sample("groups.eml")
    assert body(data, "HEADER.FIELDS.NOT (from to cc bcc date)") == crlf(
        "Reply-To: \nSender:\nSubject: groups\n\n"
    )


def test_header_fields_match_repeated_fields() -> None:
    data = crlf("Received: one\nX: 1\nReceived: two\n  folded\n\nbody")
    assert body(data, "HEADER.FIELDS (RECEIVED)") == crlf("Received: one\nReceived: two\n  folded\n\n")


def test_header_sections_have_a_blank_line_only_if_the_message_has_one() -> None:
    # RFC 3501 §6.4.5: "except in the case of a message which has no body and no blank line".
    assert body(b"Subject: no newline", "HEADER") == b"Subject: no newline"
    assert body(b"Subject: x\r\n", "HEADER") == b"Subject: x\r\n"
    assert body(b"Subject: x\nTo: y", "HEADER.FIELDS (to)") == b"To: y"
    assert body(b"Subject: x\r\nTo: y\r\n", "HEADER.FIELDS.NOT (to)") == b"Subject: x\r\n"
    assert body(b"", "HEADER") == b""
    assert body(b"\r\nbody", "HEADER") == b"\r\n"
    assert body(b"\r\nbody", "HEADER.FIELDS (to)") == b"\r\n"


def test_lf_message_sections_keep_their_line_ends() -> None:
    data = sample("lf-only.eml")
    assert body(data, "1") == b"one\ntwo"
    assert body(data, "1.MIME") == b"Content-Type: text/plain\n\n"
    assert body(data, "HEADER.FIELDS (subject)") == b"Subject: unix line ends\n\n"


def test_forwarded_message_sections() -> None:
    data = sample("forwarded.eml")
    assert body(data, "1") == b"See below.\r\n"
    assert body(data, "2.MIME") == crlf(
        "Content-Type: message/rfc822\nContent-Description: Forwarded message\nContent-Disposition: inline\n\n"
    )
    assert body(data, "2.HEADER.FIELDS (Subject From)") == crlf("From: Carol <carol@example.net>\nSubject: Lunch\n\n")
    assert body(data, "2.1") == b"Lunch at noon?\r\n"
    assert body(data, "2.2.MIME") == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    assert body(data, "2.TEXT").startswith(b"--inner\r\n") and body(data, "2.TEXT").endswith(b"--inner--\r\n")
    assert body(data, "2") == body(data, "2.HEADER") + body(data, "2.TEXT")


def test_digest_parts_are_messages() -> None:
    data = sample("digest.eml")
    assert body(data, "1.MIME") == b"\r\n"
    assert body(data, "1.HEADER") == crlf("From: one@example.org\nSubject: first\n\n")
    assert body(data, "1.TEXT") == body(data, "1.1") == b"first body\r\n"
    assert body(data, "3.MIME") == b"X-Comment: no content type here\r\n\r\n"
    assert body(data, "2") == b"Not a message, a note.\r\n"
    assert body(data, "2.HEADER") == b""


def test_multipart_without_parts() -> None:
    data = sample("no-boundary.eml")
    assert body(data, "TEXT") == b"Only text, the sender forgot the MIME parts.\r\n"
    assert body(data, "1") == b""


# -- BINARY (RFC 3516) ----------------------------------------------------


def binary(data: bytes, number: str = "") -> bytes:
    return binary_content(data, parse_structure(data), tuple(int(n) for n in number.split(".") if n))


def test_binary_decodes_quoted_printable() -> None:
    assert binary(sample("alternative.eml"), "1") == (
        "Summer sale: everything €5 off.\r\n"
        "Long line that is soft-wrapped by quoted-printable encoding so that it fits.\r\n"
    ).encode()


def test_binary_decodes_base64() -> None:
    pdf = "%PDF-1.4\n%äüöß\n1 0 obj\n<<>>\nendobj\n".encode()
    assert binary(sample("mixed-attachment.eml"), "2") == pdf
    assert binary(sample("lf-only.eml"), "2") == b"hello\n"


def test_binary_of_identity_encodings_and_composites_is_raw() -> None:
    data = sample("mixed-attachment.eml")
    assert binary(data, "1") == body(data, "1")
    nested = sample("nested3.eml")
    assert binary(nested, "1") == body(nested, "1")
    assert binary(nested, "1.2") == b"GIF89a\x01\x00\x01\x00\x00\x00\x00,"
    assert binary(nested) == nested


def test_binary_of_whole_single_part_message_decodes_its_body() -> None:
    data = sample("encoded-words.eml")
    assert binary(data) == body(data, "HEADER") + "Schöne Grüße!\r\n".encode()


def test_binary_of_missing_part_is_empty() -> None:
    assert binary(sample("plain.eml"), "2") == b""


def test_binary_of_unknown_encoding_fails() -> None:
    with pytest.raises(UnknownCte):
        binary(sample("bad-content-type.eml"), "3")


# -- rendered items -------------------------------------------------------


def test_structure_items() -> None:
    data = sample("plain.eml")
    structure = parse_structure(data)
    assert render_fetch_item(None, structure, FetchItem.RFC822_SIZE) == b"RFC822.SIZE %d" % len(data)
    assert render_fetch_item(None, structure, FetchItem.BODY) == (
        b'BODY ("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "7bit" 64 5)'
    )
    assert render_fetch_item(None, structure, FetchItem.BODYSTRUCTURE).startswith(b'BODYSTRUCTURE ("text" "plain"')
    assert render_fetch_item(None, structure, FetchItem.ENVELOPE).startswith(b'ENVELOPE ("Tue, 2 Jan 2024')


@pytest.mark.parametrize("text", ["BODY[]", "BODY.PEEK[]", "BODY[]<5.20>", "RFC822"])
def test_the_whole_message_is_rendered_without_its_structure(text: str) -> None:
    data = sample("groups.eml") + b"\0"  # a NUL, which BODY[] must not send as it is
    (attribute,) = attributes(text)
    assert not needs_structure(attribute)
    assert render_fetch_item(data, None, attribute) == render_fetch_item(data, parse_structure(data), attribute)


@pytest.mark.parametrize("text", ["BODY[1]", "BODY[HEADER]", "BODY[TEXT]", "BINARY[]", "BINARY.SIZE[1]",
                                  "ENVELOPE", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822.TEXT", "RFC822.SIZE"])
def test_every_other_item_needs_the_structure(text: str) -> None:
    (attribute,) = attributes(text)
    assert needs_structure(attribute)
    with pytest.raises(ValueError):
        render_fetch_item(sample("groups.eml"), None, attribute)


def test_rfc822_items() -> None:
    data = sample("groups.eml")
    header = body(data, "HEADER")
    assert fetch(data, "RFC822.HEADER") == b"RFC822.HEADER {%d}\r\n" % len(header) + header
    assert fetch(data, "RFC822.TEXT") == b"RFC822.TEXT {6}\r\nbody\r\n"
    assert fetch(data, "RFC822") == b"RFC822 {%d}\r\n" % len(data) + data


@pytest.mark.parametrize(("request_", "expected"), [
    ("BODY[]", b"BODY[] {21}\r\nSubject: s\r\n\r\nhello\r\n"),
    ("BODY.PEEK[TEXT]<0.3>", b"BODY[TEXT]<0> {3}\r\nhel"),
    ("BODY[TEXT]<3.3>", b"BODY[TEXT]<3> {3}\r\nlo\r"),
    ("BODY[TEXT]<5.100>", b"BODY[TEXT]<5> {2}\r\n\r\n"),
    ("BODY[TEXT]<50.1>", b'BODY[TEXT]<50> ""'),
    ("body.peek[header.fields (subject x-Y)]", b"BODY[HEADER.FIELDS (SUBJECT X-Y)] {14}\r\nSubject: s\r\n\r\n"),
    ('BODY[HEADER.FIELDS.NOT ("Odd]name")]', b'BODY[HEADER.FIELDS.NOT ("ODD]NAME")] {14}\r\nSubject: s\r\n\r\n'),
    ("BODY[1.MIME]", b"BODY[1.MIME] {14}\r\nSubject: s\r\n\r\n"),
    ("BODY[1]<1.2>", b"BODY[1]<1> {2}\r\nel"),
    ("BODY[2]", b'BODY[2] ""'),
])
def test_body_items(request_: str, expected: bytes) -> None:
    assert fetch(b"Subject: s\r\n\r\nhello\r\n", request_) == expected


def test_binary_items() -> None:
    data = sample("lf-only.eml")
    assert fetch(data, "BINARY[3]") == b'BINARY[3] ""'
    assert fetch(data, "BINARY.PEEK[2]") == b"BINARY[2] {6}\r\nhello\n"
    assert fetch(data, "BINARY[2]<1.3>") == b"BINARY[2]<1> {3}\r\nell"
    assert fetch(data, "BINARY.SIZE[2]") == b"BINARY.SIZE[2] 6"
    assert fetch(data, "BINARY.SIZE[1]") == b"BINARY.SIZE[1] 7"
    assert fetch(data, "BINARY.SIZE[9]") == b"BINARY.SIZE[9] 0"


def test_binary_with_nul_is_literal8_and_body_never_has_nul() -> None:
    data = crlf("Content-Transfer-Encoding: base64\n\nAAEC\n")  # decodes to 00 01 02
    assert fetch(data, "BINARY[1]") == b"BINARY[1] ~{3}\r\n\x00\x01\x02"
    raw = b"Subject: nul\r\n\r\na\x00b"
    assert fetch(raw, "BODY[TEXT]") == b"BODY[TEXT] {3}\r\na\x80b"
    assert fetch(raw, "BINARY[1]") == b"BINARY[1] ~{3}\r\na\x00b"


def test_unknown_cte_raises_for_binary_only() -> None:
    data = sample("bad-content-type.eml")
    with pytest.raises(UnknownCte):
        fetch(data, "BINARY[3]")
    with pytest.raises(UnknownCte):
        fetch(data, "BINARY.SIZE[3]")
    assert fetch(data, "BODY[3]") == b"BODY[3] {5}\r\nJPEG?"


def test_items_that_are_not_message_content_are_refused() -> None:
    structure = parse_structure(b"")
    for attribute in (FetchItem.FLAGS, FetchItem.UID, FetchItem.INTERNALDATE, FetchItem.MODSEQ):
        with pytest.raises(ValueError):
            render_fetch_item(b"", structure, attribute)
    with pytest.raises(ValueError):
        render_fetch_item(None, structure, FetchBody(Section()))


@pytest.mark.parametrize(("request_", "data_needed", "seen"), [
    ("ENVELOPE", False, False),
    ("BODYSTRUCTURE", False, False),
    ("BODY", False, False),
    ("RFC822.SIZE", False, False),
    ("RFC822", True, True),
    ("RFC822.HEADER", True, False),
    ("RFC822.TEXT", True, True),
    ("BODY[]", True, True),
    ("BODY.PEEK[]", True, False),
    ("BINARY[1]", True, True),
    ("BINARY.PEEK[1]", True, False),
    ("BINARY.SIZE[1]", True, False),
])
def test_data_and_seen_flags(request_: str, data_needed: bool, seen: bool) -> None:
    (attribute,) = attributes(request_)
    assert (needs_data(attribute), sets_seen(attribute)) == (data_needed, seen)


def test_needs_data_matches_rendering_without_data() -> None:
    structure = parse_structure(sample("forwarded.eml"))
    for attribute in attributes("(ENVELOPE BODY BODYSTRUCTURE RFC822.SIZE)"):
        assert not needs_data(attribute)
        render_fetch_item(None, structure, attribute)
    assert needs_data(FetchBinarySize(()))


# -- properties -----------------------------------------------------------

SPECS = ["", "HEADER", "TEXT", "1", "1.MIME", "2", "2.HEADER", "2.TEXT", "1.1", "2.1.MIME", "1.2.3",
         "HEADER.FIELDS (subject)", "1.HEADER.FIELDS.NOT (from)"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | damaged(mime_tree))
def test_every_section_of_any_message_renders(data: bytes) -> None:
    structure = MessageStructure.from_json(parse_structure(data).to_json())
    for spec in SPECS:
        content = body(data, spec)
        assert isinstance(content, bytes)
        if spec in ("", "HEADER", "TEXT"):
            assert content in data or spec == "HEADER"
    for number in [(), (1,), (2,), (1, 1), (2, 1)]:
        try:
            decoded = binary_content(data, structure, number)
        except UnknownCte:
            continue
        assert isinstance(decoded, bytes)
        # RFC 3516 §4.2: BINARY.SIZE is the size BINARY returns (Dovecot 2.3 sometimes differs).
        spec = ".".join(map(str, number))
        assert fetch(data, f"BINARY.SIZE[{spec}]") == b"BINARY.SIZE[%s] %d" % (spec.encode(), len(decoded))
        part = find_part(structure, number) if number else structure.root
        if part is None:
            assert decoded == b""
