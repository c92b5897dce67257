"""The session's pure parts: message numbers and UIDs, LIST patterns, SEARCH evaluation, responses."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runbox_mta.imap import commands as c
from runbox_mta.imap.responses import flag_list, mailbox_name, tagged
from runbox_mta.imap.search import Candidate, Scope, matches, needs_body, uses_modseq
from runbox_mta.imap.search_keys import parse_search_program
from runbox_mta.imap.sequence import SequenceSet
from runbox_mta.imap.session_mailbox import _matches
from runbox_mta.imap.session_messages import _esearch
from runbox_mta.imap.session_state import MailboxView, Refused
from runbox_mta.imap.syntax import Reader
from runbox_mta.imap.wire import RawCommand
from runbox_mta.store.blobs import parse_metadata
from runbox_mta.store.mailstore import MessageRow


def view(uids: list[int]) -> MailboxView:
    return MailboxView(1, "INBOX", 7, False, uids, 1, set())


@pytest.mark.parametrize("text, uid, expected", [
    ("1:*", False, [3, 5, 9]),
    ("2", False, [5]),
    ("*:2", False, [5, 9]),
    ("1:4", True, [3]),
    ("*", True, [9]),
    ("6:100", True, [9]),
    ("10:*", True, [9]),  # RFC 9051 §6.4.8: n:* always includes the largest UID
    ("20", True, []),
])
def test_view_select(text, uid, expected):
    assert view([3, 5, 9]).select(SequenceSet.parse(text), uid) == expected


def test_view_select_refuses_a_number_past_the_end():
    with pytest.raises(Refused):
        view([3, 5, 9]).select(SequenceSet.parse("4"), uid=False)
    assert view([]).select(SequenceSet.parse("1:*"), uid=True) == []


def test_view_numbers():
    mailbox = view([3, 5, 9])
    assert [mailbox.number(uid) for uid in (3, 5, 9, 4, 10)] == [1, 2, 3, None, None]
    assert mailbox.numbers([1, 3, 4, 9, 10]) == [1, 3] and mailbox.numbers([]) == []


@pytest.mark.parametrize("reference, pattern, name, expected", [
    ("", "*", "a/b/c", True),
    ("", "%", "a/b", False),
    ("", "a/%", "a/b", True),
    ("", "a/%", "a/b/c", False),
    ("a/", "%", "a/b", True),
    ("", "inbox", "INBOX", True),
    ("", "INBOX*", "INBOX/x", True),
    ("", "Inb*", "INBOX", False),  # only INBOX itself is case-insensitive
    ("", "x.y", "xzy", False),  # no regex leaks through
])
def test_list_patterns(reference, pattern, name, expected):
    assert _matches(reference, pattern, name) is expected


MESSAGE = (b"From: =?utf-8?q?J=C3=B8rn?= <j@example.net>\r\nSubject: Quarterly report\r\n"
           b"Date: Tue, 5 Mar 2024 23:30:00 -0500\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nBl=C3=A5b=C3=A6r pie\r\n")


def candidate(data: bytes = MESSAGE, flags: frozenset[str] = frozenset({"\\Seen", "$Work"}), *,
              stored_header: bool = False) -> Candidate:
    """A message as SEARCH gets it: with the searchable header stored at delivery (and the bytes
    only if a body key needs them), or, stored before headers were kept, with its bytes."""
    search_header = parse_metadata(data).search_header if stored_header else None
    row = MessageRow(uid=7, modseq=12, flags=flags, internal_date=datetime(2024, 3, 6, 4, 30, tzinfo=UTC),
                     size=len(data), parsed=None, data=data, search_header=search_header)
    return Candidate(2, row)


def key(text: str) -> c.SearchKey:
    return parse_search_program(Reader(RawCommand("t", "SEARCH", (text.encode(),)), utf8=True))[1]


@pytest.mark.parametrize("text, expected", [
    ("ALL", True), ("SEEN", True), ("UNSEEN", False), ("KEYWORD $work", True), ("NEW", False), ("OLD", True),
    ("FROM jørn", True), ("FROM nobody", False), ("SUBJECT QUARTERLY", True), ('HEADER Subject ""', True),
    ("BODY blåbær", True), ("TEXT report", True), ("TEXT pie", True), ("BODY report", False),
    ("SENTON 5-Mar-2024", True), ("ON 6-Mar-2024", True), ("BEFORE 6-Mar-2024", False), ("SINCE 6-Mar-2024", True),
    ("LARGER 10 SMALLER 100000", True), ("UID 7", True), ("UID 1:6", False), ("2", True), ("*", False),
    ("OR UNSEEN NOT DELETED", True), ("MODSEQ 12", True), ("MODSEQ 13", False),
])
@pytest.mark.parametrize("stored_header", [True, False])
def test_search_matches(text, expected, stored_header):
    assert matches(key(text), candidate(stored_header=stored_header), Scope(largest_number=3, largest_uid=9)) \
        is expected


def test_search_reads_bodies_only_for_body_keys():
    assert not needs_body(key("SEEN OR UID 1 LARGER 5"))
    assert not needs_body(key("NOT SUBJECT x")) and not needs_body(key("SENTSINCE 1-Jan-2020"))
    assert needs_body(key("BODY x")) and needs_body(key("OR SEEN TEXT x"))


def test_header_keys_match_the_stored_header_without_the_bytes():
    stored = candidate(stored_header=True)
    header_only = Candidate(2, stored.row._replace(data=None))
    for text, expected in (("FROM jørn", True), ("FROM J@EXAMPLE.NET", True), ("SUBJECT report", True),
                           ("SUBJECT pie", False), ("HEADER content-type PLAIN", True), ("SENTBEFORE 6-Mar-2024", True),
                           ("HEADER X-From jørn", False)):
        assert matches(key(text), header_only, Scope(3, 9)) is expected, text


@pytest.mark.parametrize("stored_header", [True, False])
def test_search_survives_garbage_messages(stored_header):
    garbage = candidate(b"\xff\xfe: \x00\r\nDate: not a date\r\n\r\n\x80\x81", stored_header=stored_header)
    for text in ("TEXT x", "SENTBEFORE 1-Jan-2030", "HEADER Date x", "BODY x"):
        assert matches(key(text), garbage, Scope(3, 9)) is False


def test_esearch_response():
    command = c.Search("t1", True, key("ALL"))
    assert _esearch(command, [2, 3, 4, 9], ("MIN", "MAX", "COUNT", "ALL")) == \
        'ESEARCH (TAG "t1") UID MIN 2 MAX 9 COUNT 4 ALL 2:4,9'
    assert _esearch(command, [], ("MIN", "COUNT")) == 'ESEARCH (TAG "t1") UID COUNT 0'


def test_responses():
    assert tagged("a", "NO", "Nope.", "TRYCREATE") == b"a NO [TRYCREATE] Nope.\r\n"
    assert flag_list(["$b", "\\Seen", "\\Answered", "$a"]) == "(\\Answered \\Seen $a $b)"
    assert mailbox_name('Bl\u00e5 "x"', utf8=False) == '"Bl&AOU- \\"x\\""'
    assert mailbox_name("Bl\u00e5", utf8=True) == '"Bl\u00e5"'


def test_uses_modseq():
    assert uses_modseq(key("OR SEEN NOT MODSEQ 5")) and not uses_modseq(key("SEEN UID 1"))
