"""The searchable header: what SEARCH FROM/SUBJECT/HEADER/TEXT match, made once at delivery."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runbox_mta.imap.search_text import decode_words, field_contains, field_values, header_end, searchable_header


def test_one_line_per_field_unfolded_and_casefolded():
    data = (b"From: Alice Example\r\n <alice@example.net>\r\nSubject: Hello\r\n\tWorld\r\n"
            b"X-Empty:\r\nStra\xc3\x9fe: Gro\xc3\x9f\r\n\r\nFrom: not a header, the body\r\n")
    assert searchable_header(data) == ("from:alice example <alice@example.net>\nsubject:hello\tworld\n"
                                       "x-empty:\nstrasse:gross")


@pytest.mark.parametrize("raw, text", [
    ("=?utf-8?q?J=C3=B8rn_Hansen?= <j@example.net>", "Jørn Hansen <j@example.net>"),
    ("=?UTF-8?B?SsO4cm4=?=", "Jørn"),
    ("=?utf-8?q?a?= =?utf-8?q?b?=  c", "ab  c"),  # RFC 2047 §6.2: no space between adjacent words
    ("=?iso-8859-1*da?q?bl=E5?=", "blå"),  # RFC 2231 §5 language suffix
    ("=?x-unknown?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8
    ("=?utf-8?q?line=0Abreak?=", "line break"),
    ("=?utf-8?q?broken", "=?utf-8?q?broken"),
    ("plain text", "plain text"),
])
def test_encoded_words_are_decoded(raw, text):
    assert decode_words(raw) == text


def test_eight_bit_headers_are_utf8_or_latin1():
    assert searchable_header("Subject: Blåbær\r\n\r\n".encode()) == "subject:blåbær"
    assert searchable_header("Subject: Blåbær\r\n\r\n".encode("latin-1")) == "subject:blåbær"


def test_field_lookups_are_anchored_to_the_field_name():
    header = searchable_header(b"From: Bob <bob@example.net>\r\nX-From: eve\r\nReply-To: carol\r\n"
                               b"Date: Tue, 5 Mar 2024 23:30:00 -0500\r\nReceived: a\r\nReceived: b\r\n\r\n")
    assert field_contains(header, "FROM", "BOB") and not field_contains(header, "From", "eve")
    assert field_contains(header, "x-from", "") and not field_contains(header, "Cc", "")
    assert not field_contains(header, "From", "carol")  # another line's value
    assert field_contains(header, "Reply-To", "") and not field_contains(header, "To", "")
    assert field_values(header, "received") == ["a", "b"]
    assert field_values(header, "Date") == ["tue, 5 mar 2024 23:30:00 -0500"]
    assert not field_contains(header, "a.b", "") and not field_contains(header, "From", ".*")  # no regex leaks


@pytest.mark.parametrize("data, end", [
    (b"A: b\r\n\r\nbody", 8), (b"A: b\n\nbody", 6), (b"\r\nbody", 2), (b"A: b\r\n", 6), (b"", 0),
])
def test_header_end(data, end):
    assert header_end(data) == end


@given(st.binary(max_size=400))
def test_any_bytes_give_lines_of_text(data: bytes) -> None:
    header = searchable_header(data)
    assert "\0" not in header and "\r" not in header
    assert all(":" in line for line in header.split("\n") if header)
