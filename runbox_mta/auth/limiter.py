"""The failed-login limiter shared by every protocol (SPEC §7, DESIGN "Auth is shared").

Two tables, both in memory, both bounded:

- Per client address (an IPv6 host is keyed by its /64, the block one host
  or customer normally holds): after `free_failures` failures each further
  attempt waits ``base * 2**(n - free)`` seconds, capped at `max_delay`.
  With the defaults (3, 1 s, 30 s) that is 1, 2, 4, 8, 16, 30, 30 ... Waits
  are reserved as consecutive slots, so opening parallel connections does
  not multiply an address's guess rate.
- Per account: locked for `failure_window` once `account_lockout_failures`
  (default 50) failures accumulate. Each address contributes at most the
  failures it takes to reach the maximum delay (3 + 5 = 8 by default;
  always fewer than the lockout), so one address alone can never lock an
  account: its own delay bites first, and a lock needs several address
  blocks (7 by default), i.e. a distributed attack.

A success clears the address's counter only when all its failures were for
that same account (a user's typos); otherwise an attacker holding any valid
account could reset their throttle by logging in to it between guesses.
Entries decay `failure_window` seconds after their last failure. Each table
holds at most `max_entries` keys, evicting the least recently failed, so
rotating addresses or account names costs bounded memory (about 100 bytes
an entry). Account names are kept as 16-byte digests: a long or hostile
login name costs no more memory than a short one, and no names sit in memory.

Not thread-safe: it lives on the daemon's event loop, with no awaits inside.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from runbox_mta.config import AuthConfig
from runbox_mta.net.clients import address_key

MAX_ENTRIES = 100_000


class _Expiring(Protocol):
    expires: float


E = TypeVar("E", bound=_Expiring)


@dataclass(slots=True)
class _AddressEntry:
    failures: int
    account: bytes | None  # the one account all failures were for; None once mixed
    expires: float
    next_slot: float  # when the latest reserved attempt may run


@dataclass(slots=True)
class _AccountEntry:
    failures: int
    expires: float
    locked_until: float = 0.0


class _Table(Generic[E]):
    """Key -> entry, ordered by last failure, which is also the order of expiry."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[object, E] = OrderedDict()
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object, now: float) -> E | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            return None
        return entry

    def put(self, key: object, entry: E) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def remove(self, key: object) -> None:
        self._entries.pop(key, None)

    def purge(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now:
                return
            self._entries.popitem(last=False)


def _account_key(account: str) -> bytes:
    return hashlib.blake2b(account.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class LoginLimiter:
    """Delays and temporary locks after failed logins; see the module docstring."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._config = config
        self._clock = clock
        self._addresses: _Table[_AddressEntry] = _Table(max_entries)
        self._accounts: _Table[_AccountEntry] = _Table(max_entries)
        self.address_share = _address_share(config)

    def reserve_attempt(self, client_address: str) -> float:
        """Seconds this client must wait before its login attempt is checked.

        Reserves the slot: a second attempt reserved before the first one
        runs waits one more step after it.
        """
        now = self._clock()
        entry = self._addresses.get(address_key(client_address), now)
        if entry is None or entry.failures < self._config.free_failures:
            return 0.0
        entry.next_slot = max(now, entry.next_slot) + self._step(entry.failures)
        return entry.next_slot - now

    def record_failure(self, client_address: str, account: str) -> None:
        now = self._clock()
        self._addresses.purge(now)
        self._accounts.purge(now)
        key, account_id = address_key(client_address), _account_key(account)
        entry = self._addresses.get(key, now) or _AddressEntry(0, account_id, 0.0, now)
        entry.failures += 1
        if entry.account != account_id:
            entry.account = None
        entry.expires = now + self._config.failure_window
        self._addresses.put(key, entry)
        if entry.failures <= self.address_share:
            self._count_account_failure(account_id, now)

    def record_success(self, client_address: str, account: str) -> None:
        key = address_key(client_address)
        entry = self._addresses.get(key, self._clock())
        if entry is not None and entry.account == _account_key(account):
            self._addresses.remove(key)

    def is_account_locked(self, account: str) -> bool:
        now = self._clock()
        entry = self._accounts.get(_account_key(account), now)
        return entry is not None and entry.locked_until > now

    def table_sizes(self) -> tuple[int, int]:
        """(addresses, accounts) currently tracked: for tests and metrics."""
        return len(self._addresses), len(self._accounts)

    def _step(self, failures: int) -> float:
        # The exponent is capped so a huge failure count cannot overflow a float.
        exponent = min(failures - self._config.free_failures, 64)
        return min(self._config.failure_base_delay * 2.0**exponent, self._config.failure_max_delay)

    def _count_account_failure(self, account_id: bytes, now: float) -> None:
        entry = self._accounts.get(account_id, now) or _AccountEntry(0, 0.0)
        if entry.locked_until > now:
            return  # a lock runs its fixed course; late failures do not extend it
        entry.failures += 1
        entry.expires = now + self._config.failure_window
        if entry.failures >= self._config.account_lockout_failures:
            entry.failures = 0  # after the lock the count starts afresh
            entry.locked_until = entry.expires
        self._accounts.put(account_id, entry)


def _address_share(config: AuthConfig) -> int:
    """How many failures one address may add to an account's count.

    Enough to reach the maximum delay (the address limit has then fully
    bitten), but always fewer than the lockout, so no single address locks.
    """
    steps = max(0, math.ceil(math.log2(config.failure_max_delay / config.failure_base_delay)))
    return max(1, min(config.free_failures + steps, config.account_lockout_failures - 1))
