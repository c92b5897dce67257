"""Typed IMAP commands and their parser (RFC 3501 §6, RFC 9051 §6 and extensions).

`parse_command(raw, utf8=...)` turns a `wire.RawCommand` into one frozen
dataclass per command, or raises a `CommandError`:

- `ParseError` (status BAD): the arguments do not follow the grammar;
  str(error) is a short reply text that never echoes argument values.
- `BadCharset` (status NO, code BADCHARSET): SEARCH with a charset other
  than UTF-8 or US-ASCII (RFC 9051 §6.4.4).

Whether a command is allowed in the current state, whether an extension
was ENABLEd (QRESYNC, UTF8=ACCEPT) and whether a mailbox exists are the
session's business, not the parser's. Mailbox names arrive decoded to
`str`: from modified UTF-7 (RFC 3501 §5.1.3) or, once UTF8=ACCEPT or
IMAP4rev2 is enabled (`utf8=True`), from UTF-8 (RFC 6855 §3); a name equal
to INBOX in any case becomes "INBOX" (RFC 9051 §5.1).

Fetch attributes are normalised for the executor (FAST becomes its three
attributes); search keys live in `search_keys`, the token reader in `syntax`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from runbox_mta.imap.dates import DateError, parse_date_time
from runbox_mta.imap.search_keys import BadCharset, SearchKey, parse_search_program  # noqa: F401 (re-export)
from runbox_mta.imap.sequence import SequenceSet
from runbox_mta.imap.syntax import (
    LIST_ATOM,
    MAX_NUMBER,
    MAX_NUMBER64,
    CommandError,  # noqa: F401 (re-export: callers catch it)
    ParseError,
    Reader,
    fail,
    utf8_text,
)
from runbox_mta.imap.wire import RawCommand

SPECIAL_USES = {  # RFC 6154 §2
    name.upper(): name for name in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}
STATUS_ITEMS = frozenset({
    "MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN",  # RFC 3501 §6.3.10
    "DELETED", "SIZE",  # RFC 9051 §6.3.11, RFC 8438
    "HIGHESTMODSEQ",  # RFC 7162 §3.1.9
    "APPENDLIMIT",  # RFC 7889 §4
    "DELETED-STORAGE",  # RFC 9208 §4.2
})
LIST_SELECT_OPTIONS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})  # RFC 5258, 6154
LIST_RETURN_OPTIONS = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})  # RFC 5258, 6154, 5819
SEARCH_RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT", "SAVE")  # RFC 4731 §3.1, RFC 5182


# -- commands -------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    tag: str


@dataclass(frozen=True)
class Capability(Command):
    pass


@dataclass(frozen=True)
class Noop(Command):
    pass


@dataclass(frozen=True)
class Logout(Command):
    pass


@dataclass(frozen=True)
class Starttls(Command):
    pass


@dataclass(frozen=True)
class Namespace(Command):  # RFC 2342
    pass


@dataclass(frozen=True)
class Idle(Command):  # RFC 2177
    pass


@dataclass(frozen=True)
class Check(Command):
    pass


@dataclass(frozen=True)
class Close(Command):
    pass


@dataclass(frozen=True)
class Unselect(Command):  # RFC 3691
    pass


@dataclass(frozen=True)
class Login(Command):
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Authenticate(Command):
    mechanism: str  # upper-case
    initial_response: bytes | None = field(default=None, repr=False)  # SASL-IR (RFC 4959); "=" is b""


@dataclass(frozen=True)
class Id(Command):  # RFC 2971
    params: tuple[tuple[str, str | None], ...] | None  # None for "ID NIL"


@dataclass(frozen=True)
class Enable(Command):  # RFC 5161
    capabilities: tuple[str, ...]  # upper-case


@dataclass(frozen=True)
class Compress(Command):  # RFC 4978
    mechanism: str  # upper-case; only DEFLATE exists


@dataclass(frozen=True)
class QresyncParams:  # RFC 7162 §3.2.5
    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None  # (message numbers, their UIDs)


@dataclass(frozen=True)
class Select(Command):
    mailbox: str
    condstore: bool = False  # RFC 7162 §3.1.8
    qresync: QresyncParams | None = None
    readonly: bool = False  # EXAMINE


@dataclass(frozen=True)
class Create(Command):
    mailbox: str
    special_use: tuple[str, ...] = ()  # RFC 6154 §3 CREATE ... (USE (\Sent))


@dataclass(frozen=True)
class Delete(Command):
    mailbox: str


@dataclass(frozen=True)
class Subscribe(Command):
    mailbox: str


@dataclass(frozen=True)
class Unsubscribe(Command):
    mailbox: str


@dataclass(frozen=True)
class Rename(Command):
    mailbox: str
    new_name: str


@dataclass(frozen=True)
class List(Command):  # RFC 9051 §6.3.9 with LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819)
    reference: str
    patterns: tuple[str, ...]
    select_options: frozenset[str] = frozenset()
    return_options: frozenset[str] = frozenset()
    status_items: tuple[str, ...] = ()  # RETURN (STATUS (...))


@dataclass(frozen=True)
class Lsub(Command):
    reference: str
    pattern: str


@dataclass(frozen=True)
class Status(Command):
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class AppendMessage:
    data: bytes = field(repr=False)
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    binary: bool = False  # sent as literal8 (RFC 3516 §4.4): may contain NUL and binary parts


@dataclass(frozen=True)
class Append(Command):
    mailbox: str
    messages: tuple[AppendMessage, ...]  # several: MULTIAPPEND (RFC 3502)


@dataclass(frozen=True)
class GetQuota(Command):  # RFC 9208
    root: str


@dataclass(frozen=True)
class GetQuotaRoot(Command):
    mailbox: str


@dataclass(frozen=True)
class SetQuota(Command):
    root: str
    limits: tuple[tuple[str, int], ...]  # (resource name upper-case, limit)


@dataclass(frozen=True)
class Expunge(Command):
    uid_set: SequenceSet | None = None  # UID EXPUNGE (RFC 4315 §2.1)


@dataclass(frozen=True)
class Copy(Command):
    uid: bool
    sequence_set: SequenceSet
    mailbox: str


@dataclass(frozen=True)
class Move(Command):  # RFC 6851
    uid: bool
    sequence_set: SequenceSet
    mailbox: str


@dataclass(frozen=True)
class Store(Command):
    uid: bool
    sequence_set: SequenceSet
    flags: tuple[str, ...]
    mode: str = ""  # "+" adds, "-" removes, "" replaces
    silent: bool = False
    unchangedsince: int | None = None  # RFC 7162 §3.1.3


@dataclass(frozen=True)
class Search(Command):
    uid: bool
    key: SearchKey
    charset: str | None = None  # upper-case
    return_options: tuple[str, ...] | None = None  # ESEARCH (RFC 4731); None: plain SEARCH reply


# -- fetch attributes -----------------------------------------------------


class FetchItem(enum.Enum):
    ENVELOPE = "ENVELOPE"
    FLAGS = "FLAGS"
    INTERNALDATE = "INTERNALDATE"
    RFC822 = "RFC822"
    RFC822_HEADER = "RFC822.HEADER"
    RFC822_SIZE = "RFC822.SIZE"
    RFC822_TEXT = "RFC822.TEXT"
    BODY = "BODY"
    BODYSTRUCTURE = "BODYSTRUCTURE"
    UID = "UID"
    MODSEQ = "MODSEQ"  # RFC 7162 §3.1.4


@dataclass(frozen=True)
class Section:
    part: tuple[int, ...] = ()  # 1.2.3
    text: str | None = None  # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT or MIME
    fields: tuple[str, ...] = ()  # for HEADER.FIELDS[.NOT]


@dataclass(frozen=True)
class FetchBody:
    """BODY[section]<partial>, BODY.PEEK[...], BINARY[...] and BINARY.PEEK[...]."""

    section: Section = Section()
    peek: bool = False
    partial: tuple[int, int] | None = None  # (offset, length)
    binary: bool = False  # RFC 3516 §4.2


@dataclass(frozen=True)
class FetchBinarySize:  # RFC 3516 §4.2 BINARY.SIZE[part]
    part: tuple[int, ...] = ()


FetchAttribute = FetchItem | FetchBody | FetchBinarySize

FETCH_MACROS = {  # RFC 9051 §6.4.5
    "ALL": (FetchItem.FLAGS, FetchItem.INTERNALDATE, FetchItem.RFC822_SIZE, FetchItem.ENVELOPE),
    "FAST": (FetchItem.FLAGS, FetchItem.INTERNALDATE, FetchItem.RFC822_SIZE),
    "FULL": (FetchItem.FLAGS, FetchItem.INTERNALDATE, FetchItem.RFC822_SIZE, FetchItem.ENVELOPE, FetchItem.BODY),
}


@dataclass(frozen=True)
class Fetch(Command):
    uid: bool
    sequence_set: SequenceSet
    attributes: tuple[FetchAttribute, ...]
    changedsince: int | None = None  # RFC 7162 §3.1.4.1
    vanished: bool = False  # RFC 7162 §3.2.6


# -- the parser -----------------------------------------------------------

_Parser = Callable[[Reader, str], Command]
_UidParser = Callable[[Reader, str, bool], Command]


def parse_command(raw: RawCommand, *, utf8: bool = False) -> Command:
    """Parse a framed command; raise ParseError or BadCharset.

    `utf8`: UTF8=ACCEPT (RFC 6855) or IMAP4rev2 is enabled, so mailbox
    names are UTF-8 instead of modified UTF-7.
    """
    reader = Reader(raw, utf8)
    name = raw.name
    try:
        if name == "UID":
            reader.space()
            name = "UID " + reader.word("a command after UID")
            uid_parser = _UID_COMMANDS.get(name[4:])
            if uid_parser is None:
                fail("not a command")
            command = uid_parser(reader, raw.tag, True)
        elif name in _UID_COMMANDS:
            command = _UID_COMMANDS[name](reader, raw.tag, False)
        elif name in _COMMANDS:
            command = _COMMANDS[name](reader, raw.tag)
        else:
            fail("unknown command")
        reader.end()
    except ParseError as error:
        # The command name gives the client's log some context; it is the
        # client's own word, cut short in case it is long garbage.
        raise ParseError(f"{name[:40]}: {error}") from None
    return command


def _no_arguments(kind: type[Command]) -> _Parser:
    return lambda reader, tag: kind(tag)


def _one_mailbox(kind: Callable[[str, str], Command]) -> _Parser:
    def parse(reader: Reader, tag: str) -> Command:
        reader.space()
        return kind(tag, reader.mailbox())
    return parse


def _login(reader: Reader, tag: str) -> Login:
    reader.space()
    username = reader.text("a user name")
    reader.space()
    return Login(tag, username, reader.text("a password"))


def _authenticate(reader: Reader, tag: str) -> Authenticate:
    reader.space()
    mechanism = reader.word("a SASL mechanism")
    if not reader.skip(b" "):
        return Authenticate(tag, mechanism)
    if reader.skip(b"="):  # RFC 4959 §3: an empty initial response
        return Authenticate(tag, mechanism, b"")
    encoded = reader.match(_BASE64)
    if encoded is not None and len(encoded) % 4 == 0:
        try:
            return Authenticate(tag, mechanism, base64.b64decode(encoded, validate=True))
        except binascii.Error:
            pass
    fail("the initial response must be base64 or '='")


def _id(reader: Reader, tag: str) -> Id:
    reader.space()
    if reader.skip(b"NIL"):
        return Id(tag, None)

    def pair() -> tuple[str, str | None]:
        key = utf8_text(reader.string("an ID field name", atom=None), "an ID field name")
        reader.space()
        value = reader.nstring("an ID value")
        return key, None if value is None else utf8_text(value, "an ID value")

    return Id(tag, tuple(reader.parenthesised(pair, "the ID parameters", empty=True)))


def _enable(reader: Reader, tag: str) -> Enable:
    capabilities = []
    while reader.skip(b" "):
        capabilities.append(reader.word("a capability name"))
    if not capabilities:
        fail("expected a capability name")
    return Enable(tag, tuple(capabilities))


def _compress(reader: Reader, tag: str) -> Compress:
    reader.space()
    return Compress(tag, reader.word("a compression mechanism"))


def _select(readonly: bool) -> _Parser:
    def parse(reader: Reader, tag: str) -> Select:
        reader.space()
        mailbox = reader.mailbox()
        condstore, qresync = False, None
        if reader.skip(b" "):
            for name, value in reader.parenthesised(lambda: _select_param(reader), "SELECT parameters"):
                if name == "CONDSTORE":
                    condstore = True
                else:
                    qresync = value
        return Select(tag, mailbox, condstore, qresync, readonly)
    return parse


def _select_param(reader: Reader) -> tuple[str, QresyncParams | None]:
    name = reader.word("a SELECT parameter")
    if name == "CONDSTORE":  # RFC 7162 §3.1.8
        return name, None
    if name != "QRESYNC":
        fail("unknown SELECT parameter")
    reader.space()
    reader.expect(b"(", "'(' after QRESYNC")
    uidvalidity = reader.number("UIDVALIDITY", minimum=1)
    reader.space()
    modseq = reader.number("a mod-sequence", MAX_NUMBER64, minimum=1)
    known_uids = seq_match = None
    if reader.skip(b" ") and reader.peek() != b"(":
        known_uids = _known_set(reader)
        reader.skip(b" ")
    if reader.peek() == b"(":
        reader.skip(b"(")
        numbers = _known_set(reader)
        reader.space()
        seq_match = (numbers, _known_set(reader))
        reader.expect(b")", "')' after the sequence match data")
    reader.expect(b")", "')' to close QRESYNC")
    return name, QresyncParams(uidvalidity, modseq, known_uids, seq_match)


def _known_set(reader: Reader) -> SequenceSet:
    known = reader.sequence_set()
    if known.uses_star or known.saved:  # RFC 7162 §3.2.5: known-uids has no "*"
        fail("QRESYNC sets cannot use '*' or '$'")
    return known


def _create(reader: Reader, tag: str) -> Create:
    reader.space()
    mailbox = reader.mailbox()
    uses: list[str] = []
    if reader.skip(b" "):
        def param() -> None:
            if reader.word("a CREATE parameter") != "USE":
                fail("unknown CREATE parameter")
            reader.space()
            uses.extend(reader.parenthesised(
                lambda: reader.flag(SPECIAL_USES, "unknown special-use attribute"), "USE attributes", empty=True
            ))
        reader.parenthesised(param, "CREATE parameters")
    return Create(tag, mailbox, tuple(uses))


def _rename(reader: Reader, tag: str) -> Rename:
    reader.space()
    old = reader.mailbox()
    reader.space()
    return Rename(tag, old, reader.mailbox("the new mailbox name"))


def _list(reader: Reader, tag: str) -> List:
    reader.space()
    select: set[str] = set()
    if reader.peek() == b"(":
        select.update(reader.parenthesised(lambda: reader.word("a selection option"), "selection options", True))
        if not select <= LIST_SELECT_OPTIONS:
            fail("unknown LIST selection option")  # RFC 5258 §3
        if "RECURSIVEMATCH" in select and not select & {"SUBSCRIBED", "SPECIAL-USE"}:
            fail("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3 MUST
        reader.space()
    reference = reader.mailbox("a reference name")
    reader.space()
    if reader.peek() == b"(":
        patterns = reader.parenthesised(lambda: reader.mailbox("a pattern", LIST_ATOM), "patterns")
    else:
        patterns = [reader.mailbox("a pattern", LIST_ATOM)]
    returns: set[str] = set()
    status: tuple[str, ...] = ()
    if reader.skip(b" "):
        if reader.word("RETURN") != "RETURN":
            fail("expected RETURN")
        reader.space()

        def option() -> str:
            nonlocal status
            name = reader.word("a return option")
            if name not in LIST_RETURN_OPTIONS:
                fail("unknown LIST return option")
            if name == "STATUS":  # RFC 5819 §2
                reader.space()
                status = _status_items(reader)
            return name

        returns.update(reader.parenthesised(option, "return options", empty=True))
    return List(tag, reference, tuple(patterns), frozenset(select), frozenset(returns), status)


def _lsub(reader: Reader, tag: str) -> Lsub:
    reader.space()
    reference = reader.mailbox("a reference name")
    reader.space()
    return Lsub(tag, reference, reader.mailbox("a pattern", LIST_ATOM))


def _status_items(reader: Reader) -> tuple[str, ...]:
    def item() -> str:
        name = reader.word("a status item")
        if name not in STATUS_ITEMS:
            fail("unknown status item")
        return name
    return tuple(reader.parenthesised(item, "status items"))


def _status(reader: Reader, tag: str) -> Status:
    reader.space()
    mailbox = reader.mailbox()
    reader.space()
    return Status(tag, mailbox, _status_items(reader))


def _append(reader: Reader, tag: str) -> Append:
    reader.space()
    mailbox = reader.mailbox()
    messages: list[AppendMessage] = []
    while not messages or not reader.at_end():
        reader.space()
        flags: tuple[str, ...] = ()
        internal_date = None
        if reader.peek() == b"(":
            flags = reader.flag_list()
            reader.space()
        if reader.peek() == b'"':
            try:
                internal_date = parse_date_time(reader.string("a date-time", atom=None).decode("ascii"))
            except (DateError, UnicodeDecodeError) as error:
                fail(f"invalid date-time: {error}")
            reader.space()
        if reader.skip(b"UTF8 ("):  # RFC 6855 §4: UTF8 (literal8)
            literal = reader.literal(binary=True)
            reader.expect(b")", "')' after the UTF8 literal")
        else:
            literal = reader.literal(binary=True)
        messages.append(AppendMessage(literal.data, flags, internal_date, literal.binary))
    return Append(tag, mailbox, tuple(messages))


def _getquota(reader: Reader, tag: str) -> GetQuota:
    reader.space()
    return GetQuota(tag, reader.text("a quota root"))


def _setquota(reader: Reader, tag: str) -> SetQuota:
    reader.space()
    root = reader.text("a quota root")
    reader.space()

    def resource() -> tuple[str, int]:
        name = reader.word("a resource name")
        reader.space()
        return name, reader.number("a resource limit", MAX_NUMBER64)

    return SetQuota(tag, root, tuple(reader.parenthesised(resource, "resource limits", empty=True)))


def _expunge(reader: Reader, tag: str, uid: bool) -> Expunge:
    if not uid:
        return Expunge(tag)
    reader.space()
    return Expunge(tag, reader.sequence_set())


def _copy_or_move(kind: type[Copy] | type[Move]) -> _UidParser:
    def parse(reader: Reader, tag: str, uid: bool) -> Command:
        reader.space()
        sequence_set = reader.sequence_set()
        reader.space()
        return kind(tag, uid, sequence_set, reader.mailbox())
    return parse


def _store(reader: Reader, tag: str, uid: bool) -> Store:
    reader.space()
    sequence_set = reader.sequence_set()
    reader.space()
    unchangedsince = None
    if reader.skip(b"("):
        if reader.word("UNCHANGEDSINCE") != "UNCHANGEDSINCE":
            fail("unknown STORE modifier")
        reader.space()
        unchangedsince = reader.number("a mod-sequence", MAX_NUMBER64)  # RFC 7162 §3.1.3
        reader.expect(b")", "')' after UNCHANGEDSINCE")
        reader.space()
    mode = "+" if reader.skip(b"+") else "-" if reader.skip(b"-") else ""
    item = reader.word("FLAGS")
    if item not in ("FLAGS", "FLAGS.SILENT"):
        fail("expected FLAGS, +FLAGS or -FLAGS")
    reader.space()
    if reader.peek() == b"(":
        flags = reader.flag_list()
    else:
        flags = (reader.flag(),)
        while reader.skip(b" "):
            flags += (reader.flag(),)
    return Store(tag, uid, sequence_set, flags, mode, item.endswith(".SILENT"), unchangedsince)


def _search(reader: Reader, tag: str, uid: bool) -> Search:
    reader.space()
    return_options = None
    if reader.skip(b"RETURN "):

        def option() -> str:
            name = reader.word("a return option")
            if name not in SEARCH_RETURN_OPTIONS:
                fail("unknown SEARCH return option")
            return name

        chosen = set(reader.parenthesised(option, "return options", empty=True)) or {"ALL"}  # RFC 4731 §3.1
        return_options = tuple(name for name in SEARCH_RETURN_OPTIONS if name in chosen)
        reader.space()
    charset, key = parse_search_program(reader)
    return Search(tag, uid, key, charset, return_options)


def _fetch(reader: Reader, tag: str, uid: bool) -> Fetch:
    reader.space()
    sequence_set = reader.sequence_set()
    reader.space()
    if reader.peek() == b"(":
        attributes = tuple(reader.parenthesised(lambda: _fetch_attribute(reader), "fetch attributes"))
    else:
        macro = reader.match(_MACRO)
        attributes = FETCH_MACROS[macro.decode().upper()] if macro else (_fetch_attribute(reader),)
    changedsince, vanished = None, False
    if reader.skip(b" "):
        for name, value in reader.parenthesised(lambda: _fetch_modifier(reader), "fetch modifiers"):
            if name == "CHANGEDSINCE":
                changedsince = value
            else:
                vanished = True
    if vanished and not (uid and changedsince is not None):  # RFC 7162 §3.2.6 MUST
        fail("VANISHED needs UID FETCH and CHANGEDSINCE")
    return Fetch(tag, uid, sequence_set, attributes, changedsince, vanished)


_MACRO = re.compile(rb"(?i:ALL|FAST|FULL)(?![A-Za-z0-9.\[])")
_FETCH_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_PART = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
_SECTION_WORD = re.compile(rb"[A-Za-z.]+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def _fetch_modifier(reader: Reader) -> tuple[str, int | None]:
    name = reader.word("a fetch modifier")
    if name == "VANISHED":
        return name, None
    if name != "CHANGEDSINCE":
        fail("unknown fetch modifier")
    reader.space()
    return name, reader.number("a mod-sequence", MAX_NUMBER64, minimum=1)


def _fetch_attribute(reader: Reader) -> FetchAttribute:
    found = reader.match(_FETCH_NAME)
    name = found.decode("ascii").upper() if found else ""
    bracket = reader.peek() == b"["
    if name in ("BODY", "BODY.PEEK") and bracket:
        section = _section(reader)
        return FetchBody(section, name == "BODY.PEEK", _partial(reader))
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and bracket:
        reader.skip(b"[")
        part = _part_numbers(reader)
        reader.expect(b"]", "']' to close the BINARY section")
        if name == "BINARY.SIZE":
            return FetchBinarySize(part)
        return FetchBody(Section(part), name == "BINARY.PEEK", _partial(reader), binary=True)
    try:
        return FetchItem(name)
    except ValueError:
        fail("unknown fetch attribute")


def _part_numbers(reader: Reader) -> tuple[int, ...]:
    """section-part: nz-number *("." nz-number); a "." before HEADER etc. is left alone."""
    found = reader.match(_SECTION_PART)
    if found is None:
        return ()
    numbers = [int(number) if len(number) <= 10 else 0 for number in found.split(b".")]
    if not all(1 <= number <= MAX_NUMBER for number in numbers):
        fail("invalid part number")
    return tuple(numbers)


def _section(reader: Reader) -> Section:
    """RFC 9051 §9 section: "[" [section-spec] "]"."""
    reader.expect(b"[")
    part = _part_numbers(reader)
    text = None
    fields: tuple[str, ...] = ()
    if not part or reader.skip(b"."):
        word = reader.match(_SECTION_WORD)
        if word is not None:
            text = word.decode("ascii").upper()
            if text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
                fail("unknown section")
            if text == "MIME" and not part:  # RFC 9051 §9: MIME only after a part number
                fail("MIME needs a part number")
        elif part:
            fail("expected a section name after '.'")
    if text is not None and text.startswith("HEADER.FIELDS"):
        reader.space()
        fields = tuple(reader.parenthesised(lambda: _ascii(reader.string("a header field name")), "header fields"))
    reader.expect(b"]", "']' to close the section")
    return Section(part, text, fields)


def _partial(reader: Reader) -> tuple[int, int] | None:
    """ "<" offset "." length ">" after a section (RFC 9051 §9 section-partial)."""
    if not reader.skip(b"<"):
        return None
    offset = reader.number("a partial offset", MAX_NUMBER64)
    reader.expect(b".", "'.' in the partial range")
    length = reader.number("a partial length", MAX_NUMBER64, minimum=1)
    reader.expect(b">", "'>' to close the partial range")
    return offset, length


def _ascii(data: bytes) -> str:
    if not data.isascii():
        fail("header field names are ASCII")
    return data.decode("ascii")


_COMMANDS: dict[str, _Parser] = {
    "CAPABILITY": _no_arguments(Capability),
    "NOOP": _no_arguments(Noop),
    "LOGOUT": _no_arguments(Logout),
    "STARTTLS": _no_arguments(Starttls),
    "NAMESPACE": _no_arguments(Namespace),
    "IDLE": _no_arguments(Idle),
    "CHECK": _no_arguments(Check),
    "CLOSE": _no_arguments(Close),
    "UNSELECT": _no_arguments(Unselect),
    "LOGIN": _login,
    "AUTHENTICATE": _authenticate,
    "ID": _id,
    "ENABLE": _enable,
    "COMPRESS": _compress,
    "SELECT": _select(readonly=False),
    "EXAMINE": _select(readonly=True),
    "CREATE": _create,
    "DELETE": _one_mailbox(Delete),
    "SUBSCRIBE": _one_mailbox(Subscribe),
    "UNSUBSCRIBE": _one_mailbox(Unsubscribe),
    "RENAME": _rename,
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "GETQUOTA": _getquota,
    "GETQUOTAROOT": _one_mailbox(GetQuotaRoot),
    "SETQUOTA": _setquota,
}

# Commands that UID can prefix (RFC 9051 §6.4.9, RFC 4315 §2.1, RFC 6851 §3.3).
_UID_COMMANDS: dict[str, _UidParser] = {
    "COPY": _copy_or_move(Copy),
    "MOVE": _copy_or_move(Move),
    "FETCH": _fetch,
    "SEARCH": _search,
    "STORE": _store,
    "EXPUNGE": _expunge,
}
