"""The grammar's building blocks: a token reader over a framed command.

`Reader` walks a `wire.RawCommand` (line text with literals between) and
reads RFC 9051 §9 tokens: atoms, numbers, quoted strings, literals,
astrings, mailbox names, flags, sequence sets and parenthesised lists. It
knows nothing about particular commands; `commands` composes it.

The receiver has already checked the line text lexically (printable
ASCII outside complete quoted strings), so the reader can rely on quoted
strings being well-formed. Every grammar error raises `ParseError`, whose
message names what was expected and never echoes the client's values
(they may be passwords).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NoReturn, TypeVar

from runbox_mta.imap import utf7
from runbox_mta.imap.sequence import SequenceSet, SequenceSetError
from runbox_mta.imap.wire import ATOM_CHARS, Literal, RawCommand

MAX_NUMBER = 2**32 - 1  # RFC 9051 §9 number
MAX_NUMBER64 = 2**63 - 1  # RFC 9051 §9 number64, RFC 7162 §7 mod-sequence-value

# RFC 9051 §2.3.2; \Recent cannot be set by clients (RFC 3501 §2.3.2).
SYSTEM_FLAGS = {name.upper(): name for name in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}


class CommandError(Exception):
    """A command that cannot run as sent; carries its reply status and code."""

    status = "BAD"
    code: str | None = None


class ParseError(CommandError):
    """The arguments break the grammar: tagged BAD (RFC 9051 §7.1.3)."""


ATOM = re.compile(b"[" + re.escape(ATOM_CHARS) + b"]+")
ASTRING_ATOM = re.compile(b"[" + re.escape(ATOM_CHARS + b"]") + b"]+")
LIST_ATOM = re.compile(b"[" + re.escape(ATOM_CHARS + b"]%*") + b"]+")  # RFC 9051 §9 list-char
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(.)")
_DIGITS = re.compile(rb"[0-9]+")
_SEQUENCE_SET = re.compile(rb"[0-9:*,$]+")

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Raise ParseError: every grammar error goes through here."""
    raise ParseError(message)


class Reader:
    """A cursor over a RawCommand's parts: line text with literals between."""

    def __init__(self, raw: RawCommand, utf8: bool) -> None:
        self.utf8 = utf8
        self._parts = raw.parts
        self._index = 0  # of the current text part; literals sit at odd indexes
        self._text = self._text_part(0)
        self._pos = 0

    def _text_part(self, index: int) -> bytes:
        text = self._parts[index]
        assert isinstance(text, bytes)  # the receiver alternates text and literals
        return text

    def peek(self) -> bytes:
        """The next byte of line text; b"" at a literal or the end."""
        return self._text[self._pos:self._pos + 1]

    def at_end(self) -> bool:
        return self._pos == len(self._text) and self._index == len(self._parts) - 1

    def _at_literal(self) -> bool:
        return self._pos == len(self._text) and self._index < len(self._parts) - 1

    def skip(self, expected: bytes) -> bool:
        """Consume `expected` (ASCII, case-insensitive) if it comes next."""
        if self._text[self._pos:self._pos + len(expected)].upper() != expected.upper():
            return False
        self._pos += len(expected)
        return True

    def expect(self, expected: bytes, what: str = "") -> None:
        if not self.skip(expected):
            fail(f"expected {what or repr(expected.decode())}")

    def space(self) -> None:
        self.expect(b" ", "a space")

    def end(self) -> None:
        if not self.at_end():
            fail("unexpected characters after the last argument")

    def match(self, pattern: re.Pattern[bytes]) -> bytes | None:
        found = pattern.match(self._text, self._pos)
        if not found or found.end() == self._pos:
            return None
        self._pos = found.end()
        return found.group()

    def word(self, what: str) -> str:
        """An atom, upper-cased: command keywords, options, capability names."""
        found = self.match(ATOM)
        if found is None:
            fail(f"expected {what}")
        return found.decode("ascii").upper()

    def number(self, what: str, limit: int = MAX_NUMBER, minimum: int = 0) -> int:
        digits = self.match(_DIGITS)
        if digits is None:
            fail(f"expected {what} (a number)")
        if len(digits) > 19 or not minimum <= int(digits) <= limit:
            fail(f"{what} out of range")
        return int(digits)

    def sequence_set(self) -> SequenceSet:
        text = self.match(_SEQUENCE_SET)
        if text is None:
            fail("expected a sequence set")
        try:
            return SequenceSet.parse(text)
        except SequenceSetError as error:
            fail(str(error))

    def string(self, what: str, atom: re.Pattern[bytes] | None = ASTRING_ATOM) -> bytes:
        """A quoted string, a literal or (with `atom`) a bare atom: astring and friends."""
        if self._at_literal():
            return self.literal().data
        if self.peek() == b'"':
            quoted = _QUOTED.match(self._text, self._pos)
            assert quoted is not None  # the receiver only passes complete quoted strings
            self._pos = quoted.end()
            return _ESCAPE.sub(rb"\1", quoted.group(1))
        found = self.match(atom) if atom is not None else None
        if found is None:
            fail(f"expected {what}")
        return found

    def literal(self, binary: bool = False) -> Literal:
        if not self._at_literal():
            fail("expected a literal")
        literal = self._parts[self._index + 1]
        assert isinstance(literal, Literal)
        if literal.binary and not binary:
            fail("literal8 (~{n}) is only allowed for APPEND data")
        if not literal.binary and b"\0" in literal.data:
            fail("NUL in a literal (RFC 9051 §4.3); send binary data as literal8 ~{n}")
        self._index += 2
        self._text = self._text_part(self._index)
        self._pos = 0
        return literal

    def nstring(self, what: str) -> bytes | None:
        if self.skip(b"NIL"):
            return None
        return self.string(what, atom=None)

    def text(self, what: str, atom: re.Pattern[bytes] | None = ASTRING_ATOM) -> str:
        return utf8_text(self.string(what, atom), what)

    def mailbox(self, what: str = "a mailbox name", atom: re.Pattern[bytes] = ASTRING_ATOM) -> str:
        data = self.string(what, atom)
        if self.utf8:
            name = utf8_text(data, what)
        else:
            try:
                name = utf7.decode(data)  # RFC 3501 §5.1.3
            except utf7.Utf7Error as error:
                fail(f"invalid mailbox name: {error}")
        return "INBOX" if name.upper() == "INBOX" else name  # RFC 9051 §5.1

    def parenthesised(self, item: Callable[[], T], what: str, empty: bool = False) -> list[T]:
        """ "(" item *(SP item) ")", or "()" when `empty` is allowed."""
        self.expect(b"(", f"'(' to open {what}")
        items: list[T] = []
        if not (empty and self.skip(b")")):
            items.append(item())
            while self.skip(b" "):
                items.append(item())
            self.expect(b")", f"')' to close {what}")
        return items

    def flag(self, system: dict[str, str] = SYSTEM_FLAGS, unknown: str = "invalid system flag") -> str:
        """A flag for STORE/APPEND: one of `system` (canonical spelling) or a keyword."""
        if self.skip(b"\\"):
            name = "\\" + self.word("a flag name")
            if name not in system:
                fail(unknown)
            return system[name]
        return self.keyword()

    def keyword(self) -> str:
        """flag-keyword: an atom, case preserved (matched case-insensitively later)."""
        found = self.match(ATOM)
        if found is None:
            fail("expected a flag")
        return found.decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        return tuple(self.parenthesised(self.flag, "the flag list", empty=True))


def utf8_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{what} is not valid UTF-8")
