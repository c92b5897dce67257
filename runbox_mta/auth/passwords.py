"""Argon2id password hashing (SPEC §7), kept off the event loop.

Hashes are PHC strings (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``), so
each carries the parameters it was made with: `needs_rehash` compares them
with the configured ones and the auth service upgrades a hash on the next
successful login, the only moment the clear-text password is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from runbox_mta.config import AuthConfig

# Each Argon2 call holds `argon2_memory_kib` (64 MiB by default) while it
# runs; a small pool bounds that memory and the CPU a login flood can take,
# queueing further logins instead of exhausting the machine.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

T = TypeVar("T")


class PasswordHasher:
    """Argon2id with the configured cost; one instance is shared by every protocol.

    The synchronous methods do the work in the calling thread (for the CLI);
    the ``*_async`` methods run it in a dedicated thread pool because a
    single verification takes tens of milliseconds of CPU, which would stall
    every connection on the event loop. argon2-cffi calls into C through cffi,
    which releases the GIL, so the pool's threads really run in parallel.

    Construct it at start-up: it computes a dummy hash once, with the same
    parameters, which unknown accounts are verified against so a failed login
    costs the same whether or not the account exists (SPEC §7).
    """

    def __init__(self, config: AuthConfig, *, workers: int = DEFAULT_WORKERS) -> None:
        self._argon2 = argon2.PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._dummy_hash = self._argon2.hash(secrets.token_hex(32))

    def hash(self, password: str) -> str:
        """A fresh Argon2id hash (random salt) of `password` with the configured cost."""
        return self._argon2.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """Whether `password` matches `password_hash`; never raises for bad input.

        A wrong password, a malformed or non-Argon2 hash, or a password that
        is not encodable (lone surrogates) all give False. A malformed hash
        still costs one verification against the dummy hash, so an account
        without a usable password is not distinguishable by timing.
        """
        try:
            return self._argon2.verify(password_hash, password)
        except InvalidHashError:
            self._burn(password)
            return False
        except (VerificationError, UnicodeError):
            return False

    def verify_dummy(self, password: str) -> bool:
        """Spend one verification on the dummy hash, for an account that does not exist; False."""
        self.verify(self._dummy_hash, password)
        return False

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether `password_hash` was made with other parameters (or is unreadable)."""
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except (InvalidHashError, UnicodeError):
            return True  # never one we would make today

    async def hash_async(self, password: str) -> str:
        return await self._run(self.hash, password)

    async def verify_async(self, password_hash: str, password: str) -> bool:
        return await self._run(self.verify, password_hash, password)

    async def verify_dummy_async(self, password: str) -> bool:
        return await self._run(self.verify_dummy, password)

    def close(self) -> None:
        """Stop the worker threads (daemon shutdown); queued work is cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _burn(self, password: str) -> None:
        # Failing is the expected outcome: only the time spent matters.
        with contextlib.suppress(VerificationError, UnicodeError):
            self._argon2.verify(self._dummy_hash, password)

    async def _run(self, function: Callable[..., T], *args: str) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
