"""The daemon's shared machinery, exercised with a tiny echo protocol over real sockets:
listener registry, connection limits, idle timeouts, implicit TLS and STARTTLS from
the one TLS factory, crash accounting and draining."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from runbox_mta.app import Daemon, check_listeners
from runbox_mta.config import load_config
from runbox_mta.errors import ConfigError
from runbox_mta.net.listener import IdleTimeout, read_some, serve_streams
from tests.daemon_config import listener_block, write_daemon_config

pytestmark = pytest.mark.timeout(30)


class EchoProtocol:
    """Greets, echoes, upgrades on STARTTLS, crashes on CRASH, works a while on SLOW, says bye
    when cancelled."""

    async def start(self, listener, services):
        async def handle(conn):
            conn.writer.write(b"hello\r\n")
            try:
                while True:
                    try:
                        data = await read_some(conn.reader, services.config.limits.smtp_idle_timeout)
                    except IdleTimeout:
                        conn.writer.write(b"idle timeout\r\n")
                        return
                    if not data:
                        return
                    if data.startswith(b"STARTTLS"):
                        conn.writer.write(b"go ahead\r\n")
                        await conn.start_tls(services.tls.server_context())
                        continue
                    if data.startswith(b"CRASH"):
                        raise RuntimeError("deliberate bug")
                    if data.startswith(b"SLOW"):
                        await asyncio.sleep(0.5)
                        conn.writer.write(b"slow done\r\n")
                        continue
                    conn.writer.write(data)
            except asyncio.CancelledError:
                conn.writer.write(b"bye: shutting down\r\n")
                await conn.writer.drain()
                raise

        return await serve_streams(listener, services, handle, b"busy\r\n")


def make_config(tmp_path: Path, database_url: str, listeners: str, limits: str = "") -> Path:
    return write_daemon_config(tmp_path, database_url, listeners=listeners, limits=limits)


def listener(tls: str = "none", extra: str = "") -> str:
    return listener_block("smtp", tls, extra)  # the echo protocol stands in for smtp


@pytest.fixture
async def start_daemon(tmp_path, database_url):
    daemons = []

    async def start(listeners: str, limits: str = "") -> Daemon:
        config = load_config(make_config(tmp_path, database_url, listeners, limits))
        daemon = Daemon(config, registry={"smtp": EchoProtocol()})
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        await daemon.stop(grace=0.1)
        assert daemon.services.connections.crashes == getattr(daemon, "expected_crashes", 0)


async def connect(daemon: Daemon, index: int = 0, tls: ssl.SSLContext | None = None):
    host, port = daemon.listeners[index].address
    reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname="localhost" if tls else None)
    return reader, writer


def client_tls(tmp_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "server.pem"))
    return context


async def test_a_protocol_this_build_does_not_serve_is_a_config_error(tmp_path, database_url):
    config = load_config(make_config(tmp_path, database_url, listener() + listener(tls="starttls").replace("smtp", "imap")))
    with pytest.raises(ConfigError, match=r"listeners\[1\]\.protocol: imap is not available in this version"):
        check_listeners(config, {"smtp": EchoProtocol()})
    with pytest.raises(ConfigError):
        await Daemon(config, registry={"smtp": EchoProtocol()}).start()


async def test_echo_over_plain_listener(start_daemon):
    daemon = await start_daemon(listener())
    reader, writer = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"
    writer.write(b"ping\r\n")
    assert await reader.readline() == b"ping\r\n"
    writer.close()


async def test_listener_connection_limit_answers_busy(start_daemon):
    daemon = await start_daemon(listener(extra="max_connections = 2"))
    first = await connect(daemon)
    second = await connect(daemon)
    for reader, _ in (first, second):
        assert await reader.readline() == b"hello\r\n"
    reader, _ = await connect(daemon)
    assert await reader.readline() == b"busy\r\n"
    assert await reader.read() == b""  # and closed
    first[1].close()
    await first[1].wait_closed()
    await asyncio.sleep(0.1)
    reader, _ = await connect(daemon)  # a slot is free again
    assert await reader.readline() == b"hello\r\n"


async def test_per_address_limit_spans_listeners(start_daemon):
    daemon = await start_daemon(listener() + listener(), limits="connections_per_address = 2")
    a = await connect(daemon, 0)
    b = await connect(daemon, 1)
    for reader, _ in (a, b):
        assert await reader.readline() == b"hello\r\n"
    reader, _ = await connect(daemon, 0)
    assert await reader.readline() == b"busy\r\n"


async def test_idle_client_is_timed_out(start_daemon):
    daemon = await start_daemon(listener(), limits='smtp_idle_timeout = "0.3s"')
    reader, _ = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"
    assert await reader.readline() == b"idle timeout\r\n"
    assert await reader.read() == b""


async def test_implicit_tls_listener_uses_the_factory_context(start_daemon, tmp_path):
    daemon = await start_daemon(listener(tls="implicit"))
    reader, writer = await connect(daemon, tls=client_tls(tmp_path))
    assert await reader.readline() == b"hello\r\n"
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    writer.write(b"secret\r\n")
    assert await reader.readline() == b"secret\r\n"


async def test_starttls_discards_plaintext_pipelined_after_the_command(start_daemon, tmp_path):
    daemon = await start_daemon(listener(tls="starttls"))
    reader, writer = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"
    # An injected command in the same packet as STARTTLS must never be executed (CVE-2011-0411).
    writer.write(b"STARTTLS\r\nINJECTED\r\n")
    assert await reader.readline() == b"go ahead\r\n"
    await writer.start_tls(client_tls(tmp_path), server_hostname="localhost")
    writer.write(b"after\r\n")
    assert await reader.readline() == b"after\r\n"


async def test_a_drain_ends_idle_connections_at_once_and_busy_ones_after_their_command(start_daemon):
    daemon = await start_daemon(listener())
    idle_reader, _ = await connect(daemon)
    busy_reader, busy_writer = await connect(daemon)
    assert await idle_reader.readline() == await busy_reader.readline() == b"hello\r\n"
    busy_writer.write(b"SLOW\r\n")
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(daemon.stop(grace=60))
    assert await idle_reader.readline() == b"bye: shutting down\r\n"
    assert await busy_reader.readline() == b"slow done\r\n"  # the command in progress finished
    assert await busy_reader.readline() == b"bye: shutting down\r\n"
    await asyncio.wait_for(stopping, 10)  # long before the grace period's end


async def test_a_crashing_handler_is_counted_and_the_daemon_keeps_serving(start_daemon):
    daemon = await start_daemon(listener())
    daemon.expected_crashes = 1
    reader, writer = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"
    writer.write(b"CRASH\r\n")
    assert await reader.read() == b""
    assert daemon.services.connections.crashes == 1
    reader, _ = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"


async def test_stop_drains_then_cancels_live_connections(start_daemon):
    daemon = await start_daemon(listener())
    reader, _ = await connect(daemon)
    assert await reader.readline() == b"hello\r\n"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await daemon.stop(grace=0.3)
    assert loop.time() - started < 2
    assert await reader.readline() == b"bye: shutting down\r\n"
    assert await reader.read() == b""
    with pytest.raises(OSError):
        await connect(daemon)  # no longer accepting
