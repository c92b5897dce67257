"""What the outbound queue worker needs from the store: leases, attempts, results.

`QueueStore` is mixed into `Store` (api.py), which also holds enqueue,
list_queue and remove_queued.

Exactly once across daemons: a worker *claims* due recipients of one
destination domain by writing its owner id and a lease deadline on their
rows, in one committed job. On PostgreSQL the claiming SELECT takes the rows
`FOR UPDATE SKIP LOCKED`, so two daemons claiming at the same moment take
disjoint rows without waiting for each other, and a row claimed and
committed by one is excluded for the other by its lease. On SQLite the
committer is the only writer of its file (BEGIN IMMEDIATE), so the lease
check and the lease write cannot interleave with another claim.

Nothing acknowledged is lost: rows are deleted only once delivered (or
bounced), and only by their lease holder. A claim whose holder dies (kill -9)
simply expires: after `lease_until` the rows are due again.

Recipient states: "queued" (waiting), "delayed" (waiting, and the sender has
already had its delay warning, RFC 3464 Action: delayed). Delivered and
bounced recipients are deleted, and a queue message goes with its last
recipient, releasing its blob.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Row, and_, bindparam, case, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.store import models as m
from runbox_mta.store.models import UtcDateTime
from runbox_mta.store.blobs import BlobStore
from runbox_mta.store.changes import ChangeEvent
from runbox_mta.store.db import connect, in_chunks

if TYPE_CHECKING:
    from runbox_mta.store.committer import Job

T = TypeVar("T")

QUEUED = "queued"
DELAYED = "delayed"  # still queued; the delay warning went out
WAITING = (QUEUED, DELAYED)


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    address: str
    status: str
    attempts: int  # attempts before this one


@dataclass(frozen=True)
class ClaimedMessage:
    """One queued message with those of its recipients this worker now leases."""

    queue_id: int
    sender: str  # "" for the null reverse-path
    created_at: datetime
    blob_id: int
    recipients: tuple[ClaimedRecipient, ...]


@dataclass(frozen=True)
class Deferral:
    """A recipient that stays queued after an attempt."""

    recipient_id: int
    error: str
    next_attempt_at: datetime
    tls_outcome: str | None
    status: str = QUEUED


@dataclass(frozen=True)
class QueueSummary:
    """The queue in numbers, for logs and `queue list`: no addresses, no domains."""

    messages: int
    recipients: int
    in_delivery: int  # leased by a worker now
    due: int  # waiting for a free connection
    deferred: int  # waiting for their next attempt after a failure
    delay_warned: int  # of all these, recipients whose sender has had a delay warning
    oldest: datetime | None  # when the oldest queued message arrived

    def describe(self, now: datetime) -> str:
        if not self.recipients:
            return "queue: empty"
        age = _duration((now - self.oldest).total_seconds()) if self.oldest else "?"
        return (f"queue: {_count(self.messages, 'message')}, {_count(self.recipients, 'recipient')}: "
                f"{self.in_delivery} in delivery, "
                f"{self.due} due, {self.deferred} deferred ({self.delay_warned} past the delay warning); "
                f"oldest {age}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 1440}d {minutes // 60 % 24}h" if minutes >= 1440 else f"{minutes // 60}h {minutes % 60}m"


class QueueStore:
    """The queue-worker part of `Store`."""

    if TYPE_CHECKING:
        _engine: AsyncEngine
        _blobs: BlobStore

        async def _write(self, job: Job[T]) -> T: ...

        async def _lookup(self, read: Callable[[AsyncConnection], Awaitable[T]]) -> T: ...

    async def queue_summary(self, now: datetime) -> QueueSummary:
        recipient = m.QueueRecipient
        leased = and_(recipient.lease_until.is_not(None), recipient.lease_until >= now)
        due = and_(~leased, recipient.next_attempt_at <= now)

        def count(condition: Any) -> Any:
            return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

        async with connect(self._engine) as conn:
            row = (await conn.execute(select(
                func.count(recipient.id), count(leased), count(due), count(recipient.status == DELAYED),
            ).where(recipient.status.in_(WAITING)))).one()
            messages, oldest = (await conn.execute(
                select(func.count(m.QueueMessage.id), func.min(m.QueueMessage.created_at))
            )).one()
        total, in_delivery, due_now, warned = (int(value) for value in row)
        return QueueSummary(messages, total, in_delivery, due_now, total - in_delivery - due_now, warned, oldest)

    async def due_destinations(self, now: datetime, limit: int = 100) -> list[str]:
        """Destination domains with recipients due and not leased, most overdue first."""
        due = func.min(m.QueueRecipient.next_attempt_at)
        query = (select(m.QueueRecipient.domain).where(*_claimable(now))
                 .group_by(m.QueueRecipient.domain).order_by(due).limit(limit))
        async with connect(self._engine) as conn:
            return list(await conn.scalars(query))

    async def claim(self, domain: str, owner: str, now: datetime, lease_until: datetime,
                    max_recipients: int) -> list[ClaimedMessage]:
        """Lease up to `max_recipients` due recipients at `domain` for `owner`, grouped by message."""

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> list[ClaimedMessage]:
            ids = list(await conn.scalars(_CLAIMABLE, {"domain": domain, "now": now, "limit": max_recipients}))
            if not ids:
                return []
            await conn.execute(_LEASE, {"ids": ids, "owner": owner, "until": lease_until})
            return _group((await conn.execute(_CLAIMED, {"ids": ids})).all())

        return await self._write(job)

    async def read_queued(self, blob_ids: Sequence[int]) -> dict[int, bytes]:
        """The queued copies' bytes by blob id, in one lookup for a whole claimed batch."""
        return await self._lookup(lambda conn: self._blobs.get_many(conn, blob_ids))

    async def settle(self, owner: str, finished: Sequence[int], deferred: Sequence[Deferral]) -> None:
        """Record an attempt: `finished` recipients (delivered or bounced) go, `deferred` ones wait.

        Rows whose lease `owner` no longer holds are left alone: their new holder decides.
        """

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            message_ids: set[int] = set()
            for chunk in in_chunks(sorted(finished)):
                message_ids.update(await conn.scalars(_FINISH, {"ids": chunk, "owner": owner}))
            for entry in deferred:
                await conn.execute(_DEFER, {
                    "recipient_id": entry.recipient_id, "owner": owner, "new_status": entry.status,
                    "next_attempt": entry.next_attempt_at, "error": entry.error, "tls": entry.tls_outcome})
            await self._drop_finished_messages(conn, message_ids)

        await self._write(job)

    async def release_leases(self, owner: str, recipient_ids: Sequence[int] | None = None) -> None:
        """Give claimed recipients (all of `owner`'s when None) back untouched: a worker stopping."""
        recipient = m.QueueRecipient
        release = update(recipient).where(recipient.lease_owner == owner).values(lease_owner=None, lease_until=None)

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> None:
            if recipient_ids is None:
                await conn.execute(release)
            for chunk in in_chunks(sorted(recipient_ids or ())):
                await conn.execute(release.where(recipient.id.in_(chunk)))

        await self._write(job)

    async def flush_queue(self, now: datetime) -> int:
        """Make every waiting recipient due now (`queue flush`); returns how many."""
        recipient = m.QueueRecipient

        async def job(conn: AsyncConnection, events: list[ChangeEvent]) -> int:
            result = await conn.execute(update(recipient).where(recipient.status.in_(WAITING))
                                        .values(next_attempt_at=now))
            return result.rowcount

        return await self._write(job)

    async def _drop_finished_messages(self, conn: AsyncConnection, message_ids: set[int]) -> None:
        """Delete the messages among `message_ids` that have no recipient left, and their blobs."""
        blob_ids: list[int] = []
        for chunk in in_chunks(sorted(message_ids)):
            blob_ids += await conn.scalars(_DROP_FINISHED, {"ids": chunk})
        await self._blobs.release(conn, blob_ids)


def _claimable(now: Any) -> tuple[Any, ...]:
    recipient = m.QueueRecipient
    return (recipient.status.in_(WAITING), recipient.next_attempt_at <= now,
            or_(recipient.lease_until.is_(None), recipient.lease_until < now))


# The statements every delivery runs, built once (building one costs more than running it).
_recipient = m.QueueRecipient
_ids = bindparam("ids", expanding=True)
_mine = _recipient.lease_owner == bindparam("owner")
_CLAIMABLE = (
    select(_recipient.id)
    .where(_recipient.domain == bindparam("domain"), *_claimable(bindparam("now", type_=UtcDateTime())))
    .order_by(_recipient.next_attempt_at, _recipient.id).limit(bindparam("limit"))
    # PostgreSQL: concurrent claimers skip each other's rows; SQLite ignores it.
    .with_for_update(skip_locked=True)
)
_LEASE = (update(_recipient).where(_recipient.id.in_(_ids))
          .values(lease_owner=bindparam("owner"), lease_until=bindparam("until", type_=UtcDateTime())))
_CLAIMED = (
    select(_recipient.id, _recipient.recipient, _recipient.status, _recipient.attempts,
           m.QueueMessage.id.label("queue_id"), m.QueueMessage.sender, m.QueueMessage.created_at,
           m.QueueMessage.blob_id)
    .join(m.QueueMessage).where(_recipient.id.in_(_ids)).order_by(m.QueueMessage.id, _recipient.id)
)
_FINISH = delete(_recipient).where(_recipient.id.in_(_ids), _mine).returning(_recipient.queue_message_id)
_DEFER = update(_recipient).where(_recipient.id == bindparam("recipient_id"), _mine).values(
    status=bindparam("new_status"), attempts=_recipient.attempts + 1,
    next_attempt_at=bindparam("next_attempt", type_=UtcDateTime()), last_error=bindparam("error"),
    tls_outcome=bindparam("tls"), lease_owner=None, lease_until=None,
)
_DROP_FINISHED = delete(m.QueueMessage).where(
    m.QueueMessage.id.in_(_ids), ~exists().where(m.QueueRecipient.queue_message_id == m.QueueMessage.id),
).returning(m.QueueMessage.blob_id)


def _group(rows: Sequence[Row[Any]]) -> list[ClaimedMessage]:
    """Rows ordered by message, then recipient, as ClaimedMessages."""
    messages: dict[int, tuple[Row[Any], list[ClaimedRecipient]]] = {}
    for row in rows:
        _, recipients = messages.setdefault(row.queue_id, (row, []))
        recipients.append(ClaimedRecipient(row.id, row.recipient, row.status, row.attempts))
    return [ClaimedMessage(first.queue_id, first.sender, first.created_at, first.blob_id, tuple(recipients))
            for first, recipients in messages.values()]
