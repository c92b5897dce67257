"""The queue's pure decisions: what an attempt's replies mean, when to retry, when to warn or give up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from runbox_mta.config import OutboundConfig
from runbox_mta.store.queue import DELAYED, QUEUED, ClaimedRecipient

# Jitter: each delay is scaled by a random factor in [JITTER_LOW, 1], so the
# retries of everything one outage deferred do not arrive together.
JITTER_LOW = 0.75


class State(Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # 4xx, connection or DNS trouble: try again later
    FAILED = "failed"  # 5xx, null MX, nonexistent domain, or queue lifetime over: bounce


@dataclass(frozen=True)
class Result:
    """What one attempt did for one recipient."""

    recipient: ClaimedRecipient
    state: State
    diagnostic: str  # the remote reply, or our reason
    remote_mta: str | None = None
    tls_outcome: str | None = None


def retry_delay(attempts: int, outbound: OutboundConfig, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: exponential, capped, jittered."""
    exponent = min(max(attempts - 1, 0), 32)  # 2**32 x any base is past any cap
    delay = min(outbound.retry_max, outbound.retry_base * 2**exponent)
    return delay * rng.uniform(JITTER_LOW, 1.0)


def expired(result: Result, created_at: datetime, now: datetime, outbound: OutboundConfig) -> Result:
    """A deferral past the queue lifetime becomes a failure (SPEC §5: retries for 5 days)."""
    if result.state is State.DEFERRED and now - created_at >= timedelta(seconds=outbound.max_queue_lifetime):
        return Result(result.recipient, State.FAILED, f"gave up after {_age(now - created_at)}: {result.diagnostic}",
                      result.remote_mta, result.tls_outcome)
    return result


def wants_delay_warning(result: Result, created_at: datetime, now: datetime, outbound: OutboundConfig) -> bool:
    """Deferred, waiting longer than delay_warning, and not warned yet (one warning per recipient)."""
    return (result.state is State.DEFERRED and result.recipient.status == QUEUED
            and now - created_at >= timedelta(seconds=outbound.delay_warning))


def status_after(result: Result, warned: bool) -> str:
    return DELAYED if warned or result.recipient.status == DELAYED else QUEUED


def retry_until(created_at: datetime, outbound: OutboundConfig) -> datetime:
    return created_at + timedelta(seconds=outbound.max_queue_lifetime)


def _age(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"
