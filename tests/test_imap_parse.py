"""IMAP command grammar: valid forms parse to the expected dataclasses,
invalid forms raise ParseError with a reply text that says what is wrong.
Commands are framed by the real Receiver, so literals are written inline
as non-synchronising {n+}."""

from __future__ import annotations

import contextlib
import itertools
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbox_mta.imap import utf7
from runbox_mta.imap.commands import (
    Append,
    AppendMessage,
    Authenticate,
    BadCharset,
    Capability,
    Check,
    Close,
    Command,
    CommandError,
    Compress,
    Copy,
    Create,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchBinarySize,
    FetchBody,
    FetchItem,
    GetQuota,
    GetQuotaRoot,
    Id,
    Idle,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    ParseError,
    QresyncParams,
    Rename,
    Search,
    Section,
    Select,
    SetQuota,
    Starttls,
    Status,
    Store,
    Subscribe,
    Unselect,
    Unsubscribe,
    parse_command,
)
from runbox_mta.imap.dates import DateError, format_date_time, parse_date, parse_date_time
from runbox_mta.imap.search_keys import (
    All,
    And,
    BodyContains,
    DateKey,
    HasFlag,
    HeaderContains,
    InSet,
    ModSeqKey,
    Not,
    Or,
    SizeKey,
    TextContains,
)
from runbox_mta.imap.sequence import SequenceSet, SequenceSetError, format_uid_set, numbers
from runbox_mta.imap.wire import RawCommand, Receiver

S = SequenceSet.parse
FAST = (FetchItem.FLAGS, FetchItem.INTERNALDATE, FetchItem.RFC822_SIZE)


def frame(line: bytes) -> RawCommand:
    rx = Receiver()
    rx.feed(line + b"\r\n")
    event = rx.next_event()
    assert isinstance(event, RawCommand), event
    return event


def parse(line: bytes, utf8: bool = False) -> Command:
    return parse_command(frame(line), utf8=utf8)


VALID: list[tuple[bytes, Command]] = [
    # any state, not authenticated
    (b"t CAPABILITY", Capability("t")),
    (b"t noop", Noop("t")),
    (b"t LOGOUT", Logout("t")),
    (b"t STARTTLS", Starttls("t")),
    (b"t LOGIN alice secret", Login("t", "alice", "secret")),
    (b't LOGIN "al ice" "p\\"w\\\\"', Login("t", "al ice", 'p"w\\')),
    (b"t LOGIN {5+}\r\nalice {3+}\r\np w", Login("t", "alice", "p w")),
    (b't LOGIN "\xc3\xa5lice" p]w', Login("t", "\u00e5lice", "p]w")),
    (b"t AUTHENTICATE plain", Authenticate("t", "PLAIN")),
    (b"t AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==", Authenticate("t", "PLAIN", b"\0alice\0secret")),
    (b"t AUTHENTICATE PLAIN =", Authenticate("t", "PLAIN", b"")),
    (b't ID ("name" "K-9 Mail" "version" NIL)', Id("t", (("name", "K-9 Mail"), ("version", None)))),
    (b"t ID NIL", Id("t", None)),
    (b"t ID ()", Id("t", ())),
    (b"t ENABLE QRESYNC condstore", Enable("t", ("QRESYNC", "CONDSTORE"))),
    (b"t COMPRESS deflate", Compress("t", "DEFLATE")),
    # authenticated
    (b"t SELECT inbox", Select("t", "INBOX")),
    (b"t EXAMINE INBOX", Select("t", "INBOX", readonly=True)),
    (b"t SELECT Drafts (CONDSTORE)", Select("t", "Drafts", condstore=True)),
    (b't SELECT "&ZeVnLIqe-"', Select("t", "\u65e5\u672c\u8a9e")),
    (b"t SELECT Tom&-Jerry", Select("t", "Tom&Jerry")),
    (b"t SELECT {5+}\r\nINBOX", Select("t", "INBOX")),
    (b"t SELECT INBOX (QRESYNC (67890007 90060115194045000))", Select("t", "INBOX", qresync=QresyncParams(
        67890007, 90060115194045000))),
    (b"t SELECT INBOX (QRESYNC (67890007 90060115194045000 41:211,214:541))", Select("t", "INBOX", qresync=(
        QresyncParams(67890007, 90060115194045000, S("41:211,214:541"))))),
    (b"t SELECT INBOX (QRESYNC (1 2 (1:3 4:6)))", Select("t", "INBOX", qresync=QresyncParams(
        1, 2, seq_match=(S("1:3"), S("4:6"))))),
    (b"t SELECT INBOX (CONDSTORE QRESYNC (1 2 5:9 (1,3 5,7)))", Select("t", "INBOX", True, QresyncParams(
        1, 2, S("5:9"), (S("1,3"), S("5,7"))))),
    (b"t CREATE Archive/2024", Create("t", "Archive/2024")),
    (b"t CREATE Sent (USE (\\sent))", Create("t", "Sent", ("\\Sent",))),
    (b"t CREATE Stuff (USE (\\Archive \\Junk))", Create("t", "Stuff", ("\\Archive", "\\Junk"))),
    (b"t CREATE Stuff (USE ())", Create("t", "Stuff")),
    (b"t DELETE Old", Delete("t", "Old")),
    (b"t RENAME Old \"New one\"", Rename("t", "Old", "New one")),
    (b"t SUBSCRIBE News", Subscribe("t", "News")),
    (b"t UNSUBSCRIBE News", Unsubscribe("t", "News")),
    (b"t NAMESPACE", Namespace("t")),
    (b"t IDLE", Idle("t")),
    (b't LIST "" *', List("t", "", ("*",))),
    (b"t LIST ~/Mail/ foo%]", List("t", "~/Mail/", ("foo%]",))),
    (b't LIST "" ("INBOX" Sent*)', List("t", "", ("INBOX", "Sent*"))),
    (b't LIST (SUBSCRIBED RECURSIVEMATCH) "" "*" RETURN (CHILDREN)', List(
        "t", "", ("*",), frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}), frozenset({"CHILDREN"}))),
    (b't LIST (special-use) "" "*" RETURN (SPECIAL-USE SUBSCRIBED)', List(
        "t", "", ("*",), frozenset({"SPECIAL-USE"}), frozenset({"SPECIAL-USE", "SUBSCRIBED"}))),
    (b't LIST "" % RETURN (STATUS (MESSAGES UNSEEN SIZE))', List(
        "t", "", ("%",), return_options=frozenset({"STATUS"}), status_items=("MESSAGES", "UNSEEN", "SIZE"))),
    (b't LIST () "" "*" RETURN ()', List("t", "", ("*",))),
    (b't LSUB "" "news.*"', Lsub("t", "", "news.*")),
    (b"t STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ APPENDLIMIT RECENT)", Status(
        "t", "INBOX", ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ",
                       "APPENDLIMIT", "RECENT"))),
    (b"t APPEND INBOX {5+}\r\nhello", Append("t", "INBOX", (AppendMessage(b"hello"),))),
    (b't APPEND Sent (\\Seen $Sent) " 7-Feb-1994 21:52:25 -0800" {2+}\r\nhi', Append("t", "Sent", (AppendMessage(
        b"hi", ("\\Seen", "$Sent"), datetime(1994, 2, 7, 21, 52, 25, tzinfo=timezone(timedelta(hours=-8)))),))),
    (b"t APPEND x () {1+}\r\na (\\Draft) {1+}\r\nb ~{2+}\r\n\x00c", Append("t", "x", (
        AppendMessage(b"a"), AppendMessage(b"b", ("\\Draft",)), AppendMessage(b"\x00c", binary=True)))),
    (b"t APPEND x UTF8 (~{3+}\r\n\xc3\xa9!)", Append("t", "x", (AppendMessage(b"\xc3\xa9!", binary=True),))),
    (b't GETQUOTA ""', GetQuota("t", "")),
    (b"t GETQUOTAROOT INBOX", GetQuotaRoot("t", "INBOX")),
    (b't SETQUOTA "" (STORAGE 512 message 1000)', SetQuota("t", "", (("STORAGE", 512), ("MESSAGE", 1000)))),
    (b't SETQUOTA "" ()', SetQuota("t", "", ())),
    # selected
    (b"t CHECK", Check("t")),
    (b"t CLOSE", Close("t")),
    (b"t UNSELECT", Unselect("t")),
    (b"t EXPUNGE", Expunge("t")),
    (b"t UID EXPUNGE 3000:3002,$", Expunge("t", S("3000:3002,$"))),
    (b"t COPY 2:4 Archive", Copy("t", False, S("2:4"), "Archive")),
    (b"t uid copy 4:2,* Trash", Copy("t", True, S("4:2,*"), "Trash")),
    (b"t MOVE $ Junk", Move("t", False, S("$"), "Junk")),
    (b"t UID MOVE 1:* INBOX", Move("t", True, S("1:*"), "INBOX")),
    (b"t STORE 2:4 +FLAGS (\\Deleted)", Store("t", False, S("2:4"), ("\\Deleted",), "+")),
    (b"t STORE 1 flags.silent \\seen $Label1", Store("t", False, S("1"), ("\\Seen", "$Label1"), "", True)),
    (b"t UID STORE 1:* -FLAGS.SILENT (\\Flagged)", Store("t", True, S("1:*"), ("\\Flagged",), "-", True)),
    (b"t STORE 1 (UNCHANGEDSINCE 12345) +FLAGS (\\Seen)", Store("t", False, S("1"), ("\\Seen",), "+",
                                                               unchangedsince=12345)),
    (b"t STORE 1 FLAGS ()", Store("t", False, S("1"), ())),
    (b"t FETCH 1 all", Fetch("t", False, S("1"), (*FAST, FetchItem.ENVELOPE))),
    (b"t FETCH 1 FAST", Fetch("t", False, S("1"), FAST)),
    (b"t FETCH 1 FULL", Fetch("t", False, S("1"), (*FAST, FetchItem.ENVELOPE, FetchItem.BODY))),
    (b"t FETCH 1 (ENVELOPE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT BODY BODYSTRUCTURE UID MODSEQ "
     b"INTERNALDATE flags)", Fetch("t", False, S("1"), (
         FetchItem.ENVELOPE, FetchItem.RFC822, FetchItem.RFC822_HEADER, FetchItem.RFC822_SIZE,
         FetchItem.RFC822_TEXT, FetchItem.BODY, FetchItem.BODYSTRUCTURE, FetchItem.UID, FetchItem.MODSEQ,
         FetchItem.INTERNALDATE, FetchItem.FLAGS))),
    (b"t FETCH 1 BODY[]", Fetch("t", False, S("1"), (FetchBody(),))),
    (b"t FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE \"FROM\")])", Fetch("t", False, S("2:4"), (
        FetchItem.FLAGS, FetchBody(Section(text="HEADER.FIELDS", fields=("DATE", "FROM"))),))),
    (b"t FETCH 1 BODY[header.fields.not (Received)]", Fetch("t", False, S("1"), (
        FetchBody(Section(text="HEADER.FIELDS.NOT", fields=("Received",))),))),
    (b"t FETCH 1 body.peek[1.2.TEXT]<0.2048>", Fetch("t", False, S("1"), (
        FetchBody(Section((1, 2), "TEXT"), peek=True, partial=(0, 2048)),))),
    (b"t FETCH 1 (BODY[4.2.MIME] BODY[3] BODY[HEADER] BODY[TEXT])", Fetch("t", False, S("1"), (
        FetchBody(Section((4, 2), "MIME")), FetchBody(Section((3,))), FetchBody(Section(text="HEADER")),
        FetchBody(Section(text="TEXT"))))),
    (b"t FETCH 1 (BINARY[] BINARY.PEEK[1]<0.100> BINARY.SIZE[2.1])", Fetch("t", False, S("1"), (
        FetchBody(binary=True), FetchBody(Section((1,)), True, (0, 100), True), FetchBinarySize((2, 1))))),
    (b"t FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)", Fetch("t", False, S("1:*"), (FetchItem.FLAGS,), 12345)),
    (b"t UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)", Fetch(
        "t", True, S("300:500"), (FetchItem.FLAGS,), 12345, True)),
    (b"t FETCH $ UID", Fetch("t", False, S("$"), (FetchItem.UID,))),
    (b"t SEARCH ALL", Search("t", False, All())),
    (b't SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"', Search("t", False, And((
        HasFlag("\\Flagged"), DateKey(False, "since", date(1994, 2, 1)), Not(HeaderContains("From", "Smith")))))),
    (b"t UID SEARCH CHARSET utf-8 TEXT {6+}\r\n\xc3\xa6\xc3\xb8\xc3\xa5", Search(
        "t", True, TextContains("\u00e6\u00f8\u00e5"), "UTF-8")),
    (b"t SEARCH OR (SEEN FLAGGED) 1:3", Search("t", False, Or(
        And((HasFlag("\\Seen"), HasFlag("\\Flagged"))), InSet(S("1:3"))))),
    (b"t SEARCH ((UID 5:*))", Search("t", False, InSet(S("5:*"), uid=True))),
    (b"t SEARCH $", Search("t", False, InSet(S("$")))),
    (b"t SEARCH RETURN (MAX MIN) UNSEEN", Search("t", False, Not(HasFlag("\\Seen")), return_options=("MIN", "MAX"))),
    (b"t SEARCH RETURN () ALL", Search("t", False, All(), return_options=("ALL",))),
    (b"t UID SEARCH RETURN (SAVE COUNT) CHARSET US-ASCII ALL", Search(
        "t", True, All(), "US-ASCII", ("COUNT", "SAVE"))),
    (b"t SEARCH MODSEQ 620162338", Search("t", False, ModSeqKey(620162338))),
    (b't SEARCH MODSEQ "/flags/\\\\draft" ALL 620162338', Search(
        "t", False, ModSeqKey(620162338, "/flags/\\draft", "all"))),
    (b't SEARCH HEADER Message-ID "<x@y>" BODY "" SENTON "1-feb-2024"', Search("t", False, And((
        HeaderContains("Message-ID", "<x@y>"), BodyContains(""), DateKey(True, "on", date(2024, 2, 1)))))),
    (b"t SEARCH KEYWORD $Forwarded UNKEYWORD Junk LARGER 1000 SMALLER 10", Search("t", False, And((
        HasFlag("$Forwarded"), Not(HasFlag("Junk")), SizeKey("larger", 1000), SizeKey("smaller", 10))))),
]

SEARCH_KEYS = [
    ("ANSWERED", HasFlag("\\Answered")), ("DELETED", HasFlag("\\Deleted")), ("DRAFT", HasFlag("\\Draft")),
    ("FLAGGED", HasFlag("\\Flagged")), ("SEEN", HasFlag("\\Seen")), ("RECENT", HasFlag("\\Recent")),
    ("UNANSWERED", Not(HasFlag("\\Answered"))), ("UNDELETED", Not(HasFlag("\\Deleted"))),
    ("UNDRAFT", Not(HasFlag("\\Draft"))), ("UNFLAGGED", Not(HasFlag("\\Flagged"))),
    ("UNSEEN", Not(HasFlag("\\Seen"))), ("NEW", And((HasFlag("\\Recent"), Not(HasFlag("\\Seen"))))),
    ("OLD", Not(HasFlag("\\Recent"))), ("ALL", All()),
    ("BCC x", HeaderContains("Bcc", "x")), ("CC x", HeaderContains("Cc", "x")),
    ("FROM x", HeaderContains("From", "x")), ("TO x", HeaderContains("To", "x")),
    ("SUBJECT x", HeaderContains("Subject", "x")), ("BODY x", BodyContains("x")), ("TEXT x", TextContains("x")),
    ("BEFORE 1-Jan-2000", DateKey(False, "before", date(2000, 1, 1))),
    ("ON 1-Jan-2000", DateKey(False, "on", date(2000, 1, 1))),
    ("SINCE 1-Jan-2000", DateKey(False, "since", date(2000, 1, 1))),
    ("SENTBEFORE 1-Jan-2000", DateKey(True, "before", date(2000, 1, 1))),
    ("SENTON 1-Jan-2000", DateKey(True, "on", date(2000, 1, 1))),
    ("SENTSINCE 1-Jan-2000", DateKey(True, "since", date(2000, 1, 1))),
    ("LARGER 5", SizeKey("larger", 5)), ("SMALLER 5", SizeKey("smaller", 5)),
    ("KEYWORD k", HasFlag("k")), ("UNKEYWORD k", Not(HasFlag("k"))),
    ("UID 1,2", InSet(S("1,2"), uid=True)), ("1,2", InSet(S("1,2"))), ("*", InSet(S("*"))),
    ("NOT SEEN", Not(HasFlag("\\Seen"))), ("OR SEEN 1", Or(HasFlag("\\Seen"), InSet(S("1")))),
    ("HEADER X-Spam yes", HeaderContains("X-Spam", "yes")), ("MODSEQ 0", ModSeqKey(0)),
    ("(SEEN)", HasFlag("\\Seen")),
]

INVALID: list[tuple[bytes, str]] = [
    (b"t FOO", "FOO: unknown command"),
    (b"t NOOP extra", "NOOP: unexpected characters after the last argument"),
    (b"t UID", "UID: expected a space"),
    (b"t UID FOO 1", "UID FOO: not a command"),
    (b"t UID LOGIN a b", "UID LOGIN: not a command"),
    (b"t LOGIN alice", "LOGIN: expected a space"),
    (b"t LOGIN alice  secret", "LOGIN: expected a password"),
    (b"t LOGIN (alice) secret", "LOGIN: expected a user name"),
    (b"t LOGIN {1+}\r\n\x00 x", "LOGIN: NUL in a literal (RFC 9051 §4.3); send binary data as literal8 ~{n}"),
    (b"t LOGIN ~{1+}\r\nx y", "LOGIN: literal8 (~{n}) is only allowed for APPEND data"),
    (b't LOGIN "\xff" x', "LOGIN: a user name is not valid UTF-8"),
    (b"t AUTHENTICATE", "AUTHENTICATE: expected a space"),
    (b"t AUTHENTICATE PLAIN !!!", "AUTHENTICATE: the initial response must be base64 or '='"),
    (b"t AUTHENTICATE PLAIN AGFsaWNl=", "AUTHENTICATE: the initial response must be base64 or '='"),
    (b"t ENABLE", "ENABLE: expected a capability name"),
    (b"t ID (\"name\")", "ID: expected a space"),
    (b"t SELECT", "SELECT: expected a space"),
    (b"t SELECT INBOX ()", "SELECT: expected a SELECT parameter"),
    (b"t SELECT INBOX (FOO)", "SELECT: unknown SELECT parameter"),
    (b"t SELECT INBOX (QRESYNC (0 1))", "SELECT: UIDVALIDITY out of range"),
    (b"t SELECT INBOX (QRESYNC (1 0))", "SELECT: a mod-sequence out of range"),
    (b"t SELECT INBOX (QRESYNC (1 2 1:*))", "SELECT: QRESYNC sets cannot use '*' or '$'"),
    (b"t SELECT INBOX (QRESYNC (1 2 1:5 (1:2)))", "SELECT: expected a space"),
    (b"t SELECT &AGE-", "SELECT: invalid mailbox name: non-canonical modified UTF-7"),
    (b"t SELECT &Jjo", "SELECT: invalid mailbox name: unterminated modified UTF-7 shift ('&' without '-')"),
    (b't SELECT "caf\xc3\xa9"', "SELECT: invalid mailbox name: 8-bit byte in a modified UTF-7 name "
                                "(send UTF-8 only after ENABLE UTF8=ACCEPT)"),
    (b"t CREATE x (USE (\\Bogus))", "CREATE: unknown special-use attribute"),
    (b"t CREATE x (FOO)", "CREATE: unknown CREATE parameter"),
    (b"t RENAME a", "RENAME: expected a space"),
    (b't LIST (RECURSIVEMATCH) "" *', "LIST: RECURSIVEMATCH needs another selection option"),
    (b't LIST (BOGUS) "" *', "LIST: unknown LIST selection option"),
    (b't LIST "" * RETURN (BOGUS)', "LIST: unknown LIST return option"),
    (b't LIST "" * FOO (CHILDREN)', "LIST: expected RETURN"),
    (b't LIST "" ()', "LIST: expected a pattern"),
    (b"t STATUS INBOX ()", "STATUS: expected a status item"),
    (b"t STATUS INBOX (BOGUS)", "STATUS: unknown status item"),
    (b"t STATUS INBOX MESSAGES", "STATUS: expected '(' to open status items"),
    (b"t APPEND INBOX", "APPEND: expected a space"),
    (b"t APPEND INBOX hello", "APPEND: expected a literal"),
    (b"t APPEND INBOX (\\Recent) {1+}\r\nx", "APPEND: invalid system flag"),
    (b"t APPEND INBOX {1+}\r\n\x00", "APPEND: NUL in a literal (RFC 9051 §4.3); send binary data as literal8 ~{n}"),
    (b't APPEND INBOX "31-Feb-2024 00:00:00 +0000" {1+}\r\nx', "APPEND: invalid date-time: day or year out of range"),
    (b't APPEND INBOX "1-Foo-2024 00:00:00 +0000" {1+}\r\nx', "APPEND: invalid date-time: unknown month 'Foo'"),
    (b"t APPEND INBOX {1+}\r\nx ", "APPEND: expected a literal"),
    (b"t STORE 1 FLAGS", "STORE: expected a space"),
    (b"t STORE 1 BOGUS (\\Seen)", "STORE: expected FLAGS, +FLAGS or -FLAGS"),
    (b"t STORE 0 FLAGS (\\Seen)", "STORE: 0 in sequence set (message numbers and UIDs start at 1)"),
    (b"t STORE 1 (FOO 1) FLAGS ()", "STORE: unknown STORE modifier"),
    (b"t STORE 1 FLAGS (\\Recent)", "STORE: invalid system flag"),
    (b"t FETCH 1", "FETCH: expected a space"),
    (b"t FETCH 1 (ALL)", "FETCH: unknown fetch attribute"),
    (b"t FETCH 1 ()", "FETCH: unknown fetch attribute"),
    (b"t FETCH 1 BODY[MIME]", "FETCH: MIME needs a part number"),
    (b"t FETCH 1 BODY[1.]", "FETCH: expected a section name after '.'"),
    (b"t FETCH 1 BODY[0]", "FETCH: invalid part number"),
    (b"t FETCH 1 BODY[BOGUS]", "FETCH: unknown section"),
    (b"t FETCH 1 BODY[HEADER.FIELDS]", "FETCH: expected a space"),
    (b"t FETCH 1 BODY[HEADER.FIELDS ()]", "FETCH: expected a header field name"),
    (b"t FETCH 1 BODY[]<0.0>", "FETCH: a partial length out of range"),
    (b"t FETCH 1 BODY.PEEK", "FETCH: unknown fetch attribute"),
    (b"t FETCH 1 BINARY[HEADER]", "FETCH: expected ']' to close the BINARY section"),
    (b"t FETCH 1 (FLAGS) (VANISHED)", "FETCH: VANISHED needs UID FETCH and CHANGEDSINCE"),
    (b"t UID FETCH 1 (FLAGS) (VANISHED)", "UID FETCH: VANISHED needs UID FETCH and CHANGEDSINCE"),
    (b"t FETCH 1 (FLAGS) (CHANGEDSINCE 0)", "FETCH: a mod-sequence out of range"),
    (b"t FETCH 1 (FLAGS) (BOGUS)", "FETCH: unknown fetch modifier"),
    (b"t FETCH 1:4294967296 FLAGS", "FETCH: number in sequence set exceeds 4294967295"),
    (b"t FETCH 1,,2 FLAGS", "FETCH: invalid item '' in sequence set"),
    (b"t FETCH 01 FLAGS", "FETCH: invalid item '01' in sequence set"),
    (b"t SEARCH", "SEARCH: expected a space"),
    (b"t SEARCH BOGUS", "SEARCH: unknown search key"),
    (b"t SEARCH FROM", "SEARCH: expected a space"),
    (b"t SEARCH SINCE 2024-02-01", "SEARCH: invalid date: expected a date such as 1-Feb-2024"),
    (b"t SEARCH (ALL", "SEARCH: expected ')' to close the search key group"),
    (b"t SEARCH " + b"NOT " * 70 + b"ALL", "SEARCH: search keys nested too deeply"),
    (b"t SEARCH " + b"(" * 70 + b"ALL" + b")" * 70, "SEARCH: search keys nested too deeply"),
    (b't SEARCH CHARSET US-ASCII TEXT "\xc3\xa9"', "SEARCH: non-ASCII search string with CHARSET US-ASCII"),
    (b"t SEARCH RETURN (PARTIAL 1:10) ALL", "SEARCH: unknown SEARCH return option"),
    (b't SEARCH MODSEQ "/flags/\\\\Seen" bogus 5', "SEARCH: MODSEQ entry type must be priv, shared or all"),
    (b"t SEARCH LARGER 99999999999999999999", "SEARCH: a size out of range"),
    (b't SETQUOTA "" (STORAGE)', "SETQUOTA: expected a space"),
    (b"t COPY 1:2", "COPY: expected a space"),
    (b"t UID EXPUNGE", "UID EXPUNGE: expected a space"),
]


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[line.decode("latin-1")[:60] for line, _ in VALID])
def test_valid_commands(line: bytes, expected: Command) -> None:
    assert parse(line) == expected


@pytest.mark.parametrize(("key", "expected"), SEARCH_KEYS, ids=[key for key, _ in SEARCH_KEYS])
def test_every_search_key(key: str, expected: object) -> None:
    assert parse(b"t SEARCH " + key.encode()) == Search("t", False, expected)  # type: ignore[arg-type]
    name, _, arguments = key.partition(" ")  # key names are case-insensitive, values are not
    lowered = f"{name.lower()} {arguments}".strip()
    assert parse(b"t SEARCH " + lowered.encode()) == Search("t", False, expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(("line", "message"), INVALID, ids=[line.decode("latin-1")[:60] for line, _ in INVALID])
def test_invalid_commands(line: bytes, message: str) -> None:
    with pytest.raises(ParseError) as raised:
        parse(line)
    assert str(raised.value) == message
    assert (raised.value.status, raised.value.code) == ("BAD", None)


def test_unsupported_charset_is_no_badcharset() -> None:
    with pytest.raises(BadCharset) as raised:
        parse(b"t SEARCH CHARSET ISO-8859-1 FROM x")
    assert (raised.value.status, raised.value.code) == ("NO", "BADCHARSET (UTF-8 US-ASCII)")
    assert isinstance(raised.value, CommandError) and not isinstance(raised.value, ParseError)


def test_utf8_accept_reads_mailbox_names_as_utf8() -> None:
    """RFC 6855 §3: after ENABLE UTF8=ACCEPT names are UTF-8 and '&' is just '&'."""
    assert parse(b't SELECT "\xe6\x97\xa5\xe6\x9c\xac"', utf8=True) == Select("t", "\u65e5\u672c")
    assert parse(b"t SELECT &ZeVnLIqe-", utf8=True) == Select("t", "&ZeVnLIqe-")
    assert parse(b"t CREATE {3+}\r\n\xc3\xa6x", utf8=True) == Create("t", "\u00e6x")
    with pytest.raises(ParseError, match="a mailbox name is not valid UTF-8"):
        parse(b't SELECT "\xff"', utf8=True)


def test_reprs_hide_passwords_and_message_data() -> None:
    text = repr([parse(b"t LOGIN alice hunter2"), parse(b"t AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA=="),
                 parse(b"t APPEND x {6+}\r\nsecret")])
    assert "hunter2" not in text and "secret" not in text


# -- sequence sets ----------------------------------------------------------

SEQUENCE_SETS = [
    ("1", SequenceSet(((1, 1),))),
    ("1:5,7,9:*,$", SequenceSet(((1, 5), (7, 7), (9, None)), saved=True)),
    ("*", SequenceSet(((None, None),))),
    ("*:4,4294967295", SequenceSet(((None, 4), (4294967295, 4294967295)))),
    ("$", SequenceSet((), saved=True)),
]


@pytest.mark.parametrize(("text", "expected"), SEQUENCE_SETS)
def test_sequence_set_parse_and_format(text: str, expected: SequenceSet) -> None:
    assert SequenceSet.parse(text) == expected
    assert SequenceSet.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "0", "1:0", "01", "1,", ",1", "1::2", "a", "1:2:3", "4294967296", "-1", "1 2"])
def test_sequence_set_errors(text: str) -> None:
    with pytest.raises(SequenceSetError):
        SequenceSet.parse(text)


@pytest.mark.parametrize(("text", "largest", "saved", "expected"), [
    ("1:5,7,9:*", 20, (), ((1, 5), (7, 7), (9, 20))),
    ("4:2", 10, (), ((2, 4),)),  # RFC 9051 §9: either order
    ("559:*", 100, (), ((100, 559),)),  # "*" below the range start still counts
    ("3,1:2,2:6,8", 10, (), ((1, 6), (8, 8))),
    ("*", 0, (), ()),  # an empty mailbox has no largest number
    ("1:*", 0, (), ((1, 1),)),
    ("$,10", 20, ((1, 3),), ((1, 3), (10, 10))),
    ("1:4294967295", 4294967295, (), ((1, 4294967295),)),
])
def test_sequence_set_resolve(text: str, largest: int, saved: tuple, expected: tuple) -> None:
    assert SequenceSet.parse(text).resolve(largest, saved) == expected


def test_resolve_never_expands_ranges() -> None:
    huge = SequenceSet.parse("1:*")
    assert huge.resolve(4294967295) == ((1, 4294967295),)
    assert huge.contains(4000000000, 4294967295)


def test_format_uid_set() -> None:
    assert format_uid_set([5, 1, 2, 3, 3, 9, 10]) == "1:3,5,9:10"
    assert format_uid_set(range(1, 100001)) == "1:100000"
    with pytest.raises(ValueError):
        format_uid_set([])


numbers_ = st.integers(1, 60)
seq_items = st.one_of(st.none(), numbers_)
sequence_sets = st.builds(
    SequenceSet, st.lists(st.tuples(seq_items, seq_items), max_size=6).map(tuple), st.booleans()
).filter(lambda s: s.ranges or s.saved)


@given(sequence_sets)
def test_sequence_set_round_trips(sequence_set: SequenceSet) -> None:
    normalised = SequenceSet(tuple((a, b) if a != b else (a, a) for a, b in sequence_set.ranges), sequence_set.saved)
    assert SequenceSet.parse(str(sequence_set)) == normalised


@given(sequence_sets, st.integers(0, 70), st.lists(st.integers(1, 70), max_size=5))
def test_resolve_matches_naive_expansion(sequence_set: SequenceSet, largest: int, saved_numbers: list[int]) -> None:
    saved = [(n, n) for n in saved_numbers]
    expected: set[int] = set(saved_numbers) if sequence_set.saved else set()
    for first, last in sequence_set.ranges:
        low, high = sorted((largest if first is None else first, largest if last is None else last))
        expected.update(range(max(low, 1), high + 1))
    resolved = sequence_set.resolve(largest, saved)
    assert list(numbers(resolved)) == sorted(expected)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(resolved))  # merged, disjoint, sorted


# -- mailbox names: modified UTF-7 --------------------------------------------

UTF7 = [
    ("INBOX", "INBOX"),
    ("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 §5.1.3
    ("Tom & Jerry", "Tom &- Jerry"),
    ("R\u00e9sum\u00e9s", "R&AOk-sum&AOk-s"),
    ("\U0001f600", "&2D3eAA-"),  # astral: a surrogate pair
    ("tab\there", "tab&AAk-here"),  # control characters are encoded too
    ("", ""),
]


@pytest.mark.parametrize(("text", "encoded"), UTF7)
def test_utf7_table(text: str, encoded: str) -> None:
    assert utf7.encode(text) == encoded
    assert utf7.decode(encoded) == text
    assert utf7.decode(encoded.encode("ascii")) == text


@pytest.mark.parametrize(("encoded", "reason"), [
    ("&AGE-", "non-canonical"),  # "a" hidden in base64
    ("&AOk-&AOk-", "non-canonical"),  # two adjacent runs instead of one
    ("&AOl-", "non-canonical"),  # non-zero padding bits
    ("&Jjo", "unterminated"),
    ("a&", "unterminated"),
    ("&Jj!-", "invalid character"),
    ("&A-", "does not decode"),  # 6 bits: not even one byte
    ("&2D0-", "does not decode"),  # a lone high surrogate
    ("&AOk=-", "invalid character"),  # no padding in modified base64
    ("caf\u00e9", "control character"),  # raw non-ASCII is neither printable ASCII nor encoded
    ("tab\there", "control character"),
    (b"caf\xc3\xa9", "8-bit byte"),
])
def test_utf7_rejects_non_canonical_forms(encoded: str | bytes, reason: str) -> None:
    with pytest.raises(utf7.Utf7Error, match=reason):
        utf7.decode(encoded)


@given(st.text())
def test_utf7_round_trips(text: str) -> None:
    encoded = utf7.encode(text)
    assert encoded.isascii() and utf7.decode(encoded) == text


def astring(name: str, utf8: bool) -> bytes:
    """Format a mailbox name as the client would: quoted, or a literal if it must be."""
    data = name.encode("utf-8") if utf8 else utf7.encode(name).encode("ascii")
    if all(0x20 <= byte < 0x7F for byte in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(data) + data


@settings(max_examples=200)
@given(sequence_sets, st.text().filter(lambda name: "\0" not in name), st.booleans(), st.booleans())
def test_copy_round_trips_sequence_sets_and_mailbox_names(
    sequence_set: SequenceSet, name: str, uid: bool, utf8: bool
) -> None:
    line = b"t " + (b"UID " if uid else b"") + b"COPY " + str(sequence_set).encode() + b" " + astring(name, utf8)
    expected_name = "INBOX" if name.upper() == "INBOX" else name
    parsed = parse(line, utf8=utf8)
    assert parsed == Copy("t", uid, SequenceSet.parse(str(sequence_set)), expected_name)


# -- dates --------------------------------------------------------------------

def test_dates() -> None:
    assert parse_date("1-Feb-2024") == date(2024, 2, 1)
    assert parse_date("29-feb-2024") == date(2024, 2, 29)
    assert parse_date_time(" 1-Feb-2024 13:05:09 +0100") == datetime(
        2024, 2, 1, 13, 5, 9, tzinfo=timezone(timedelta(hours=1)))
    assert parse_date_time("01-Feb-2024 23:59:60 -0330").second == 59  # leap second
    moment = datetime(2024, 2, 1, 13, 5, 9, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
    assert format_date_time(moment) == "01-Feb-2024 13:05:09 -0330"
    assert parse_date_time(format_date_time(moment)) == moment


@pytest.mark.parametrize("text", ["29-Feb-2023", "1-Fev-2024", "1-Feb-24", "2024-02-01", "1-Feb-2024 ", "0-Jan-2000"])
def test_invalid_dates(text: str) -> None:
    with pytest.raises(DateError):
        parse_date(text)


@pytest.mark.parametrize("text", ["1-Feb-2024 24:00:00 +0000", "1-Feb-2024 10:00:00 +2400",
                                  "1-Feb-2024 10:00:00", "1-Feb-2024 10:00 +0000", "1-Feb-2024 10:00:61 +0000"])
def test_invalid_date_times(text: str) -> None:
    with pytest.raises(DateError):
        parse_date_time(text)


# -- robustness ---------------------------------------------------------------

ARGUMENT_TOKENS = [" ", "(", ")", "[", "]", "<", ">", ".", "1", "0", "*", ":", ",", "$", "\\Seen", "\\", "NIL",
                   '"x"', '""', "{1+}\r\nz", "~{1+}\r\nz", "BODY", "HEADER.FIELDS", "RETURN", "CHARSET", "UTF-8",
                   "QRESYNC", "CHANGEDSINCE", "OR", "NOT", "MODSEQ", "FLAGS", "+", "-", "USE", "INBOX", "&", "-",
                   "&AOk-", "UTF8", "12345678901234567890"]
COMMAND_NAMES = ["LOGIN", "AUTHENTICATE", "ID", "ENABLE", "SELECT", "CREATE", "LIST", "STATUS", "APPEND",
                 "SETQUOTA", "FETCH", "UID FETCH", "STORE", "SEARCH", "UID SEARCH", "COPY", "UID EXPUNGE", "NOOP"]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(COMMAND_NAMES), st.lists(st.sampled_from(ARGUMENT_TOKENS), max_size=14), st.booleans())
def test_parser_only_raises_command_errors(name: str, tokens: list[str], utf8: bool) -> None:
    rx = Receiver()
    rx.feed(f"t {name} {''.join(tokens)}\r\n".encode())
    event = rx.next_event()
    if isinstance(event, RawCommand):
        with contextlib.suppress(CommandError):
            parse_command(event, utf8=utf8)
