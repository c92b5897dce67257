"""The in-process change bus: who must hear that a mailbox changed.

The committer publishes events only after COMMIT returned, so a subscriber
woken by an event always finds the change in the database (mox
store/state.go does the same). IMAP IDLE subscribes to its mailbox; an
account-wide subscription serves NOTIFY-style listeners. On PostgreSQL the
committer also sends each batch's events as a NOTIFY inside its transaction,
and the relay (notify.py) publishes other daemons' events here, so a
subscriber hears every daemon's changes.

Subscribers treat events as "look again" signals and read the state from
the database, so a burst may be summarised as one RESYNC event, and a
subscriber that fell behind is told so (ChangesLost) rather than given a
backlog.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# A subscriber this far behind (a session stuck writing to a slow client) is
# told to re-read state instead of holding an ever-growing backlog.
MAX_PENDING_EVENTS = 10_000


class ChangeKind(StrEnum):
    APPEND = "append"
    EXPUNGE = "expunge"
    FLAGS = "flags"  # flags or keywords of the message changed; modseq is its new MODSEQ
    # Something changed in the mailbox that is not itemised (a summarised burst,
    # or the relay reconnected and may have missed events): re-read it; uid is 0.
    RESYNC = "resync"


@dataclass(frozen=True)
class ChangeEvent:
    account_id: int
    mailbox_id: int
    uid: int
    modseq: int
    kind: ChangeKind


class ChangesLost(Exception):
    """The subscriber fell too far behind: events were dropped; re-read the mailbox state."""


class Subscription:
    """Events for one mailbox, one account or everything, in commit order."""

    def __init__(self, bus: ChangeBus, key: tuple[str, int | None], max_pending: int) -> None:
        self._bus = bus
        self.key = key
        self._queue: asyncio.Queue[ChangeEvent] = asyncio.Queue(max_pending)
        self._lost = False

    def offer(self, event: ChangeEvent) -> None:
        if self._lost:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._lost = True

    async def get(self) -> ChangeEvent:
        """The next event; raises ChangesLost once events had to be dropped (until `clear`)."""
        if self._lost:
            raise ChangesLost("more than MAX_PENDING_EVENTS changes were not consumed")
        return await self._queue.get()

    def clear(self) -> None:
        """Forget the queued events and any loss: the caller is about to re-read the whole state."""
        self._lost = False
        while not self._queue.empty():
            self._queue.get_nowait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChangeEvent:
        return await self.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ChangeBus:
    def __init__(self, max_pending: int = MAX_PENDING_EVENTS) -> None:
        self._max_pending = max_pending
        self._subscribers: defaultdict[tuple[str, int | None], set[Subscription]] = defaultdict(set)
        self._generations: dict[int, int] = {}  # see generation

    def subscribe(self, *, account_id: int | None = None, mailbox_id: int | None = None) -> Subscription:
        """Subscribe to one mailbox, one account, or (neither given) every change."""
        if account_id is not None and mailbox_id is not None:
            raise ValueError("subscribe to an account or to a mailbox, not both")
        if mailbox_id is not None:
            key: tuple[str, int | None] = ("mailbox", mailbox_id)
        elif account_id is not None:
            key = ("account", account_id)
        else:
            key = ("all", None)
        subscription = Subscription(self, key, self._max_pending)
        self._subscribers[key].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.key)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.key]

    def subscribed(self) -> tuple[set[int], set[int]]:
        """The mailbox ids and the account ids someone listens to (the relay's resync list)."""
        mailboxes = {key[1] for key in self._subscribers if key[0] == "mailbox" and key[1] is not None}
        accounts = {key[1] for key in self._subscribers if key[0] == "account" and key[1] is not None}
        return mailboxes, accounts

    def generation(self, mailbox_id: int) -> int:
        """Counts the changes published for the mailbox: a read of it begun at this value has
        seen every change to it published so far."""
        return self._generations.get(mailbox_id, 0)

    def publish(self, events: Iterable[ChangeEvent]) -> None:
        """Hand committed events to their subscribers; call only after COMMIT returned."""
        for event in events:
            self._generations[event.mailbox_id] = self._generations.get(event.mailbox_id, 0) + 1
            for key in (("mailbox", event.mailbox_id), ("account", event.account_id), ("all", None)):
                for subscription in self._subscribers.get(key, ()):
                    subscription.offer(event)
