"""A real Daemon on its own event loop in a thread, so blocking clients
(poplib, imaplib, smtplib) can talk to it from a test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from runbox_mta.app import Daemon
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.config import Config
from runbox_mta.net.listener import ProtocolSpec
from runbox_mta.store import Store

T = TypeVar("T")


class ThreadedDaemon:
    def __init__(self, config: Config, registry: dict[str, ProtocolSpec],
                 new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.config = config
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.daemon = Daemon(config, registry=registry)
        self.call(self.daemon.start())

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the daemon's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    @property
    def store(self) -> Store:
        assert self.daemon.services is not None
        return self.daemon.services.store

    def port(self, tls: str) -> int:
        return next(listener.address[1] for listener in self.daemon.listeners if listener.config.tls == tls)

    def stop(self) -> int:
        """Stop; returns the number of connection handlers that crashed."""
        self.call(self.daemon.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        assert self.daemon.services is not None
        return self.daemon.services.connections.crashes

    def hash(self, password: str) -> str:
        hasher = PasswordHasher(self.config.auth)
        try:
            return hasher.hash(password)
        finally:
            hasher.close()

    def add_account(self, address: str, password: str, messages: list[bytes], **policy: bool) -> tuple[int, int]:
        """example.test hosted, `address` with `messages` in its INBOX; returns (account id, INBOX id)."""
        password_hash = self.hash(password)

        async def setup() -> tuple[int, int]:
            await self.store.add_domain("example.test", "sel", "PEM")
            account = await self.store.add_account(address, password_hash)
            if policy:
                await self.store.update_account(address, **policy)
            inbox = await self.store.get_mailbox(account.id, "INBOX")
            for data in messages:
                await self.store.append(inbox.id, data)
            return account.id, inbox.id

        return self.call(setup())

    def uids(self, mailbox_id: int) -> list[int]:
        async def uids() -> list[int]:
            return [message.uid for message in await self.store.list_messages(mailbox_id)]

        return self.call(uids())
