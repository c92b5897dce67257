"""The SMTP load generator of the smtp and outbound benchmarks.

`sessions` concurrent connections, each sending messages back to back (MAIL,
RCPT, DATA pipelined when the server offers PIPELINING), plaintext, STARTTLS
or implicit TLS, optionally after AUTH PLAIN, counting the 250 replies to
the final dot.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import client_tls, cpu_times, server_cpu

READ_TIMEOUT = 120.0


@dataclass(frozen=True)
class Load:
    """What to send, where, and how."""

    port: int
    sender: str
    recipient: str
    messages: int
    sessions: int
    size: int
    tls: str = "none"  # none | starttls | implicit
    login: tuple[str, str] | None = None  # AUTH PLAIN user, password (after TLS)


def message(index: int, load: Load) -> bytes:
    """A plain RFC 5322 message of exactly `load.size` octets (CRLF lines, no line starting with a dot)."""
    size = load.size
    sender_domain = load.sender.rpartition("@")[2]
    head = (
        f"From: Load Generator <{load.sender}>\r\n"
        f"To: <{load.recipient}>\r\n"
        f"Subject: benchmark message {index}\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <bench-{index}-{os.getpid()}@{sender_domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
    body = bytearray()
    remaining = size - len(head)
    while remaining > len(line):
        body += line
        remaining -= len(line)
    body += b"x" * max(remaining - 2, 0) + (b"\r\n" if remaining >= 2 else b"")
    data = head + bytes(body)
    return data[:size] if len(data) > size else data


# --- the load generator -------------------------------------------------------------------


@dataclass
class LoadResult:
    accepted: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # MAIL sent -> 250 after the dot
    started: float = 0.0  # first connect
    finished: float = 0.0  # last 250
    machine_busy: float = 0.0  # share of all CPUs busy (any process) during the run
    client_cpu: float = 0.0  # CPU seconds the load generator itself used
    server_cpu: float = 0.0  # CPU seconds the server processes used while it ran
    server_cpu_start: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        if not line:
            raise ConnectionError(f"connection closed after {lines!r}")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if line[3:4] != b"-":
            return int(lines[0][:3]), "\n".join(lines)


async def _session(load: Load, bodies: list[bytes], counter: list[int], result: LoadResult) -> None:
    tls = client_tls() if load.tls != "none" else None
    reader, writer = await asyncio.open_connection("127.0.0.1", load.port,
                                                   ssl=tls if load.tls == "implicit" else None)
    try:
        code, text = await _reply(reader)
        if code != 220:
            raise ConnectionError(f"greeting: {text}")
        writer.write(b"EHLO load.bench-example.net\r\n")
        code, text = await _reply(reader)
        if code != 250:
            raise ConnectionError(f"EHLO: {text}")
        if load.tls == "starttls":
            writer.write(b"STARTTLS\r\n")
            code, text = await _reply(reader)
            if code != 220:
                raise ConnectionError(f"STARTTLS: {text}")
            await writer.start_tls(tls)
            writer.write(b"EHLO load.bench-example.net\r\n")
            code, text = await _reply(reader)
            if code != 250:
                raise ConnectionError(f"EHLO after STARTTLS: {text}")
        pipelining = any(line[4:].upper().startswith("PIPELINING") for line in text.split("\n"))
        if load.login is not None:
            user, password = load.login
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            code, text = await _reply(reader)
            if code != 235:
                raise ConnectionError(f"AUTH: {text}")
        envelope = f"MAIL FROM:<{load.sender}>\r\nRCPT TO:<{load.recipient}>\r\nDATA\r\n".encode()
        while counter[0] < load.messages:
            index = counter[0]
            counter[0] += 1
            started = time.monotonic()
            if pipelining:
                writer.write(envelope)
                replies = [await _reply(reader) for _ in range(3)]
            else:
                replies = []
                for command in envelope.split(b"\r\n")[:3]:
                    writer.write(command + b"\r\n")
                    replies.append(await _reply(reader))
                    if replies[-1][0] >= 400:
                        break
            if [code for code, _ in replies] != [250, 250, 354]:
                result.rejected += 1
                result.errors.append(" | ".join(text for _, text in replies))
                writer.write(b"RSET\r\n")
                await _reply(reader)
                if len(result.errors) > 20:
                    raise ConnectionError("too many rejections: " + result.errors[-1])
                continue
            writer.write(bodies[index % len(bodies)] + b".\r\n")
            code, text = await _reply(reader)
            if code == 250:
                result.accepted += 1
                result.finished = time.monotonic()
                result.latencies.append(result.finished - started)
            else:
                result.rejected += 1
                result.errors.append(text)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _send(load: Load) -> LoadResult:
    # Distinct bodies (Message-ID, Subject) for every message would cost the client
    # more CPU than some servers spend; 1000 distinct bodies, reused, are plenty.
    bodies = [message(i, load) for i in range(min(load.messages, 1000))]
    result = LoadResult()
    counter = [0]
    result.started = time.monotonic()
    # SIGTERM (scripts/bench stopping the run) must end the load at once, not after it.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        outcomes = await asyncio.gather(*(_session(load, bodies, counter, result) for _ in range(load.sessions)),
                                        return_exceptions=True)
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.errors.append(f"session failed: {outcome!r}")
    return result


def run_load(load: Load, work: Path) -> LoadResult:
    """Send `load` from this process; CPU of the servers under `work` and of the machine measured around it."""
    import uvloop

    busy0, total0 = cpu_times()
    usage0 = os.times()
    server0 = server_cpu(work)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        result = uvloop.run(_send(load))
    finally:
        signal.signal(signal.SIGTERM, handler)  # the closed loop leaves its own handler behind
    result.server_cpu = server_cpu(work) - server0
    result.server_cpu_start = server0
    usage1 = os.times()
    busy1, total1 = cpu_times()
    result.machine_busy = (busy1 - busy0) / max(total1 - total0, 1.0)
    result.client_cpu = (usage1.user - usage0.user) + (usage1.system - usage0.system)
    return result


def add_load_arguments(parser: argparse.ArgumentParser, *, messages: int) -> None:
    """The options every SMTP-load benchmark takes, --work (scripts/bench makes it) included."""
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--only", choices=("runbox", "postfix"), help="run one side only")
    parser.add_argument("--nice", type=int, default=-10,
                        help="scheduling priority change for everything the benchmark runs (0: none)")
    parser.add_argument("--work", type=Path, required=True, help="temporary directory (scripts/bench makes it)")


def print_notes(runs: Iterable[Any]) -> None:
    """Each run's notes, then up to five of its load errors."""
    for run in runs:
        for note in run.notes:
            print(f"note: {note}")
        for error in run.load.errors[:5]:
            print(f"{run.name} error: {error}")
