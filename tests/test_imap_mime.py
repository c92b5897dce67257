"""Message structure (runbox_mta.imap.mime) and its IMAP rendering.

The corpus in tests/mime_samples/ holds hand-written, real-world-shaped
messages; the files use LF and are stored as CRLF (as SMTP delivers them),
except lf-only.eml which is parsed as it is. The ENVELOPE and BODYSTRUCTURE
goldens are written by hand from RFC 9051 §7.5.2 and Dovecot's output for
the same shapes; sizes and line counts were measured by naive slicing, not
by the parser under test.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbox_mta.imap.encoding import (
    decode_base64,
    decode_transfer,
    for_humans,
    header_text,
    parse_addresses,
    parse_mime_value,
    tokenize,
)
from runbox_mta.imap.fetch import render_bodystructure, render_envelope
from runbox_mta.imap.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    Address,
    BodyPart,
    Envelope,
    MessageStructure,
    parse_structure,
)

SAMPLES = Path(__file__).parent / "mime_samples"


def sample(name: str) -> bytes:
    data = (SAMPLES / name).read_bytes()
    return data if name.startswith("lf-") else data.replace(b"\n", b"\r\n")


# -- goldens ---------------------------------------------------------------

ALICE = '(("Alice Example" NIL "alice" "example.org"))'
NEWS = '(("Shop Newsletter" NIL "news" "shop.example"))'
JEAN = '(("Jean Dupont" NIL "jean" "example.fr"))'
DESIGNER = '((NIL NIL "designer" "example.com"))'
BOB = '(("Bob" NIL "bob" "example.net"))'
CAROL = '(("Carol" NIL "carol" "example.net"))'
A = '((NIL NIL "a" "example.com"))'
JOERG_UTF8 = '(({13}\r\nJörg Müller NIL "joerg" "example.de"))'
JOERG_ENCODED = '(("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de"))'
REAL_NAME = '(("Real Name" NIL "user" "example.com"))'
OLD = '((NIL NIL "old" "example.com"))'
LIST = '((NIL NIL "list-request" "example.org"))'
ONE = '((NIL NIL "one" "example.org"))'
TWO = '((NIL NIL "two" "example.org"))'
ASCII = '("charset" "us-ascii")'
EXT = "NIL NIL NIL NIL"  # body-ext-1part with nothing to say: md5, disposition, language, location

ENVELOPES = {
    "plain.eml": f'("Tue, 2 Jan 2024 11:14:58 +0100" "Quarterly report draft" {ALICE} {ALICE} {ALICE} '
                 '(("Bob" NIL "bob" "example.net")(NIL NIL "carol" "example.net")) '
                 '(("Dave, the Reviewer" NIL "dave" "example.com")) NIL '
                 '"<prev-1@example.net>" "<20240102101458.GA1234@example.org>")',
    "alternative.eml": f'("Wed, 03 Jul 2024 08:00:00 +0000" "=?UTF-8?Q?Sommer=C2=A0Sale?=" {NEWS} {NEWS} {NEWS} '
                       '((NIL NIL "customer" "example.net")) NIL NIL NIL "<nl-2024-07@shop.example>")',
    "mixed-attachment.eml": f'("Thu, 04 Jan 2024 09:30:00 +0100" "Facture" {JEAN} {JEAN} {JEAN} '
                            '(("Marie" NIL "marie" "example.fr")) NIL NIL NIL NIL)',
    "related.eml": f'("Fri, 05 Jan 2024 14:00:00 +0000" "Mockup" {DESIGNER} {DESIGNER} {DESIGNER} '
                   '((NIL NIL "client" "example.org")) NIL NIL NIL NIL)',
    "forwarded.eml": f'("Sat, 06 Jan 2024 12:00:00 +0000" "Fwd: Lunch" {BOB} {BOB} {BOB} '
                     '(("Alice" NIL "alice" "example.org")) NIL NIL NIL NIL)',
    "nested3.eml": f'("Sun, 07 Jan 2024 10:00:00 +0000" "nested" {A} {A} {A} '
                   '((NIL NIL "b" "example.com")) NIL NIL NIL NIL)',
    "unclosed.eml": f'(NIL "truncated" {A} {A} {A} NIL NIL NIL NIL NIL)',
    "no-boundary.eml": f'(NIL "boundary missing" {A} {A} {A} NIL NIL NIL NIL NIL)',
    "bad-content-type.eml": f'(NIL "bad types" {A} {A} {A} NIL NIL NIL NIL NIL)',
    "lf-only.eml": f'(NIL "unix line ends" {A} {A} {A} ((NIL NIL "b" "example.com")) NIL NIL NIL NIL)',
    # 8-bit header text goes out as literals (valid for IMAP4rev1 and UTF8=ACCEPT alike).
    "utf8-headers.eml": f'("Mon, 08 Jan 2024 07:00:00 +0100" {{17}}\r\nGrüße aus Köln '
                        f'{JOERG_UTF8} {JOERG_UTF8} {JOERG_UTF8} (({{4}}\r\nZoë NIL "zoe" "example.de")) '
                        'NIL NIL NIL NIL)',
    # Encoded words stay encoded, folded ones joined by the unfolding space.
    "encoded-words.eml": '("Mon, 08 Jan 2024 07:00:00 +0100" '
                         '"=?UTF-8?B?R3LDvMOfZQ==?= =?UTF-8?Q?_aus_K=C3=B6ln?=" '
                         f'{JOERG_ENCODED} {JOERG_ENCODED} {JOERG_ENCODED} '
                         '(("=?ISO-8859-1?B?WulyZQ==?=" NIL "zoe" "example.de")) NIL NIL NIL NIL)',
    # Empty Sender and Reply-To fall back to From; groups get start/end markers.
    "groups.eml": f'("Tue, 09 Jan 2024 10:00:00 +0000" "groups" {REAL_NAME} {REAL_NAME} {REAL_NAME} '
                  '((NIL NIL "team" NIL)(NIL NIL "ann" "example.com")("Ben B." NIL "ben" "example.com")'
                  '(NIL NIL NIL NIL)(NIL NIL "solo" "example.com")) '
                  '((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
                  '((NIL "@relay.example" "hidden" "example.com")) NIL NIL)',
    "no-content-type.eml": f'("1 Jan 1999 00:00:00 -0000" "no MIME at all" {OLD} {OLD} {OLD} NIL NIL NIL NIL NIL)',
    "digest.eml": f'(NIL "List digest, Vol 1, Issue 2" {LIST} {LIST} {LIST} NIL NIL NIL NIL NIL)',
}

BODYSTRUCTURES = {
    "plain.eml": f'("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "7bit" 64 5 {EXT})',
    "alternative.eml": '(("text" "plain" ("charset" "UTF-8") NIL NIL "quoted-printable" 122 3 NIL NIL NIL NIL)'
                       '("text" "html" ("charset" "UTF-8") NIL NIL "quoted-printable" 74 1 NIL NIL NIL NIL) '
                       '"alternative" ("boundary" "----=_Part_17_1029384756.1719993600000") NIL NIL NIL)',
    # RFC 2231 continuations are joined and keep their charset'' form; encoded words stay.
    "mixed-attachment.eml": '(("text" "plain" ("charset" "ISO-8859-1") NIL NIL "8bit" 19 1 NIL NIL NIL NIL)'
                            '("application" "pdf" ("name" "=?UTF-8?Q?facture_d=C3=A9cembre.pdf?=") NIL NIL '
                            '"base64" 52 NIL '
                            '("attachment" ("size" "39" "filename*" "UTF-8\'\'facture%20d%C3%A9cembre.pdf")) NIL NIL) '
                            '"mixed" ("boundary" "b1_attach") NIL NIL NIL)',
    "related.eml": f'((("text" "plain" {ASCII} NIL NIL "7bit" 23 1 {EXT})'
                   f'("text" "html" {ASCII} NIL NIL "7bit" 66 1 {EXT}) '
                   '"alternative" ("boundary" "alt-boundary") NIL NIL NIL)'
                   '("image" "png" ("name" "logo.png") "<logo.123@example.com>" NIL "base64" 96 '
                   'NIL ("inline" ("filename" "logo.png")) NIL NIL) '
                   '"related" ("type" "multipart/alternative" "boundary" "rel-boundary") NIL NIL NIL)',
    "forwarded.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 12 1 {EXT})'
                     '("message" "rfc822" NIL NIL "Forwarded message" "7bit" 387 '
                     f'("Fri, 05 Jan 2024 11:00:00 +0000" "Lunch" {CAROL} {CAROL} {CAROL} {BOB} NIL NIL NIL '
                     '"<lunch@example.net>") '
                     f'(("text" "plain" {ASCII} NIL NIL "7bit" 16 1 {EXT})'
                     f'("text" "html" {ASCII} NIL NIL "7bit" 23 1 {EXT}) '
                     '"alternative" ("boundary" "inner") NIL NIL NIL) 19 NIL ("inline" NIL) NIL NIL) '
                     '"mixed" ("boundary" "outer") NIL NIL NIL)',
    "nested3.eml": f'(((("text" "plain" {ASCII} NIL NIL "7bit" 5 0 {EXT})'
                   f'("text" "html" {ASCII} NIL NIL "7bit" 11 0 {EXT}) '
                   '"alternative" ("boundary" "L3") NIL NIL NIL)'
                   '("image" "gif" NIL "<dot>" NIL "base64" 20 NIL NIL NIL NIL) '
                   '"related" ("boundary" "L2") NIL NIL NIL)'
                   '("application" "octet-stream" ("name" "data.bin") NIL NIL "base64" 4 NIL NIL NIL NIL) '
                   '"mixed" ("boundary" "L1") NIL NIL NIL)',
    # The last part runs to the end of the message.
    "unclosed.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 5 0 {EXT})'
                    f'("text" "plain" {ASCII} NIL NIL "7bit" 38 1 {EXT}) '
                    '"mixed" ("boundary" "xyz") NIL NIL NIL)',
    # No part at all: one empty text/plain, as Dovecot shows it.
    "no-boundary.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 0 0 {EXT}) '
                       '"mixed" ("boundary" "never-used") NIL NIL NIL)',
    # Invalid Content-Type and multipart without boundary: text/plain (RFC 2045 §5.2).
    "bad-content-type.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 10 0 {EXT})'
                            f'("text" "plain" {ASCII} NIL NIL "7bit" 10 0 {EXT})'
                            '("image" "jpeg" NIL NIL NIL "x-unknown" 5 NIL NIL NIL NIL)'
                            f'("text" "plain" {ASCII} NIL NIL "7bit" 28 0 {EXT}) '
                            '"mixed" ("boundary" "sep") NIL NIL NIL)',
    "lf-only.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 7 1 {EXT})'
                   f'("text" "plain" {ASCII} NIL NIL "base64" 8 0 {EXT}) '
                   '"mixed" ("boundary" "lf") NIL NIL NIL)',
    "utf8-headers.eml": f'("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 18 1 {EXT})',
    "encoded-words.eml": f'("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 30 1 {EXT})',
    "groups.eml": f'("text" "plain" {ASCII} NIL NIL "7bit" 6 1 {EXT})',
    "no-content-type.eml": f'("text" "plain" {ASCII} NIL NIL "7bit" 35 2 {EXT})',
    # Parts of a digest without Content-Type are messages (RFC 2046 §5.1.5).
    "digest.eml": '(("message" "rfc822" NIL NIL NIL "7bit" 53 '
                  f'(NIL "first" {ONE} {ONE} {ONE} NIL NIL NIL NIL NIL) '
                  f'("text" "plain" {ASCII} NIL NIL "7bit" 12 1 {EXT}) '
                  f'4 {EXT})("text" "plain" {ASCII} NIL NIL "7bit" 24 1 {EXT})'
                  '("message" "rfc822" NIL NIL NIL "7bit" 55 '
                  f'(NIL "second" {TWO} {TWO} {TWO} NIL NIL NIL NIL NIL) '
                  f'("text" "plain" {ASCII} NIL NIL "7bit" 13 1 {EXT}) '
                  f'4 {EXT}) "digest" ("boundary" "dig") NIL NIL NIL)',
}

BODIES = {  # BODY (non-extended) for a few shapes
    "plain.eml": '("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "7bit" 64 5)',
    "no-boundary.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 0 0) "mixed")',
    "forwarded.eml": f'(("text" "plain" {ASCII} NIL NIL "7bit" 12 1)'
                     '("message" "rfc822" NIL NIL "Forwarded message" "7bit" 387 '
                     f'("Fri, 05 Jan 2024 11:00:00 +0000" "Lunch" {CAROL} {CAROL} {CAROL} {BOB} NIL NIL NIL '
                     '"<lunch@example.net>") '
                     f'(("text" "plain" {ASCII} NIL NIL "7bit" 16 1)("text" "html" {ASCII} NIL NIL "7bit" 23 1) '
                     '"alternative") 19) "mixed")',
}


def test_corpus_is_complete() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.eml")) == sorted(ENVELOPES) == sorted(BODYSTRUCTURES)


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_envelope_golden(name: str) -> None:
    assert render_envelope(parse_structure(sample(name))) == ENVELOPES[name].encode()


@pytest.mark.parametrize("name", sorted(BODYSTRUCTURES))
def test_bodystructure_golden(name: str) -> None:
    assert render_bodystructure(parse_structure(sample(name)), extended=True) == BODYSTRUCTURES[name].encode()


@pytest.mark.parametrize("name", sorted(BODIES))
def test_body_golden(name: str) -> None:
    assert render_bodystructure(parse_structure(sample(name)), extended=False) == BODIES[name].encode()


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_json_round_trip(name: str) -> None:
    structure = parse_structure(sample(name))
    stored = json.loads(json.dumps(structure.to_json()))
    assert MessageStructure.from_json(stored) == structure


def test_json_rejects_other_formats() -> None:
    with pytest.raises(ValueError):
        MessageStructure.from_json({"v": 999, "size": 0, "root": {}})
    with pytest.raises(ValueError):
        MessageStructure.from_json({"v": 1, "size": 0, "root": {"type": "text"}})


def test_offsets_of_a_forwarded_message() -> None:
    data = sample("forwarded.eml")
    root = parse_structure(data).root
    forwarded = root.parts[1]
    message = forwarded.parts[0]
    assert data[forwarded.header_start:forwarded.header_end].startswith(b"Content-Type: message/rfc822\r\n")
    assert message.header_start == forwarded.header_end and message.body_end == forwarded.body_end
    assert data[message.header_start:message.header_end].startswith(b"From: Carol")
    assert data[message.header_end:message.body_end].endswith(b"--inner--\r\n")
    assert data[forwarded.body_end:].startswith(b"\r\n--outer--")  # the line end belongs to the delimiter


# -- parsing details ------------------------------------------------------


def structure_of(text: str) -> BodyPart:
    return parse_structure(text.replace("\n", "\r\n").encode()).root


def test_latin1_header_bytes_become_utf8_literals() -> None:
    structure = parse_structure(b"Subject: Caf\xe9 cr\xe8me\r\nFrom: Ren\xe9 <r@example.fr>\r\n\r\nx")
    assert structure.envelope.subject == "Café crème"
    assert structure.envelope.from_ == (Address("René", None, "r", "example.fr"),)
    assert render_envelope(structure).startswith("(NIL {12}\r\nCafé crème (({5}\r\nRené NIL".encode())


def test_header_without_body_or_blank_line() -> None:
    root = parse_structure(b"Subject: only a header").root
    assert (root.header_start, root.header_end, root.body_end, root.lines) == (0, 22, 22, 0)
    assert parse_structure(b"").root.size == 0


def test_message_starting_with_blank_line_has_empty_header() -> None:
    root = parse_structure(b"\r\nbody\r\n").root
    assert (root.header_end, root.size, root.lines) == (2, 6, 1)


def test_boundary_lines_allow_transport_padding_and_reject_other_text() -> None:
    root = structure_of('Content-Type: multipart/mixed; boundary="b"\n\n--b \t\nA: 1\n\none\n--b-not\n--b--  \n')
    assert len(root.parts) == 1
    assert root.parts[0].lines == 1  # "one\n--b-not" is body text


def test_outer_boundary_ends_unclosed_inner_multipart() -> None:
    root = structure_of(
        'Content-Type: multipart/mixed; boundary="outer"\n\n--outer\n'
        'Content-Type: multipart/alternative; boundary="inner"\n\n--inner\n\nin\n'
        '--outer\n\nsecond\n--outer--\n'
    )
    inner, second = root.parts
    assert [len(inner.parts), inner.parts[0].size, second.size] == [1, 2, 6]


def test_same_boundary_nested_resolves_innermost_first() -> None:
    root = structure_of(
        'Content-Type: multipart/mixed; boundary="x"\n\n--x\n'
        'Content-Type: multipart/mixed; boundary="x"\n\n--x\n\ninner\n--x--\n--x\n\nouter 2\n--x--\n'
    )
    assert [len(part.parts) for part in root.parts] == [1, 0]


def test_delimiter_line_end_is_not_shared_with_the_next_boundary() -> None:
    root = structure_of(
        'Content-Type: multipart/mixed; boundary="a"\n\n--a\n'
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\n--a--\n'
    )
    inner = root.parts[0]
    assert inner.parts[0].size == 0
    assert inner.parts[0].header_start == inner.body_end  # the empty part ends where "--a--" starts


def test_boundary_in_a_part_header_ends_the_header() -> None:
    root = structure_of('Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/html\n--b--\n')
    part = root.parts[0]
    assert (part.subtype, part.size) == ("html", 0)
    assert part.header_end - part.header_start == len("Content-Type: text/html")


def test_preamble_and_epilogue_are_in_the_multipart_body_only() -> None:
    data = sample("mixed-attachment.eml")
    root = parse_structure(data).root
    assert data[root.header_end:].startswith(b"This is a multi-part message")
    assert data[root.parts[0].header_start:].startswith(b"Content-Type: text/plain")


def test_content_fields_first_occurrence_wins_and_names_are_case_insensitive() -> None:
    part = structure_of("CONTENT-TYPE: Text/HTML; CharSet=Latin1\ncontent-type: image/png\n\nx")
    assert (part.type, part.subtype, part.params) == ("Text", "HTML", (("CharSet", "Latin1"),))


def test_transfer_encoding_must_be_one_token() -> None:
    assert structure_of("Content-Transfer-Encoding: BASE64 (comment)\n\nx").encoding == "BASE64"
    assert structure_of("Content-Transfer-Encoding: ?invalid\n\nx").encoding is None
    assert structure_of("Content-Transfer-Encoding: base64 junk\n\nx").encoding is None


def test_message_rfc822_without_body() -> None:
    root = structure_of('Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: message/rfc822\n--b--\n')
    forwarded = root.parts[0]
    assert forwarded.is_message and forwarded.parts[0].size == 0
    body = render_bodystructure(MessageStructure(0, forwarded), extended=False)
    empty_envelope = "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    empty_body = f'("text" "plain" {ASCII} NIL NIL "7bit" 0 0)'
    expected = f'("message" "rfc822" NIL NIL NIL "7bit" 0 {empty_envelope} {empty_body} 0)'
    assert body == expected.encode()


def test_top_level_message_rfc822() -> None:
    root = structure_of("Content-Type: Message/RFC822\n\nSubject: inner\n\nhi\n")
    assert root.is_message
    assert root.parts[0].envelope == Envelope(subject="inner")


def test_content_language_and_location() -> None:
    part = structure_of("Content-Language: en-GB (British), fr\nContent-Location:\n http://example.com/a\n\nx")
    assert part.language == ("en-GB", "fr")
    assert part.location == "http://example.com/a"


def test_nul_in_header_is_replaced() -> None:
    assert parse_structure(b"Subject: a\0b\r\n\r\n").envelope.subject == "a\ufffdb"


# -- encoding helpers -----------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("user@domain", [(None, None, "user", "domain")]),
    ("<user@domain>", [(None, None, "user", "domain")]),
    ("foo bar <user@domain>", [("foo bar", None, "user", "domain")]),
    ('"foo \\"bar\\"" <user@domain>', [('foo "bar"', None, "user", "domain")]),
    ("<@route:user@domain>", [(None, "@route", "user", "domain")]),
    ("hello <@r1, @r2:user@domain>", [("hello", "@r1,@r2", "user", "domain")]),
    ("user@domain (the (nested) name)", [("the (nested) name", None, "user", "domain")]),
    ("John Q. Public <jqp@example.com>", [("John Q. Public", None, "jqp", "example.com")]),
    ('"john doe"@example.com', [(None, None, "john doe", "example.com")]),
    ("first . last @ example . com", [(None, None, "first.last", "example.com")]),
    ("user@[192.0.2.1]", [(None, None, "user", "[192.0.2.1]")]),
    # RFC 3501: a NIL host would read as a group marker, so missing parts are named.
    ("hello <user>", [("hello", None, "user", "MISSING_DOMAIN")]),
    ("@domain", [(None, None, "MISSING_MAILBOX", "domain")]),
    ("<>", [(None, None, "MISSING_MAILBOX", "MISSING_DOMAIN")]),
    ("John Smith", [(None, None, "John Smith", "MISSING_DOMAIN")]),
    ("a@b,, ,c@d,", [(None, None, "a", "b"), (None, None, "c", "d")]),
    ("", []),
    ("(just a comment)", []),
    ("g: ;", [(None, None, "g", None), (None, None, None, None)]),
    ("g: a@b", [(None, None, "g", None), (None, None, "a", "b"), (None, None, None, None)]),
    ("broken <a@b", [("broken", None, "a", "b")]),
    ('"unterminated <a@b>', [(None, None, "unterminated <a@b>", "MISSING_DOMAIN")]),
])
def test_parse_addresses(text: str, expected: list[tuple[Any, ...]]) -> None:
    assert list(parse_addresses(text)) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ('text/plain; charset="us-ascii"', ("text/plain", (("charset", "us-ascii"),))),
    ("text/plain;charset=utf-8;format=flowed", ("text/plain", (("charset", "utf-8"), ("format", "flowed")))),
    ('a/b; x="semi;colon \\"q\\""; y=2', ("a/b", (("x", 'semi;colon "q"'), ("y", "2")))),
    ("multipart/mixed; boundary=----=_Part_1", ("multipart/mixed", (("boundary", "----=_Part_1"),))),
    ("a/b; name=my file.pdf", ("a/b", (("name", "my file.pdf"),))),
    ("a/b; novalue; =x; bad name=1; ok=1", ("a/b", (("ok", "1"),))),
    ("a/b (comment); x=1", ("a/b", (("x", "1"),))),
    # RFC 2231 §3: continuations, in any order.
    ('a/b; n*1="def"; n*0="abc"', ("a/b", (("n", "abcdef"),))),
    # RFC 2231 §4: extended values keep their charset and %-encoding under "n*".
    ("a/b; n*=utf-8'en'%C3%A9", ("a/b", (("n*", "utf-8'en'%C3%A9"),))),
    ("a/b; n*0*=utf-8''%C3; n*1*=%A9; n*2=50%", ("a/b", (("n*", "utf-8''%C3%A950%25"),))),
    ("a/b; n*0=50%; n*1*=%41", ("a/b", (("n*", "''50%25%41"),))),
    # A missing index: the pieces stay as they were sent.
    ("a/b; n*0=a; n*2=c", ("a/b", (("n*0", "a"), ("n*2", "c")))),
    ("a/b; z=1; n*0=a; y=2", ("a/b", (("z", "1"), ("y", "2"), ("n", "a")))),
])
def test_parse_mime_value(text: str, expected: tuple[str, tuple[tuple[str, str], ...]]) -> None:
    assert parse_mime_value(text) == expected


def test_header_text_unfolds_and_decodes() -> None:
    assert header_text(b" a\r\n b\n\tc \r") == "a b\tc"
    assert header_text("Grüße".encode()) == "Grüße"
    assert header_text(b"\xff\xfe") == "\xff\xfe"  # not UTF-8: Latin-1
    assert for_humans("  a \t b  ") == "a b"


def test_tokenize_handles_unterminated_constructs() -> None:
    assert [t.kind for t in tokenize('a (b "c')] == ["atom", "comment"]
    assert [t.kind for t in tokenize('"a\\')] == ["quoted"]
    assert [t.text for t in tokenize("[1.2")] == ["[1.2"]


@pytest.mark.parametrize(("data", "expected"), [
    (b"aGVsbG8=", b"hello"),
    (b"aGVs\r\nbG8", b"hello"),  # no padding
    (b"aGV*sbG8=\r\n", b"hello"),  # junk ignored
    (b"aGk=aGk=", b"hihi"),  # concatenated encodings
    (b"aGVsbG8=x", b"hello"),  # a lone trailing sextet
    (b"", b""),
])
def test_decode_base64_is_lenient(data: bytes, expected: bytes) -> None:
    assert decode_base64(data) == expected


def test_decode_transfer() -> None:
    assert decode_transfer(b"a=3Db=\r\nc", "Quoted-Printable") == b"a=bc"
    assert decode_transfer(b"\x00\xff", "BINARY") == b"\x00\xff"
    assert decode_transfer(b"x", None) == b"x"
    with pytest.raises(ValueError):
        decode_transfer(b"x", "x-uuencode")


# -- IMAP syntax checker --------------------------------------------------


class Syntax(Exception):
    pass


def parse_imap(data: bytes) -> Any:
    """One IMAP value (list, nstring, number) that must span `data` exactly."""
    value, position = _value(data, 0)
    if position != len(data):
        raise Syntax(f"trailing bytes at {position}")
    return value


def _value(data: bytes, position: int) -> tuple[Any, int]:
    char = data[position:position + 1]
    if char == b"(":
        return _parenthesised(data, position + 1)
    if char == b'"':
        end, text = position + 1, bytearray()
        while data[end:end + 1] != b'"':
            byte = data[end:end + 1]
            if byte in (b"", b"\r", b"\n") or byte[0] >= 0x80:
                raise Syntax("bad quoted string")
            if byte == b"\\":
                end += 1
                if data[end:end + 1] not in (b'"', b"\\"):
                    raise Syntax("bad escape")
            text += data[end:end + 1]
            end += 1
        return text.decode(), end + 1
    if char == b"{":
        close = data.index(b"}\r\n", position)
        size = int(data[position + 1:close])
        start = close + 3
        if len(data) < start + size or b"\0" in data[start:start + size]:
            raise Syntax("bad literal")
        return data[start:start + size].decode(), start + size
    if data.startswith(b"NIL", position):
        return None, position + 3
    end = position
    while data[end:end + 1].isdigit():
        end += 1
    if end == position:
        raise Syntax(f"unexpected {char!r} at {position}")
    return int(data[position:end]), end


def _parenthesised(data: bytes, position: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while data[position:position + 1] != b")":
        if items:
            if data[position:position + 1] == b" ":
                position += 1
            elif not (isinstance(items[-1], list) and data[position:position + 1] == b"("):
                raise Syntax(f"missing space at {position}")  # only body lists may touch
        item, position = _value(data, position)
        items.append(item)
    if not items:
        raise Syntax("empty list")
    return items, position + 1


def check_body(body: Any, extended: bool) -> None:
    """RFC 9051 §9 body: body-type-mpart or body-type-1part, with or without extension data."""
    assert isinstance(body, list)
    if isinstance(body[0], list):
        count = next(i for i, item in enumerate(body) if not isinstance(item, list))
        for child in body[:count]:
            check_body(child, extended)
        assert isinstance(body[count], str)
        check_extension(body[count + 1:], extended, first=check_params)
        return
    kind, subtype, params, content_id, description, encoding, size, *rest = body
    for value in (kind, subtype, encoding):
        assert isinstance(value, str)
    check_params(params)
    check_nstring(content_id)
    check_nstring(description)
    assert isinstance(size, int)
    if (kind.lower(), subtype.lower()) == ("message", "rfc822"):
        envelope, inner, lines, *rest = rest
        check_envelope(envelope)
        check_body(inner, extended)
        assert isinstance(lines, int)
    elif kind.lower() == "text":
        lines, *rest = rest
        assert isinstance(lines, int)
    check_extension(rest, extended, first=check_nstring)


def check_extension(rest: list[Any], extended: bool, first: Any) -> None:
    """body-ext-mpart (parameters first) or body-ext-1part (MD5 first), then disposition, language, location."""
    if not extended:
        assert rest == []
        return
    assert len(rest) == 4
    first(rest[0])
    check_disposition(rest[1])
    check_language(rest[2])
    check_nstring(rest[3])


def check_nstring(value: Any) -> None:
    assert value is None or isinstance(value, str)


def check_params(value: Any) -> None:
    assert value is None or (isinstance(value, list) and len(value) % 2 == 0
                             and all(isinstance(item, str) for item in value))


def check_disposition(value: Any) -> None:
    assert value is None or (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str))
    if value is not None:
        check_params(value[1])


def check_language(value: Any) -> None:
    assert value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value))


def check_envelope(envelope: Any) -> None:
    assert isinstance(envelope, list) and len(envelope) == 10
    for value in envelope[:2] + envelope[8:]:
        check_nstring(value)
    for addresses in envelope[2:8]:
        assert addresses is None or isinstance(addresses, list)
        depth = 0
        for address in addresses or []:
            assert isinstance(address, list) and len(address) == 4
            for value in address:
                check_nstring(value)
            if address[3] is None:  # group start (mailbox set) or end (all NIL)
                depth += 1 if address[2] is not None else -1
                assert depth in (0, 1)
        assert depth == 0


# -- properties -----------------------------------------------------------

FRAGMENTS = [
    b"Content-Type: multipart/mixed; boundary=a\r\n", b"Content-Type: multipart/digest; boundary=b\r\n",
    b"Content-Type: multipart/alternative; boundary=a\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset*0*=utf-8''%C3; charset*1*=%A9\r\n", b"Content-Type: text\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: x-what\r\n",
    b"Content-Disposition: attachment; filename=\"a\\\"b\"\r\n", b"Content-Language: en, \xff\r\n",
    b"From: A <a@b>, g: c@d;\r\n", b"To: (c) <@r:x@y>, \"q\r\n", b"Subject: \xc3\xa9\x00\r\n", b" folded\r\n",
    b"--a\r\n", b"--a--\r\n", b"--b\r\n", b"--b--\r\n", b"\r\n", b"\n", b"--a", b"text\r\n", b"QUJD\r\n",
]
mime_like = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=12), max_size=40).map(b"".join)

LEAF_HEADERS = [
    b"", b"Content-Type: text/plain\r\n", b"Content-Type: text/html; charset=utf-8\r\n",
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\nContent-ID: <i>\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E2%82; filename*1*=%AC\r\n",
    b"From: =?utf-8?q?A?= <a@b>\r\nTo: g: x@y;\r\nSubject: s\r\n",
]
leaf = st.tuples(st.sampled_from(LEAF_HEADERS), st.sampled_from([b"", b"text\r\n", b"--a\r\n", b"QUJD"]))


@st.composite
def multipart(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    boundary = draw(st.sampled_from([b"a", b"b", b"c"]))  # repeats nest the same boundary
    subtype = draw(st.sampled_from([b"mixed", b"digest", b"alternative"]))
    body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child in draw(st.lists(children, max_size=3)))
    close = b"--" + boundary + b"--\r\n" if draw(st.booleans()) else b""
    return b"Content-Type: multipart/%s; boundary=%s\r\n\r\npreamble\r\n%s%sepilogue\r\n" % (
        subtype, boundary, body, close)


def message(child: bytes) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + child


mime_tree = st.recursive(
    leaf.map(lambda pair: pair[0] + b"\r\n" + pair[1]),
    lambda children: multipart(children) | children.map(message),
    max_leaves=12,
)


@st.composite
def damaged(draw: st.DrawFn, messages: st.SearchStrategy[bytes]) -> bytes:
    """A message, maybe with LF line ends, a slice cut out, or junk spliced in."""
    data = draw(messages)
    if draw(st.booleans()):
        data = data.replace(b"\r\n", b"\n")
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    return data[:start] + draw(st.sampled_from([data[start:end], b"", b"\r\n--", b"\x00\xff"])) + data[end:]


def walk(part: BodyPart) -> list[BodyPart]:
    return [part] + [descendant for child in part.parts for descendant in walk(child)]


def check_offsets(data: bytes, part: BodyPart) -> None:
    assert part.header_start <= part.header_end <= part.body_end
    assert part.lines == data.count(b"\n", part.header_end, part.body_end)
    previous = part.header_end
    for child in part.parts:
        assert previous <= child.header_start and child.body_end <= part.body_end
        previous = child.body_end
        check_offsets(data, child)
    if part.is_message:
        assert len(part.parts) == 1 and part.parts[0].header_start == part.header_end


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | mime_like | damaged(mime_tree))
def test_any_bytes_parse_and_render_valid_imap(data: bytes) -> None:
    structure = parse_structure(data)
    assert structure.size == len(data) and structure.root.body_end == len(data)
    check_offsets(data, structure.root)
    assert MessageStructure.from_json(json.loads(json.dumps(structure.to_json()))) == structure
    check_envelope(parse_imap(render_envelope(structure)))
    check_body(parse_imap(render_bodystructure(structure, extended=True)), extended=True)
    check_body(parse_imap(render_bodystructure(structure, extended=False)), extended=False)


@given(st.text(max_size=80))
def test_any_address_text_parses(text: str) -> None:
    for address in parse_addresses(text):
        assert address == (None, None, None, None) or address[2] is not None


# -- limits and performance -----------------------------------------------


def test_deep_nesting_is_capped() -> None:
    levels = 3 * MAX_DEPTH
    data = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(levels))
    data += b"\r\ndeep\r\n"
    structure = parse_structure(data)
    depth, part = 1, structure.root
    while part.parts:
        depth, part = depth + 1, part.parts[0]
    assert depth == MAX_DEPTH + 1
    assert (part.type, part.subtype) == ("application", "octet-stream")
    check_body(parse_imap(render_bodystructure(structure, extended=True)), extended=True)


def test_deep_message_nesting_is_capped() -> None:
    data = b"Content-Type: message/rfc822\r\n\r\n" * (2 * MAX_DEPTH) + b"\r\nend"
    structure = parse_structure(data)
    assert len(walk(structure.root)) == MAX_DEPTH + 1
    check_body(parse_imap(render_bodystructure(structure, extended=True)), extended=True)


def test_part_count_is_capped() -> None:
    count = MAX_PARTS + 500
    data = b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + b"--p\r\n\r\nx\r\n" * count + b"--p--\r\n"
    started = time.perf_counter()
    structure = parse_structure(data)
    assert time.perf_counter() - started < 5
    assert len(walk(structure.root)) == MAX_PARTS
    assert structure.root.body_end == len(data)


def test_many_dash_lines_stay_cheap() -> None:
    body = b"--not-a-boundary\r\n" * 200_000
    data = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\n' + body + b"--b--\r\n"
    started = time.perf_counter()
    structure = parse_structure(data)
    assert time.perf_counter() - started < 5
    assert structure.root.parts[0].size == len(body) - 2


def big_message(attachment_size: int) -> bytes:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    return (
        b"From: a@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="big"\r\n\r\n'
        b"--big\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n"
        b'--big\r\nContent-Type: application/zip; name="a.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + line * (attachment_size // len(line)) + b"--big--\r\n"
    )


def test_twenty_megabytes_parse_fast_without_copying() -> None:
    data = big_message(20 * 1024 * 1024)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        structure = parse_structure(data)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert structure.root.parts[1].size > 20_000_000
    assert elapsed < 2, elapsed  # typically a few tens of milliseconds
    assert peak < 1024 * 1024, peak  # offsets only: the body is never copied


BIG_BODY = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n" * 65_000  # 5 MB


@pytest.mark.parametrize("data", [
    b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(90))
    + b"\r\n" + BIG_BODY,
    b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
    + b"Content-Type: message/rfc822\r\n\r\n" * 98 + b"\r\n" + BIG_BODY + b"\r\n--o--\r\n",
    b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + b"--p\r\nX: y\r\n" * 9_000 + b"--p\r\n\r\n" + BIG_BODY,
    b"X: no blank line\r\n" + BIG_BODY,
], ids=["nested multiparts", "nested messages", "header-only parts", "header only"])
def test_hostile_shapes_scan_each_byte_once(data: bytes) -> None:
    started = time.perf_counter()
    parse_structure(data)
    assert time.perf_counter() - started < 1  # about 0.05 s; rescanning per level would take seconds


def test_parse_time_grows_linearly() -> None:
    def timed(size: int) -> float:
        data = big_message(size)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            parse_structure(data)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = timed(1024 * 1024), timed(8 * 1024 * 1024)
    assert large < 8 * small * 3 + 0.05  # generous: linear with noise, far from quadratic
