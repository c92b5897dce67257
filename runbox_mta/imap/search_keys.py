"""SEARCH criteria: the search-key tree and its grammar (RFC 9051 §6.4.4).

Every key of RFC 3501 §6.4.4 and RFC 9051 §6.4.4 is accepted, plus MODSEQ
(RFC 7162 §3.1.5) and "$" (RFC 5182). The tree is normalised so the
executor has fewer cases: UNSEEN is Not(HasFlag("\\Seen")), NEW is
And(HasFlag("\\Recent"), Not(HasFlag("\\Seen"))), FROM is
HeaderContains("From", ...), several keys in a row are And.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import ClassVar

from runbox_mta.imap.dates import DateError, parse_date
from runbox_mta.imap.sequence import SequenceSet
from runbox_mta.imap.syntax import ATOM, MAX_NUMBER64, CommandError, Reader, fail

SEARCH_CHARSETS = ("UTF-8", "US-ASCII")  # RFC 9051 §6.4.4: both MUST be supported
# Parenthesised, NOT and OR keys nest; no client needs this depth, and it
# keeps the recursive parser far from Python's recursion limit.
MAX_SEARCH_DEPTH = 64


class BadCharset(CommandError):
    """SEARCH CHARSET names a charset we do not support (RFC 9051 §6.4.4)."""

    status = "NO"
    code = "BADCHARSET (" + " ".join(SEARCH_CHARSETS) + ")"


@dataclass(frozen=True)
class All:
    pass


@dataclass(frozen=True)
class HasFlag:
    flag: str  # a system flag as in SYSTEM_FLAGS, "\\Recent", or a keyword


@dataclass(frozen=True)
class HeaderContains:
    field: str  # "From", "To", "Cc", "Bcc", "Subject" or as given to HEADER
    value: str  # "" matches every message with the field (RFC 9051 §6.4.4)


@dataclass(frozen=True)
class BodyContains:
    value: str


@dataclass(frozen=True)
class TextContains:
    value: str


@dataclass(frozen=True)
class DateKey:
    sent: bool  # Date: header (SENT*) rather than the internal date
    comparison: str  # "before", "on" or "since"
    date: date


@dataclass(frozen=True)
class SizeKey:
    comparison: str  # "larger" or "smaller"
    size: int


@dataclass(frozen=True)
class InSet:
    sequence_set: SequenceSet
    uid: bool = False


@dataclass(frozen=True)
class ModSeqKey:  # RFC 7162 §3.1.5
    modseq: int
    entry_name: str | None = None  # "/flags/\\Seen"
    entry_type: str | None = None  # "priv", "shared" or "all"


@dataclass(frozen=True)
class Not:
    key: SearchKey


@dataclass(frozen=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class And:
    keys: tuple[SearchKey, ...]


SearchKey = (
    All | HasFlag | HeaderContains | BodyContains | TextContains | DateKey | SizeKey | InSet | ModSeqKey
    | Not | Or | And
)


def parse_search_program(reader: Reader) -> tuple[str | None, SearchKey]:
    """search-program: ["CHARSET" SP charset SP] search-key *(SP search-key)."""
    charset = None
    if reader.skip(b"CHARSET "):
        charset = reader.text("a charset").upper()
        if charset not in SEARCH_CHARSETS:
            raise BadCharset(f"charset {charset[:40]} is not supported")
        reader.space()
    return charset, _SearchParser(reader, charset).keys()


class _SearchParser:
    """RFC 9051 §6.4.4 search keys; NEW, OLD and the UN- keys are normalised."""

    _FLAGS: ClassVar[dict[str, str]] = {
        "ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft",
        "FLAGGED": "\\Flagged", "SEEN": "\\Seen", "RECENT": "\\Recent",
    }
    _HEADERS: ClassVar[dict[str, str]] = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "SUBJECT": "Subject", "TO": "To"}
    _DATES: ClassVar[dict[str, tuple[bool, str]]] = {
        "BEFORE": (False, "before"), "ON": (False, "on"), "SINCE": (False, "since"),
        "SENTBEFORE": (True, "before"), "SENTON": (True, "on"), "SENTSINCE": (True, "since"),
    }
    _WITH_ARGUMENTS: ClassVar[frozenset[str]] = frozenset(_HEADERS) | frozenset(_DATES) | {
        "KEYWORD", "UNKEYWORD", "LARGER", "SMALLER", "BODY", "TEXT", "HEADER", "UID", "NOT", "OR", "MODSEQ",
    }

    def __init__(self, reader: Reader, charset: str | None) -> None:
        self.reader = reader
        self.ascii = charset == "US-ASCII"

    def keys(self, depth: int = 0, closing: bytes = b"") -> SearchKey:
        """search-key *(SP search-key), up to the end or `closing`; several mean AND."""
        keys = [self.key(depth)]
        while self.reader.skip(b" "):
            keys.append(self.key(depth))
        if closing:
            self.reader.expect(closing, "')' to close the search key group")
        return keys[0] if len(keys) == 1 else And(tuple(keys))

    def key(self, depth: int) -> SearchKey:
        if depth >= MAX_SEARCH_DEPTH:
            fail("search keys nested too deeply")
        reader = self.reader
        if reader.skip(b"("):
            return self.keys(depth + 1, b")")
        if reader.peek() and reader.peek() in b"0123456789*$":
            return InSet(reader.sequence_set())
        name = reader.word("a search key")
        if name == "ALL":
            return All()
        if name in self._FLAGS:
            return HasFlag(self._FLAGS[name])
        if name.startswith("UN") and name[2:] in self._FLAGS and name != "UNRECENT":
            return Not(HasFlag(self._FLAGS[name[2:]]))
        if name == "NEW":  # RFC 3501 §6.4.4: RECENT UNSEEN
            return And((HasFlag("\\Recent"), Not(HasFlag("\\Seen"))))
        if name == "OLD":
            return Not(HasFlag("\\Recent"))
        if name not in self._WITH_ARGUMENTS:
            fail("unknown search key")
        reader.space()
        if name in self._HEADERS:
            return HeaderContains(self._HEADERS[name], self.string())
        if name in self._DATES:
            return DateKey(*self._DATES[name], self.date())
        if name in ("KEYWORD", "UNKEYWORD"):
            keyword = HasFlag(reader.keyword())
            return keyword if name == "KEYWORD" else Not(keyword)
        if name in ("LARGER", "SMALLER"):
            return SizeKey(name.lower(), reader.number("a size", MAX_NUMBER64))
        if name == "BODY":
            return BodyContains(self.string())
        if name == "TEXT":
            return TextContains(self.string())
        if name == "HEADER":
            field_name = self.string()
            reader.space()
            return HeaderContains(field_name, self.string())
        if name == "UID":
            return InSet(reader.sequence_set(), uid=True)
        if name == "NOT":
            return Not(self.key(depth + 1))
        if name == "OR":
            left = self.key(depth + 1)
            reader.space()
            return Or(left, self.key(depth + 1))
        return self.modseq()

    def modseq(self) -> ModSeqKey:
        """RFC 7162 §3.1.5: MODSEQ [entry-name SP entry-type-req SP] mod-sequence-valzer."""
        reader = self.reader
        entry_name = entry_type = None
        if reader.peek() == b'"':
            entry_name = self.string()
            reader.space()
            entry_type = reader.word("an entry type").lower()
            if entry_type not in ("priv", "shared", "all"):
                fail("MODSEQ entry type must be priv, shared or all")
            reader.space()
        return ModSeqKey(reader.number("a mod-sequence", MAX_NUMBER64), entry_name, entry_type)

    def string(self) -> str:
        value = self.reader.text("a search string")
        if self.ascii and not value.isascii():
            fail("non-ASCII search string with CHARSET US-ASCII")
        return value

    def date(self) -> date:
        text = self.reader.string("a date", atom=ATOM)
        try:
            return parse_date(text.decode("ascii"))
        except (DateError, UnicodeDecodeError) as error:
            fail(f"invalid date: {error}")
