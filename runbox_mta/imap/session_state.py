"""The IMAP session's states and the small types the session modules share.

States are one frozen type each (RFC 9051 §3). `Selected` carries the
`MailboxView`, the one mutable part: the session's picture of the selected
mailbox, changed only when the session tells the client (sync, EXPUNGE).
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from runbox_mta.imap.sequence import SequenceSet


class Outcome(enum.Enum):
    CONTINUE = enum.auto()
    CLOSE = enum.auto()
    STARTTLS = enum.auto()  # the OK is written, not flushed: start TLS with no await before
    SASL = enum.auto()  # "+ " sent: the next line is a SASL response
    IDLE = enum.auto()  # "+ idling" sent: wait for DONE, pushing updates
    COMPRESS = enum.auto()  # the OK is written: deflate both directions from here (RFC 4978)


class Output(Protocol):
    def write(self, data: bytes) -> None: ...
    async def flush(self) -> None: ...


@dataclass
class MailboxView:
    """The selected mailbox as the client knows it: message n is uids[n - 1] (RFC 9051 §2.3.1.2)."""

    mailbox_id: int
    name: str
    uidvalidity: int
    readonly: bool
    uids: list[int]
    highestmodseq: int  # changes up to here are reflected (or pending below)
    keywords: set[str]
    pending_expunges: set[int] = field(default_factory=set)  # seen, not yet announced
    own_changes: set[tuple[int, int]] = field(default_factory=set)  # (uid, modseq) already reported
    saved: set[int] = field(default_factory=set)  # UIDs of SEARCH RETURN (SAVE), "$" (RFC 5182)

    def number(self, uid: int) -> int | None:
        index = bisect_left(self.uids, uid)
        return index + 1 if index < len(self.uids) and self.uids[index] == uid else None

    def numbers(self, uids: Iterable[int]) -> list[int]:
        """The message numbers of those of `uids` (ascending) in the view."""
        found, start, size = [], 0, len(self.uids)
        for uid in uids:
            start = bisect_left(self.uids, uid, start)
            if start < size and self.uids[start] == uid:
                found.append(start + 1)
        return found

    def select(self, sequence_set: SequenceSet, uid: bool) -> list[int]:
        """The UIDs a sequence set names; Refused (BAD) for a message number past the end."""
        saved = sorted(self.saved) if sequence_set.saved else []
        if uid:
            ranges = sequence_set.resolve(self.uids[-1] if self.uids else 0, [(one, one) for one in saved])
            chosen: list[int] = []
            for low, high in ranges:
                chosen += self.uids[bisect_left(self.uids, low):bisect_left(self.uids, high + 1)]
            return chosen
        numbers = [number for number in map(self.number, saved) if number is not None]
        ranges = sequence_set.resolve(len(self.uids), [(number, number) for number in numbers])
        if ranges and ranges[-1][1] > len(self.uids):
            raise Refused("Invalid message sequence number.", status="BAD")  # RFC 9051 §9 seq-number
        return [uid for low, high in ranges for uid in self.uids[low - 1:high]]


@dataclass(frozen=True)
class NotAuthenticated:
    pass


@dataclass(frozen=True)
class Authenticated:
    account_id: int
    address: str


@dataclass(frozen=True)
class Selected(Authenticated):
    view: MailboxView  # the mailbox as this session knows it; changed only by sync


State = NotAuthenticated | Authenticated | Selected


class Refused(Exception):
    """The command cannot run; answered in `Session.execute` with its status and code."""

    def __init__(self, text: str, code: str | None = None, status: str = "NO") -> None:
        super().__init__(text)
        self.text, self.code, self.status = text, code, status


class MailboxGone(Exception):
    """The selected mailbox was deleted (or renamed away) by another session: the connection ends with BYE."""
