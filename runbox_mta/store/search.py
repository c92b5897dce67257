"""SEARCH keys as SQL conditions on messages (joined to blobs), so the database
does the scanning a mailbox-wide SEARCH needs.

`condition(key)` gives a `Filter` every matching message satisfies, or None
when SQL can say nothing about the key. An exact filter is the key itself:
the store returns just the matching UIDs. An inexact one only narrows the
candidates (a header word anywhere in the header, not yet in the named
field): when `header_terms` says the stored header then decides, the store
checks the named fields itself and again returns UIDs; otherwise imap.search
decides candidate by candidate. Message numbers and "$"
(InSet), Date: headers, bodies and keyword case rules stay with imap.search.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Date, and_, false, not_, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from runbox_mta.imap.search_keys import (
    All, And, DateKey, HasFlag, HeaderContains, ModSeqKey, Not, Or, SearchKey, SizeKey,
)
from runbox_mta.store import models as m
from runbox_mta.store.flags import SYSTEM_FLAGS

_FLAG_BITS = {name.lower(): bit for name, bit in SYSTEM_FLAGS.items()}


@dataclass(frozen=True)
class Filter:
    condition: ColumnElement[bool]
    exact: bool  # the condition is the key itself, not only implied by it


def condition(key: SearchKey) -> Filter | None:
    if isinstance(key, All):
        return Filter(true(), True)
    if isinstance(key, HasFlag):
        return _flag(key.flag)
    if isinstance(key, SizeKey):
        size = m.Message.size > key.size if key.comparison == "larger" else m.Message.size < key.size
        return Filter(size, True)
    if isinstance(key, ModSeqKey):
        return Filter(m.Message.modseq >= key.modseq, True)  # RFC 7162 §3.1.5
    if isinstance(key, DateKey) and not key.sent:
        return Filter(_compare(LocalDate(), key.comparison, key.date), True)
    if isinstance(key, HeaderContains):
        # The word somewhere in the header (or the field's name, for an empty value); a blob
        # stored without a searchable header is always a candidate.
        word = key.value.casefold() or f"{key.field.casefold()}:"
        return Filter(or_(m.Blob.search_header.is_(None), m.Blob.search_header.contains(word, autoescape=True)),
                      False)
    if isinstance(key, Not):
        inner = condition(key.key)
        return Filter(not_(inner.condition), True) if inner is not None and inner.exact else None
    if isinstance(key, Or):
        left, right = condition(key.left), condition(key.right)
        if left is None or right is None:
            return None
        return Filter(or_(left.condition, right.condition), left.exact and right.exact)
    if isinstance(key, And):
        parts = [condition(inner) for inner in key.keys]
        known = [part for part in parts if part is not None]
        if not known:
            return None
        return Filter(and_(*(part.condition for part in known)), len(known) == len(parts)
                      and all(part.exact for part in known))
    return None  # InSet, BodyContains, TextContains, DateKey on the Date: header


def header_terms(key: SearchKey) -> tuple[HeaderContains, ...] | None:
    """The header words left to check once `condition(key)` holds, when that check decides the
    key: a header key, or an AND of header keys and keys SQL decides exactly. None otherwise
    (OR or NOT over a header key, anything imap.search must see whole)."""
    if isinstance(key, HeaderContains):
        return (key,)
    if not isinstance(key, And):
        return None
    terms: list[HeaderContains] = []
    for inner in key.keys:
        found = condition(inner)
        if isinstance(inner, HeaderContains):
            terms.append(inner)
        elif found is None or not found.exact:
            return None
    return tuple(terms)


def _flag(flag: str) -> Filter | None:
    if not flag.startswith("\\"):
        return None  # keywords: stored as given, matched case-insensitively by imap.search
    bit = _FLAG_BITS.get(flag.lower())
    if bit is None:
        return Filter(false(), True)  # \Recent (never set) or a flag no message can have
    return Filter(m.Message.system_flags.op("&")(bit) != 0, True)


def _compare(day: ColumnElement[date], comparison: str, other: date) -> ColumnElement[bool]:
    if comparison == "before":
        return day < other
    if comparison == "on":
        return day == other
    return day >= other


class LocalDate(FunctionElement[date]):
    """The internal date's day in the zone it was given in (RFC 9051 §6.4.4: "disregarding
    time and timezone"), as imap.search compares it."""

    type = Date()
    inherit_cache = True


@compiles(LocalDate, "sqlite")
def _local_date_sqlite(element: LocalDate, compiler: Any, **kw: Any) -> str:
    # UtcDateTime stores naive UTC text on SQLite; date() applies the offset as a modifier.
    return "date(messages.internal_date, messages.internal_date_offset || ' minutes')"


@compiles(LocalDate, "postgresql")
def _local_date_postgresql(element: LocalDate, compiler: Any, **kw: Any) -> str:
    return ("CAST((messages.internal_date AT TIME ZONE 'UTC') "
            "+ messages.internal_date_offset * INTERVAL '1 minute' AS DATE)")
