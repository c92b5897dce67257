"""Lookup answers kept for a few seconds.

Under load the same recipients, senders and signing domains are looked up
many times a second, each a worker-thread trip and a query. Like Postfix's
and Dovecot's lookup caches, the store keeps answers briefly: a change made
through this store clears them at once; one made by the CLI (another
process) is seen within the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

TTL = 5.0  # seconds
MAX_ENTRIES = 10_000


class Recent(Generic[K, V]):
    def __init__(self, ttl: float = TTL, size: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = (self._clock() + self._ttl, value)

    def clear(self) -> None:
        self._entries.clear()
