"""`runbox-mta queue list / flush / remove ID` (SPEC §2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runbox_mta.store import Store
from runbox_mta.store.queue import Deferral
from tests.test_cli import cli, config_path, fails, ok, stored  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)
LATER = datetime.now(UTC) + timedelta(hours=1)


def test_queue_list_flush_remove(cli, config_path):  # noqa: F811
    assert ok(cli("queue", "list")) == "queue: empty\n"

    async def fill(store: Store) -> list[int]:
        first = await store.enqueue("alice@example.test", ["bob@remote.test", "carol@remote.test"], b"S: 1\r\n\r\nx\r\n")
        second = await store.enqueue("", ["dave@other.test"], b"S: 2\r\n\r\ny\r\n")
        now = datetime.now(UTC)
        (batch,) = await store.claim("remote.test", "w", now, now + timedelta(minutes=1), 10)
        bob = batch.recipients[0]
        await store.settle("w", [], [Deferral(bob.id, "451 4.3.0 later", LATER, "TLS1.3 TLS_AES_256_GCM_SHA384 unverified")])
        return [first, second]

    first, second = stored(config_path, fill)
    listing = ok(cli("queue", "list"))
    lines = listing.splitlines()
    assert lines[0].startswith(f"{first}\t11 bytes\tqueued ") and lines[0].endswith("\t<alice@example.test>")
    assert lines[1].startswith("  bob@remote.test\tqueued\tattempts 1\tnext ")
    assert lines[1].endswith("\t451 4.3.0 later\tTLS1.3 TLS_AES_256_GCM_SHA384 unverified")
    assert lines[2].startswith("  carol@remote.test\tqueued\tattempts 0\t") and lines[2].endswith("\t-\t-")
    assert lines[3].endswith("\t<>")
    # carol is leased by worker "w", bob waits for his retry, dave is due; counts only, no addresses.
    assert lines[-1] == ("queue: 2 messages, 3 recipients: 1 in delivery, 1 due, 1 deferred "
                         "(0 past the delay warning); oldest 0h 0m")

    assert ok(cli("queue", "flush")) == "3 recipients due now\n"

    async def due(store: Store) -> list[str]:
        return await store.due_destinations(datetime.now(UTC))

    assert sorted(stored(config_path, due)) == ["other.test", "remote.test"]
    assert ok(cli("queue", "remove", str(second))) == f"removed queue entry {second}\n"
    fails(cli("queue", "remove", str(second)), f"no such queue entry: {second}")
    assert ok(cli("queue", "list")).splitlines()[-1].startswith("queue: 1 message, 2 recipients: ")
