"""A mailbox's UIDs, flags and MODSEQs in memory, kept current from its changes.

Opening a mailbox reads every message's UID, FETCH FLAGS many messages'
flags, and on a busy mailbox many sessions do so many times a minute: read
from the database each time, that was most of the IMAP CPU (a 10,000-message
SELECT took 8 ms, FETCH FLAGS of 100 messages 4 ms). The store keeps one
`MailboxIndex` per mailbox in use instead, built by one full read and then
brought up to date with `changes_since` (the same read sessions share), so
it is as current as what any session is told. Dovecot keeps the same thing in
its dovecot.index files.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Up to this many expunged messages are taken out one by one; more, by copying what stays.
FEW_EXPUNGES = 32


class FlagChange(NamedTuple):  # a tuple: made by the hundred thousand (FETCH 1:* FLAGS), cheaper than a dataclass
    uid: int
    modseq: int
    flags: frozenset[str]


@dataclass(frozen=True)
class Changes:
    highestmodseq: int
    uidnext: int
    changed: tuple[FlagChange, ...]  # new or changed messages, UID order
    expunged: tuple[int, ...]


class MailboxIndex:
    """The mailbox as of `highestmodseq`: parallel lists in UID order."""

    def __init__(self, mailbox_id: int, uidvalidity: int, highestmodseq: int, uidnext: int,
                 messages: Iterable[FlagChange]) -> None:
        self.mailbox_id = mailbox_id
        self.uidvalidity = uidvalidity
        self.highestmodseq = highestmodseq
        self.uidnext = uidnext
        self.uids: list[int] = []
        self.modseqs: list[int] = []
        self.flags: list[frozenset[str]] = []
        self.keywords: set[str] = set()  # every keyword seen; kept once unused, as FLAGS may list it
        for message in messages:
            self._put(message)

    def __len__(self) -> int:
        return len(self.uids)

    def apply(self, changes: Changes) -> None:
        """Bring the index from `highestmodseq` to `changes.highestmodseq` (changes since the former)."""
        if len(changes.expunged) > FEW_EXPUNGES:
            gone = set(changes.expunged)
            kept = [index for index, uid in enumerate(self.uids) if uid not in gone]
            if len(kept) != len(self.uids):
                self.uids = [self.uids[index] for index in kept]
                self.modseqs = [self.modseqs[index] for index in kept]
                self.flags = [self.flags[index] for index in kept]
        else:  # the usual one or two: a search and a move of the tail each, not three new lists
            for uid in changes.expunged:
                index = bisect_left(self.uids, uid)
                if index < len(self.uids) and self.uids[index] == uid:
                    del self.uids[index], self.modseqs[index], self.flags[index]
        for change in changes.changed:
            self._put(change)
        self.highestmodseq = changes.highestmodseq
        self.uidnext = changes.uidnext

    def _put(self, message: FlagChange) -> None:
        self.keywords.update(flag for flag in message.flags if not flag.startswith("\\"))
        uids = self.uids
        if not uids or message.uid > uids[-1]:  # new messages: UIDs are committed in ascending order
            uids.append(message.uid)
            self.modseqs.append(message.modseq)
            self.flags.append(message.flags)
            return
        index = bisect_left(uids, message.uid)
        if index < len(uids) and uids[index] == message.uid:
            self.modseqs[index] = message.modseq
            self.flags[index] = message.flags
        else:
            uids.insert(index, message.uid)
            self.modseqs.insert(index, message.modseq)
            self.flags.insert(index, message.flags)

    def messages(self, uids: Sequence[int], changedsince: int | None = None) -> list[FlagChange]:
        """The messages among `uids` (ascending) that exist, with a MODSEQ above `changedsince` if given."""
        found: list[FlagChange] = []
        start, size, all_uids = 0, len(self.uids), self.uids
        for uid in uids:
            start = bisect_left(all_uids, uid, start)
            if start == size:
                break
            if all_uids[start] == uid and (changedsince is None or self.modseqs[start] > changedsince):
                found.append(FlagChange(uid, self.modseqs[start], self.flags[start]))
        return found
