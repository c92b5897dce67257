"""IMAP sequence sets: "1:5,7,9:*,$" (RFC 9051 §9 sequence-set, RFC 5182 "$").

A `SequenceSet` keeps what the client wrote: ranges as (first, last) pairs,
`None` standing for "*", in the client's order and direction, plus whether
"$" (the result saved by SEARCH RETURN (SAVE)) was named. Nothing is ever
expanded to a list of numbers: `resolve` turns the set into sorted, merged
(low, high) ranges against the current largest number, so "1:*" in a
mailbox of four billion UIDs costs one tuple.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_NUMBER = 2**32 - 1  # RFC 9051 §9: nz-number is a non-zero 32-bit number

Range = tuple[int, int]
_NZ_NUMBER = re.compile(r"[1-9][0-9]*")


class SequenceSetError(ValueError):
    """Not a valid sequence set; str(error) says what is wrong."""


@dataclass(frozen=True)
class SequenceSet:
    ranges: tuple[tuple[int | None, int | None], ...] = ()  # None is "*"
    saved: bool = False  # "$" appeared (RFC 5182 SEARCHRES)

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse the wire form; raise SequenceSetError on anything else."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not text:
            raise SequenceSetError("empty sequence set")
        ranges: list[tuple[int | None, int | None]] = []
        saved = False
        for item in text.split(","):
            if item == "$":
                saved = True
                continue
            first, colon, last = item.partition(":")
            start = _seq_number(first)
            ranges.append((start, _seq_number(last) if colon else start))
        return cls(tuple(ranges), saved)

    def __str__(self) -> str:
        items = [_format_range(first, last) for first, last in self.ranges]
        if self.saved:
            items.append("$")
        return ",".join(items)

    @property
    def uses_star(self) -> bool:
        return any(None in pair for pair in self.ranges)

    def resolve(self, largest: int, saved: Iterable[Range] = ()) -> tuple[Range, ...]:
        """Sorted, merged, non-overlapping (low, high) ranges, "*" read as `largest`.

        RFC 9051 §9: "*" is the largest number in use and a range may be
        written in either order (4:2 is 2:4). `saved` holds the ranges "$"
        stands for. The result is not clipped to `largest`: callers
        intersect it with the numbers that exist (a UID range past the end
        matches nothing; a message number past the end is the caller's error).
        """
        spans = [_ordered(first, last, largest) for first, last in self.ranges]
        if self.saved:
            spans.extend(saved)
        return merge(spans)

    def contains(self, number: int, largest: int, saved: Iterable[Range] = ()) -> bool:
        return any(low <= number <= high for low, high in self.resolve(largest, saved))


def merge(spans: Iterable[Range]) -> tuple[Range, ...]:
    """Sort and merge (low, high) ranges; touching ranges join (1:2,3:4 is 1:4)."""
    merged: list[list[int]] = []
    for low, high in sorted(spans):
        low = max(low, 1)  # "*" in an empty mailbox is 0: no number matches it
        if high < low:
            continue
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


def numbers(ranges: Iterable[Range]) -> Iterator[int]:
    """Iterate the numbers of resolved ranges lazily, in order."""
    for low, high in ranges:
        yield from range(low, high + 1)


def format_uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into the shortest wire form: [1, 2, 3, 5] -> "1:3,5".

    For COPYUID/APPENDUID (RFC 4315 §3) and VANISHED (RFC 7162 §3.2.10)
    responses; an empty set has no wire form.
    """
    ranges = merge((uid, uid) for uid in uids)
    if not ranges:
        raise ValueError("an empty UID set has no wire form")
    return ",".join(_format_range(low, high) for low, high in ranges)


def _seq_number(text: str) -> int | None:
    if text == "*":
        return None
    if not _NZ_NUMBER.fullmatch(text):
        if text == "0":
            raise SequenceSetError("0 in sequence set (message numbers and UIDs start at 1)")
        raise SequenceSetError(f"invalid item {text[:20]!r} in sequence set")
    if len(text) > 10 or int(text) > MAX_NUMBER:
        raise SequenceSetError("number in sequence set exceeds 4294967295")
    return int(text)


def _ordered(first: int | None, last: int | None, largest: int) -> Range:
    low = largest if first is None else first
    high = largest if last is None else last
    return (low, high) if low <= high else (high, low)


def _format_range(first: int | None, last: int | None) -> str:
    if first == last:
        return "*" if first is None else str(first)
    return f"{'*' if first is None else first}:{'*' if last is None else last}"
