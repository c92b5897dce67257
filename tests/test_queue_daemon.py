"""The Daemon's background-service hook, which runs the queue worker beside the listeners."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from runbox_mta.app import BACKGROUND_GRACE, Daemon, Services, background_services
from runbox_mta.config import load_config
from runbox_mta.queue.worker import run_queue
from tests.daemon_config import write_daemon_config


async def test_background_services_start_after_the_store_and_stop_with_the_daemon(
        tmp_path: Path, database_url: str) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def service(services: Services) -> None:
        assert await services.store.list_queue() == []  # the store is open
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    daemon = Daemon(load_config(write_daemon_config(tmp_path, database_url)), background=[service])
    await daemon.start()
    await asyncio.wait_for(started.wait(), 5)
    began = time.monotonic()
    await daemon.stop(grace=0.2)
    assert cancelled.is_set() and time.monotonic() - began < BACKGROUND_GRACE


async def test_a_crashing_background_service_is_logged_and_the_daemon_keeps_serving(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(services: Services) -> None:
        raise RuntimeError("boom")

    daemon = Daemon(load_config(write_daemon_config(tmp_path, database_url)), background=[broken])
    await daemon.start()
    await asyncio.sleep(0.05)
    assert daemon.services is not None and await daemon.services.store.list_queue() == []
    await daemon.stop(grace=0.2)
    assert "background service broken stopped" in caplog.text
    assert any(record.levelno == logging.ERROR for record in caplog.records)


def test_the_queue_worker_runs_unless_outbound_is_disabled(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    assert background_services(load_config(write_daemon_config(tmp_path, url))) == [run_queue]
    held = load_config(write_daemon_config(tmp_path, url, outbound="enabled = false"))
    assert background_services(held) == []
