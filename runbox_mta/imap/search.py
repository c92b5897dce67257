"""SEARCH evaluation: does one message match a search-key tree (RFC 9051 §6.4.4)?

Pure: the session loads the candidates (with the stored searchable header,
with the message bytes only when `needs_body(key)`; the store's SQL has
already left out messages that cannot match), this module decides.
String matching is a case-insensitive substring test on decoded text
(RFC 2047 headers, the transfer encoding and charset of text parts undone),
as RFC 9051 §6.4.4 allows. Header keys match the stored form of
search_text; body keys parse the message, at most once per SEARCH.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from dataclasses import dataclass
from datetime import date
from email.message import EmailMessage
from functools import cached_property

from runbox_mta.imap.search_keys import (
    All, And, BodyContains, DateKey, HasFlag, HeaderContains, InSet, ModSeqKey, Not, Or, SearchKey, SizeKey,
    TextContains,
)
from runbox_mta.imap.search_text import field_contains, field_values, searchable_header
from runbox_mta.store.mailstore import MessageRow


def needs_body(key: SearchKey) -> bool:
    """Whether evaluating `key` reads the message bytes (its body text)."""
    return any(isinstance(inner, (BodyContains, TextContains)) for inner in _walk(key))


def uses_modseq(key: SearchKey) -> bool:
    """Whether the key names MODSEQ, so the reply carries the highest MODSEQ (RFC 7162 §3.1.5)."""
    return any(isinstance(inner, ModSeqKey) for inner in _walk(key))


def _walk(key: SearchKey) -> list[SearchKey]:
    if isinstance(key, Not):
        return [key, *_walk(key.key)]
    if isinstance(key, Or):
        return [key, *_walk(key.left), *_walk(key.right)]
    if isinstance(key, And):
        return [key, *(inner for part in key.keys for inner in _walk(part))]
    return [key]


@dataclass(frozen=True)
class Scope:
    """What "*" means: the largest message number and the largest UID in the mailbox (RFC 9051 §9);
    and what "$" means."""

    largest_number: int
    largest_uid: int
    saved_uids: frozenset[int] = frozenset()  # what "$" names (RFC 5182)


@dataclass
class Candidate:
    number: int
    row: MessageRow

    @cached_property
    def _flags(self) -> frozenset[str]:
        return frozenset(flag.lower() for flag in self.row.flags)  # RFC 9051 §2.3.2: case-insensitive

    def has_flag(self, flag: str) -> bool:
        return flag.lower() in self._flags

    @cached_property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.row.data or b"", policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @cached_property
    def header(self) -> str:
        """The searchable header (search_text): stored with the message, or made now for a message
        stored before it was kept."""
        stored = self.row.search_header
        return stored if stored is not None else searchable_header(self.row.data or b"")

    @cached_property
    def body_text(self) -> str:
        texts = []
        for part in self.message.walk():
            if part.get_content_maintype() != "text":
                continue
            try:
                texts.append(str(part.get_content()))
            except (LookupError, ValueError, AssertionError):
                payload = part.get_payload(decode=True)
                texts.append(payload.decode("utf-8", "replace") if isinstance(payload, bytes) else "")
        return "\n".join(texts).casefold()

    def sent_date(self) -> date | None:
        values = field_values(self.header, "Date")
        try:
            return email.utils.parsedate_to_datetime(values[0]).date() if values else None
        except (ValueError, TypeError, IndexError):
            return None


def matches(key: SearchKey, candidate: Candidate, scope: Scope) -> bool:
    """RFC 9051 §6.4.4; \\Recent is never set (IMAP4rev2 dropped it, we do not track it)."""
    row = candidate.row
    if isinstance(key, All):
        return True
    if isinstance(key, HasFlag):
        return candidate.has_flag(key.flag)
    if isinstance(key, InSet):
        if key.sequence_set.saved and row.uid in scope.saved_uids:
            return True
        number, largest = (row.uid, scope.largest_uid) if key.uid else (candidate.number, scope.largest_number)
        return key.sequence_set.contains(number, largest)
    if isinstance(key, SizeKey):
        return row.size > key.size if key.comparison == "larger" else row.size < key.size
    if isinstance(key, DateKey):
        return _date_matches(key, candidate)
    if isinstance(key, ModSeqKey):
        return row.modseq >= key.modseq  # RFC 7162 §3.1.5
    if isinstance(key, HeaderContains):
        return field_contains(candidate.header, key.field, key.value)
    if isinstance(key, BodyContains):
        return key.value.casefold() in candidate.body_text
    if isinstance(key, TextContains):
        wanted = key.value.casefold()
        return wanted in candidate.header or wanted in candidate.body_text
    if isinstance(key, Not):
        return not matches(key.key, candidate, scope)
    if isinstance(key, Or):
        return matches(key.left, candidate, scope) or matches(key.right, candidate, scope)
    assert isinstance(key, And)
    return all(matches(inner, candidate, scope) for inner in key.keys)


def _date_matches(key: DateKey, candidate: Candidate) -> bool:
    # RFC 9051 §6.4.4: dates compare "disregarding time and timezone": the internal
    # date in the zone it was given in, the Date: header in its own zone.
    day = candidate.sent_date() if key.sent else candidate.row.internal_date.date()
    if day is None:
        return False
    if key.comparison == "before":
        return day < key.date
    if key.comparison == "on":
        return day == key.date
    return day >= key.date
