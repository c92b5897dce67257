"""The queue worker: a daemon's background service that delivers the outbound queue.

Loop: find destination domains with due recipients, claim (lease) a batch
per free connection slot (at most `max_per_destination` per domain), deliver
each batch in its own task (queue/attempt.py), then record the results:
DSNs first (bounces, delay warnings), then one store write that removes
delivered and bounced recipients and reschedules the rest with back-off.

Lease: LEASE_SECONDS, longer than an attempt may take (ATTEMPT_BUDGET), so
a live worker never loses its lease mid-attempt; a dead worker's lease
expires and another worker (or this daemon restarted) takes the mail over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from runbox_mta.queue.attempt import Attempt, Outbound, Pending, authenticating_context
from runbox_mta.queue.bounces import send_reports
from runbox_mta.queue.mta_sts import MtaSts
from runbox_mta.queue.scheduler import Result, State, expired, retry_delay, status_after, wants_delay_warning
from runbox_mta.store import Store
from runbox_mta.store.queue import ClaimedMessage, Deferral

if TYPE_CHECKING:
    from runbox_mta.app import Services

log = logging.getLogger(__name__)

# 30 min: above the attempt budget plus settling, far below any back-off
# worth having; a killed daemon's mail waits at most this long for another.
LEASE_SECONDS = 1800.0
# An attempt stops after 20 min (RFC 5321 §4.5.3.2 allows 10 min for one
# final dot alone); what it did not finish is deferred.
ATTEMPT_BUDGET = 1200.0
# Recipients per claimed batch, i.e. per connection (all to one domain).
BATCH_RECIPIENTS = 50
# After a failure to reach the database, wait before the next look.
ERROR_PAUSE = 5.0
# Stopping: known results, then the leases left, are each recorded within this
# time (twice this stays inside app.BACKGROUND_GRACE).
SETTLE_ON_STOP = 1.0

def utcnow() -> datetime:
    return datetime.now(UTC)


async def _run(attempt: Attempt) -> None:
    """Run an attempt within its budget; whatever it leaves without a result is deferred."""
    try:
        async with asyncio.timeout(ATTEMPT_BUDGET):
            await attempt.run()
    except TimeoutError:
        log.warning("queue: a delivery attempt ran out of time; the rest is deferred")
    except Exception:
        log.exception("queue: a delivery attempt failed; the rest is deferred")


async def run_queue(services: Services) -> None:
    """The daemon's background service (app.Daemon runs it beside the listeners)."""
    config = services.config.outbound
    authenticated = authenticating_context(services.tls, config.ca_file)
    outbound = Outbound(services.config.hostname, config, services.resolver, services.tls, authenticated,
                        MtaSts(services.resolver, config.mta_sts_port, authenticated))
    await QueueWorker(services.store, outbound).run()


class QueueWorker:
    def __init__(self, store: Store, outbound: Outbound) -> None:
        self._store = store
        self._outbound = outbound
        # Unique per worker run: a restarted daemon does not inherit its predecessor's leases.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._active: Counter[str] = Counter()  # open batches per destination domain
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._next_report = utcnow()
        self._reported_mail = False

    async def run(self) -> None:
        """Deliver until cancelled; batches in flight are stopped and their known results kept."""
        try:
            while True:
                pause = await self._dispatch_safely()
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
                    # a cancellation that races with the event, and the worker would outlive stop().
                    async with asyncio.timeout(pause):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                self._wakeup.clear()
        finally:
            await self._stop_batches()

    async def _dispatch_safely(self) -> float:
        try:
            await self._report()
            await self._dispatch()
        except Exception:
            log.exception("queue: looking for due mail failed")
            return ERROR_PAUSE
        return self._outbound.config.poll_interval

    async def _report(self) -> None:
        """Every status_interval, the queue in numbers (never an address) while it holds mail, and
        once when it has emptied: operators see a stuck queue in the log without `queue list`."""
        now = utcnow()
        if now < self._next_report:
            return
        self._next_report = now + timedelta(seconds=self._outbound.config.status_interval)
        summary = await self._store.queue_summary(now)
        if summary.recipients or self._reported_mail:
            log.info("%s", summary.describe(now))
        self._reported_mail = bool(summary.recipients)

    async def _dispatch(self) -> None:
        now = utcnow()
        limit = self._outbound.config.max_per_destination
        for domain in await self._store.due_destinations(now):
            while self._active[domain] < limit:
                batch = await self._store.claim(domain, self.owner, now, now + timedelta(seconds=LEASE_SECONDS),
                                                BATCH_RECIPIENTS)
                if not batch:
                    break
                self._start(domain, batch)

    def _start(self, domain: str, batch: list[ClaimedMessage]) -> None:
        self._active[domain] += 1
        task = asyncio.create_task(self._deliver(domain, batch), name="queue-batch")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._active[domain] -= 1
            if not self._active[domain]:
                del self._active[domain]
            self._wakeup.set()  # a slot is free: look for more at once

        task.add_done_callback(done)

    async def _deliver(self, domain: str, batch: list[ClaimedMessage]) -> None:
        attempt = Attempt(self._outbound, domain, [])
        try:
            blobs = await self._store.read_queued([message.blob_id for message in batch])
            originals = {message.queue_id: blobs[message.blob_id] for message in batch}
            attempt = Attempt(self._outbound, domain,
                              [Pending(message, originals[message.queue_id]) for message in batch])
            await _run(attempt)
            await self._record(batch, originals, attempt.results)
        except asyncio.CancelledError:
            await asyncio.shield(self._keep_known(attempt, batch))
            raise
        except Exception:
            log.exception("queue: recording a delivery attempt failed")
            await self._keep_known(attempt, batch)

    async def _record(self, batch: list[ClaimedMessage], originals: dict[int, bytes],
                      attempted: list[Result]) -> None:
        """DSNs first, then the store: a crash in between sends a DSN twice, never loses one."""
        now = utcnow()
        config = self._outbound.config
        created = {recipient.id: message.created_at for message in batch for recipient in message.recipients}
        known = {result.recipient.id for result in attempted}
        results = [expired(result, created[result.recipient.id], now, config) for result in attempted]
        results += [expired(Result(recipient, State.DEFERRED, "attempt interrupted"), message.created_at, now, config)
                    for message in batch for recipient in message.recipients if recipient.id not in known]
        warned = {result.recipient.id for result in results
                  if wants_delay_warning(result, created[result.recipient.id], now, config)}
        reported = await send_reports(self._store, self._outbound, batch, originals, results, warned, now)
        finished = {result.recipient.id for result in results if result.state is State.DELIVERED
                    or (result.state is State.FAILED and result.recipient.id in reported)}
        deferred = [self._deferral(result, now, warned & reported) for result in results
                    if result.recipient.id not in finished]
        await self._store.settle(self.owner, sorted(finished), deferred)

    def _deferral(self, result: Result, now: datetime, warned: set[int]) -> Deferral:
        recipient = result.recipient
        delay = retry_delay(recipient.attempts + 1, self._outbound.config, self._outbound.rng)
        return Deferral(recipient.id, result.diagnostic, now + timedelta(seconds=delay), result.tls_outcome,
                        status_after(result, recipient.id in warned))

    async def _keep_known(self, attempt: Attempt, batch: Sequence[ClaimedMessage]) -> None:
        """Stopping or failing: delivered recipients go, everything else is given back for the next try."""
        delivered = [result.recipient.id for result in attempt.results if result.state is State.DELIVERED]
        claimed = [recipient.id for message in batch for recipient in message.recipients]
        try:
            async with asyncio.timeout(SETTLE_ON_STOP):
                await self._store.settle(self.owner, delivered, [])
                await self._store.release_leases(self.owner, [rid for rid in claimed if rid not in delivered])
        except Exception:
            log.warning("queue: could not record the state at stop; leases expire on their own", exc_info=True)

    async def _stop_batches(self) -> None:
        """Stop every batch (each records what it knows), then give back any lease still held:
        a claim cancelled in flight may have committed without its batch ever starting."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=SETTLE_ON_STOP)
        try:
            async with asyncio.timeout(SETTLE_ON_STOP):
                await asyncio.shield(self._store.release_leases(self.owner))
        except Exception:
            log.warning("queue: could not give leases back at stop; they expire on their own", exc_info=True)
