"""Daemon lifecycle: build services, bind, drop root, serve, reload, drain.

Order matters and is deliberate:
1. load certificates (fail before touching the network if they are bad);
2. bind every listener (privileged ports need root or CAP_NET_BIND_SERVICE);
3. drop root to the configured user, so the database and everything after it
   is created and opened unprivileged;
4. open the store, which refuses an out-of-date schema;
5. start each protocol on its socket, then the background services (the
   outbound queue worker; on PostgreSQL the change relay), tell systemd READY=1.
SIGHUP reloads certificates for new handshakes; SIGTERM/SIGINT stop accepting,
give live connections a grace period, cancel the rest and exit within 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from runbox_mta import systemd
from runbox_mta.auth.service import AuthService
from runbox_mta.config import Config
from runbox_mta.dns import Resolver
from runbox_mta.errors import ConfigError, RunboxError
from runbox_mta.imap.server import ImapProtocol
from runbox_mta.log import client_label
from runbox_mta.net.listener import BoundListener, ConnectionTracker, ProtocolSpec, bind_listener
from runbox_mta.pop3.server import Pop3Protocol
from runbox_mta.queue.worker import run_queue
from runbox_mta.smtp.server import SmtpProtocol
from runbox_mta.store import Store, open_store
from runbox_mta.store.db import load_driver
from runbox_mta.tls import TlsContextFactory

log = logging.getLogger("runbox_mta")

# SPEC §8: exit within 10 s of SIGTERM: 8 s for connections to finish, 1 s
# for cancelled ones to say goodbye, the rest for closing the store.
DRAIN_GRACE = 8.0
# Background services get this long after cancellation to record their state
# (e.g. the queue's finished deliveries); it runs alongside the drain.
BACKGROUND_GRACE = 3.0


@dataclass(frozen=True)
class Services:
    """Everything a protocol session may use; built once per daemon."""

    config: Config
    tls: TlsContextFactory
    store: Store
    auth: AuthService
    connections: ConnectionTracker
    resolver: Resolver  # [outbound] nameservers, or the system's


def protocol_registry() -> dict[str, ProtocolSpec]:
    """The protocols this build serves, by config name; each protocol package adds itself here."""
    return {
        "smtp": SmtpProtocol(submission=False),
        "submission": SmtpProtocol(submission=True),
        "imap": ImapProtocol(),
        "pop3": Pop3Protocol(),
    }


# A long-running task beside the listeners (the outbound queue); cancelled at stop.
BackgroundService = Callable[[Services], Coroutine[Any, Any, None]]


def background_services(config: Config) -> list[BackgroundService]:
    """The services a daemon with this config runs beside its listeners."""
    services: list[BackgroundService] = [run_queue] if config.outbound.enabled else []
    if make_url(config.database.url).get_backend_name() == "postgresql":
        services.append(relay_changes)  # other daemons share the store: hear their changes
    return services


async def relay_changes(services: Services) -> None:
    """Other daemons' committed changes onto this daemon's change bus (IMAP IDLE pushes them)."""
    await services.store.relay.run()


def check_listeners(config: Config, registry: dict[str, ProtocolSpec]) -> None:
    """A listener whose protocol this build does not serve is a config error."""
    for i, listener in enumerate(config.listeners):
        if listener.protocol not in registry:
            raise ConfigError(
                f"{config.path}: listeners[{i}].protocol: {listener.protocol} is not available in this version"
            )


def drop_privileges(user: str | None) -> None:
    """Become `user` when started as root (after binding, before touching any state)."""
    if os.geteuid() != 0:
        return
    if not user:
        # Development (scripts/serve as root) must just work; production runs
        # unprivileged from the systemd unit, or names a user here.
        log.warning("serving as root: set `user` in the config to drop privileges after binding")
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RunboxError(f"user: no such system user: {user}") from None
    if entry.pw_uid == 0:
        log.warning("serving as root, as the config's `user = %s` asks", user)
        return
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if 0 in (os.getuid(), os.geteuid()):
        raise RunboxError("could not drop root privileges")
    # Libraries look in $HOME (e.g. ~/.postgresql for client certificates);
    # root's home is neither ours nor readable any more.
    os.environ.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)


class Daemon:
    """One running daemon; `start` then `stop` (tests) or `run` (the CLI)."""

    def __init__(self, config: Config, registry: dict[str, ProtocolSpec] | None = None,
                 background: Sequence[BackgroundService] | None = None) -> None:
        self.config = config
        self.registry = protocol_registry() if registry is None else registry
        self.background = background_services(config) if background is None else list(background)
        self._background_tasks: list[asyncio.Task[None]] = []
        self.listeners: list[BoundListener] = []
        self.services: Services | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        check_listeners(self.config, self.registry)
        tls = TlsContextFactory(self.config.tls)
        load_driver(self.config.database.url)
        self.listeners = [bind_listener(listener) for listener in self.config.listeners]
        try:
            drop_privileges(self.config.user)
            store = await open_store(self.config.database.url, data_dir=self.config.data_dir)
        except BaseException:
            self._close_sockets()
            raise
        self.services = Services(
            config=self.config, tls=tls, store=store,
            auth=AuthService(store, self.config.auth, debug=self.config.debug),
            connections=ConnectionTracker(self.config.limits.connections_per_address),
            resolver=Resolver(self.config.outbound.nameservers),
        )
        asyncio.get_running_loop().set_exception_handler(_private_exception_handler)
        for listener in self.listeners:
            protocol = self.registry[listener.config.protocol]
            self._servers.append(await protocol.start(listener, self.services))
        self._background_tasks = [asyncio.create_task(_supervised(service, self.services))
                                  for service in self.background]
        self._start_watchdog()
        systemd.notify("READY=1\nSTATUS=serving")

    def reload_tls(self) -> None:
        if self.services is None:
            return  # still starting: the certificates are being loaded right now
        systemd.notify("RELOADING=1")
        try:
            self.services.tls.reload()
            log.info("certificates reloaded")
        except RunboxError as error:
            log.error("certificate reload failed, still serving the old ones: %s", error)
        systemd.notify("READY=1")

    async def stop(self, grace: float = DRAIN_GRACE) -> None:
        if self._stopped:
            return
        self._stopped = True
        systemd.notify("STOPPING=1")
        if self._watchdog:
            self._watchdog.cancel()
        for server in self._servers:
            server.close()
        self._close_sockets()
        for task in self._background_tasks:
            task.cancel()
        if self.services:
            await asyncio.gather(self.services.connections.drain(grace), self._stop_background())
            self.services.auth.close()
            await self.services.store.close()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads certificates."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        # Handlers go in before READY=1: systemd may signal as soon as it hears it.
        loop.add_signal_handler(signal.SIGHUP, self.reload_tls)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await self.start()
        for listener in self.listeners:
            print(f"listening: {listener.describe()}", flush=True)
        if not self.listeners:
            print("no listeners configured", flush=True)
        log.info("runbox-mta serving as %s", self.config.hostname)
        await stopping.wait()
        log.info("stopping: draining %d connections", self.services.connections.live if self.services else 0)
        await self.stop()

    async def _stop_background(self) -> None:
        if self._background_tasks:
            await asyncio.wait(self._background_tasks, timeout=BACKGROUND_GRACE)

    def _start_watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = asyncio.create_task(_watchdog(interval))

    def _close_sockets(self) -> None:
        for listener in self.listeners:
            listener.sock.close()


async def _supervised(service: BackgroundService, services: Services) -> None:
    """Run a background service; a crash is logged, never silently lost with its task."""
    try:
        await service(services)
    except Exception:
        log.exception("background service %s stopped", getattr(service, "__name__", service))


async def _watchdog(interval: float) -> None:
    # A ping proves the event loop still turns; a wedged loop gets restarted.
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _private_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler prints transports with peer addresses; keep logs free of them."""
    error = context.get("exception")
    detail = f": {type(error).__name__}: {error}" if error else ""
    log.warning("%s%s (%s)", context.get("message", "event loop error"), detail, client_label(context.get("transport")))
