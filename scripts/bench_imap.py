"""IMAP benchmark: runbox-mta against Dovecot, the same mailboxes, the same client load.

Run through `scripts/bench imap [--messages N] [--clients N] [--duration S]
[--idle-connections N] [--only runbox|dovecot]`, which prepares .venv,
installs dovecot-core and dovecot-imapd from Debian when missing, makes the
temporary directory WORK and stops every server it started, even on failure.

The mailboxes are generated once, deterministically, as Maildirs under
WORK/maildirs (plain text, multipart/alternative and messages with a base64
attachment, a few KB each; flags and internal dates on the file names and
mtimes, as Dovecot writes them): `runbox-mta import` reads them into
runbox-mta, and Dovecot gets hard-linked copies (Dovecot never rewrites a
message file, it renames or unlinks). Message n is UID n+1 on both.

Three users:
  big@   INBOX of --messages (100,000): SELECT and UID FETCH 1:* (FLAGS) timed
  work@  INBOX of --work-messages (10,000): the mixed workload of --clients
         concurrent clients (SELECT, FETCH flags/envelope/body, STORE, SEARCH,
         APPEND, EXPUNGE, IDLE), each op timed
  idle@  INBOX of --idle-messages (100): --idle-connections TLS connections
         LOGIN, SELECT INBOX and IDLE; server memory before and after; then one
         APPEND from another connection, and how many IDLEs see EXISTS within 1 s

The servers run one after the other, never together (so they do not compete
for the 2 cores), both over implicit TLS on 127.0.0.1, from their own config
and state under WORK. The clients are a small asyncio IMAP client in this
file (imaplib blocks), the same code and the same seeded op sequence for both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import hashlib
import os
import random
import re
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    BENCH_PASSWORD,
    REPO,
    Listener,
    client_tls,
    cpu_times,
    free_port,
    memory_kib,
    process_tree,
    raise_nofile,
    run,
    runbox_instance,
    server_cpu,
    start_daemon,
    wait_for_port,
    warn_if_busy,
)

DOMAIN = "bench.test"
BIG, WORK, IDLE = (f"{name}@{DOMAIN}" for name in ("big", "work", "idle"))
MAIL_UID = MAIL_GID = 65534  # Dovecot's virtual-mail uid (nobody:nogroup)
READ_TIMEOUT = 300.0
EXISTS_WITHIN = 1.0  # the IDLE push target: EXISTS within 1 s of the APPEND's commit
EXISTS_WAIT = 180.0  # how long after sending the APPEND to wait for its OK and every EXISTS
OPEN_CONCURRENCY = 64  # IDLE connections being opened at once (TLS handshake, LOGIN, SELECT)
SELECT_REPEAT = 5  # timed SELECTs of the big mailbox (median reported)
FETCH_REPEAT = 3  # timed UID FETCH 1:* (FLAGS) of the big mailbox (median reported)
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


# --- the messages -------------------------------------------------------------------------

_WORD_TEXT = ("account address after again agenda answer archive attach backup before budget build "
          "calendar change check client cloud commit config contract copy customer daily data "
          "deadline delivery design draft email estimate event export feedback figure final folder "
          "follow forward friday geneva holiday hotel import invoice issue journey kernel launch "
          "letter linux mailbox march meeting memo migration minutes monday network notes office "
          "order oslo package payment photo plan policy print project proposal quarter question "
          "receipt release report request review roadmap schedule security server service share "
          "slides spring status storage summary support team thanks ticket travel tuesday update "
          "upgrade vacation version weekly welcome workshop")
_WORDS = _WORD_TEXT.split()
_NAMES = ("Alice Andersen", "Bob Berg", "Carla Costa", "David Dahl", "Eva Eriksen", "Frank Fischer",
          "Greta Gran", "Hans Holm", "Ingrid Iversen", "Jonas Jensen", "Kari Kvam", "Lars Lie",
          "Maria Moe", "Nils Nygaard", "Olga Olsen", "Per Pedersen", "Rita Ruud", "Sven Strand",
          "Tone Tangen", "Ulf Urdal", "Vera Vik", "Willy Wang", "Yara Yilmaz", "Zoe Zahl")
_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.no", "corp.example")


def _pools() -> tuple[list[str], list[bytes], list[str]]:
    """Paragraphs, base64 attachment bodies and subjects, built once from a fixed seed
    (building each message word by word would cost more than writing it)."""
    rng = random.Random(20261123)
    paragraphs = []
    for _ in range(400):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 120))]
        words[0] = words[0].capitalize()
        lines, line = [], ""
        for word in words:
            if len(line) + len(word) + 1 > 72:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line + ".")
        paragraphs.append("\n".join(lines))
    attachments = []
    for _ in range(40):
        blob = rng.randbytes(rng.randint(1200, 6000))
        encoded = base64.b64encode(blob)
        attachments.append(b"\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)))
    subjects = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6))).capitalize() for _ in range(500)]
    return paragraphs, attachments, subjects


_PARAGRAPHS, _ATTACHMENTS, _SUBJECTS = _pools()
BASE_TIME = 1_700_000_000  # 2023-11-14: message n arrived at BASE_TIME + n * 10 minutes


def sender(index: int) -> tuple[str, str]:
    name = _NAMES[index % len(_NAMES)]
    return name, f"{name.split()[0].lower()}@{_DOMAINS[index % len(_DOMAINS)]}"


def make_message(seed: int, n: int, recipient: str) -> tuple[bytes, str, int]:
    """(bytes with LF line ends, maildir flag letters, internal date) of message n of a mailbox:
    55% text/plain, 30% multipart/alternative (text + HTML), 15% multipart/mixed with a PDF."""
    rng = random.Random(seed * 1_000_003 + n)
    when = BASE_TIME + n * 600
    name, address = sender(rng.randrange(1000))
    subject = f"{_SUBJECTS[rng.randrange(len(_SUBJECTS))]} #{n}"
    text = "\n\n".join(_PARAGRAPHS[rng.randrange(len(_PARAGRAPHS))] for _ in range(rng.randint(2, 8)))
    head = (f"Return-Path: <{address}>\n"
            f"From: {name} <{address}>\n"
            f"To: <{recipient}>\n"
            f"Subject: {subject}\n"
            f"Date: {email.utils.formatdate(when - 7, localtime=False)}\n"
            f"Message-ID: <{seed}.{n}.{hashlib.md5(subject.encode()).hexdigest()[:12]}@{address.split('@')[1]}>\n"
            "MIME-Version: 1.0\n")
    kind = rng.random()
    if kind < 0.55:
        body = f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{text}\n"
    elif kind < 0.85:
        boundary = f"=_alt_{seed}_{n}"
        html = "".join(f"<p>{part}</p>\n" for part in text.split("\n\n"))
        body = (f'Content-Type: multipart/alternative; boundary="{boundary}"\n\n'
                f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
                f"--{boundary}\nContent-Type: text/html; charset=utf-8\n\n"
                f"<html><body>\n{html}</body></html>\n--{boundary}--\n")
    else:
        boundary = f"=_mix_{seed}_{n}"
        attachment = _ATTACHMENTS[rng.randrange(len(_ATTACHMENTS))].decode()
        body = (f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
                f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
                f"--{boundary}\nContent-Type: application/pdf; name=\"report-{n}.pdf\"\n"
                f"Content-Disposition: attachment; filename=\"report-{n}.pdf\"\n"
                f"Content-Transfer-Encoding: base64\n\n{attachment}\n--{boundary}--\n")
    flags = ""
    if rng.random() < 0.04:
        flags += "F"
    if rng.random() < 0.10:
        flags += "R"
    if rng.random() < 0.80:
        flags += "S"
    return (head + body).encode(), flags, when


def write_maildir(root: Path, seed: int, count: int, recipient: str) -> int:
    """A Maildir as Dovecot's delivery leaves it, all in cur/ (already seen by a client):
    TIME.MnP1.bench,S=size,W=size-with-CRLF:2,FLAGS, mtime = the internal date. Returns bytes written."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    total = 0
    cur = root / "cur"
    for n in range(count):
        data, flags, when = make_message(seed, n, recipient)
        size = len(data)
        lines = data.count(b"\n")
        path = cur / f"{when}.M{n}P1.bench,S={size},W={size + lines}:2,{flags}"
        with open(path, "wb") as file:
            file.write(data)
        os.utime(path, (when, when))
        total += size
    return total


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


# --- a small asyncio IMAP client ----------------------------------------------------------


class ImapError(Exception):
    pass


_LITERAL = re.compile(rb"[~]?\{(\d+)\+?\}\r\n$")


class Client:
    """Tagged commands over one TLS connection; untagged responses are collected (literals
    inline), a NO/BAD tagged reply raises ImapError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.counter = 0

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost",
                                                       limit=1 << 20)
        client = cls(reader, writer)
        greeting = await client._line()
        if not greeting.startswith(b"* OK"):
            writer.close()
            raise ImapError(f"greeting: {greeting!r}")
        return client

    def _tag(self) -> bytes:
        self.counter += 1
        return b"b%d" % self.counter

    async def _line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)
        if not line.endswith(b"\n"):
            raise ConnectionError(f"connection closed (last: {line[:200]!r})")
        return line

    async def _response(self) -> bytes:
        """One response line with its literals inline."""
        parts = [await self._line()]
        while match := _LITERAL.search(parts[-1]):
            parts.append(await asyncio.wait_for(self.reader.readexactly(int(match.group(1))), READ_TIMEOUT))
            parts.append(await self._line())
        return b"".join(parts) if len(parts) > 1 else parts[0]

    async def _until(self, tag: bytes) -> list[bytes]:
        untagged = []
        prefix = tag + b" "
        while True:
            response = await self._response()
            if response.startswith(prefix):
                if response[len(prefix):len(prefix) + 2] != b"OK":
                    raise ImapError(response[:300].decode(errors="replace").strip())
                untagged.append(response)  # the tagged line last
                return untagged
            untagged.append(response)

    async def command(self, text: str | bytes, literal: bytes | None = None) -> list[bytes]:
        """Send one command (with one synchronising literal at its end, if given); returns
        the untagged responses and, last, the tagged OK."""
        tag = self._tag()
        line = text.encode() if isinstance(text, str) else text
        if literal is None:
            self.writer.write(tag + b" " + line + b"\r\n")
        else:
            self.writer.write(tag + b" " + line + b" {%d}\r\n" % len(literal))
            while True:  # RFC 9051 §7.5: wait for the continuation
                response = await self._response()
                if response.startswith(b"+"):
                    break
                if response.startswith(tag + b" "):
                    raise ImapError(response[:300].decode(errors="replace").strip())
            self.writer.write(literal + b"\r\n")
        return await self._until(tag)

    async def stream_count(self, text: str) -> int:
        """Send a command whose untagged responses carry no literals (UID FETCH ... (FLAGS))
        and read them in big chunks, only counting lines: the client must not be the slow end."""
        tag = self._tag()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        marker = b"\r\n" + tag + b" "
        tail = b"\r\n"
        lines = 0
        while True:
            chunk = await asyncio.wait_for(self.reader.read(1 << 20), READ_TIMEOUT)
            if not chunk:
                raise ConnectionError("connection closed during a FETCH")
            data = tail + chunk
            lines += data.count(b"\r\n") - tail.count(b"\r\n")
            at = data.find(marker)
            if at >= 0:
                end = data.find(b"\r\n", at + len(marker))
                while end < 0:
                    more = await asyncio.wait_for(self.reader.read(1 << 16), READ_TIMEOUT)
                    if not more:
                        raise ConnectionError("connection closed during a FETCH")
                    data += more
                    end = data.find(b"\r\n", at + len(marker))
                status = data[at + len(marker):end]
                if not status.startswith(b"OK"):
                    raise ImapError(status.decode(errors="replace"))
                return lines - 1 - data[end + 2:].count(b"\r\n")
            tail = data[-(len(marker) + 2):]

    async def login(self, user: str) -> None:
        await self.command(f'LOGIN "{user}" "{BENCH_PASSWORD}"')

    def close(self) -> None:
        transport = self.writer.transport
        transport.abort()


def _number(responses: list[bytes], word: bytes) -> int | None:
    for response in responses:
        match = re.search(rb"\[" + word + rb" (\d+)\]", response)
        if match:
            return int(match.group(1))
    return None


# --- the big mailbox: SELECT and UID FETCH 1:* (FLAGS) ------------------------------------


@dataclass
class BigResult:
    messages: int = 0
    first_select: float = 0.0  # the first SELECT after the server started (cold caches, Dovecot indexes)
    selects: list[float] = field(default_factory=list)
    fetch_lines: int = 0
    first_fetch: float = 0.0
    fetches: list[float] = field(default_factory=list)
    error: str = ""


async def big_mailbox(port: int) -> BigResult:
    result = BigResult()
    client = await Client.connect(port, client_tls())
    try:
        await client.login(BIG)
        started = time.perf_counter()
        responses = await client.command("SELECT INBOX")
        result.first_select = time.perf_counter() - started
        for response in responses:
            if response.endswith(b" EXISTS\r\n"):
                result.messages = int(response.split()[1])
        await client.command("UNSELECT")
        for _ in range(SELECT_REPEAT):
            started = time.perf_counter()
            await client.command("SELECT INBOX")
            result.selects.append(time.perf_counter() - started)
            await client.command("UNSELECT")
        await client.command("SELECT INBOX")
        for repeat in range(FETCH_REPEAT + 1):
            started = time.perf_counter()
            result.fetch_lines = await client.stream_count("UID FETCH 1:* (FLAGS)")
            elapsed = time.perf_counter() - started
            if repeat == 0:
                result.first_fetch = elapsed
            else:
                result.fetches.append(elapsed)
        await client.command("LOGOUT")
    except (TimeoutError, ImapError, OSError) as error:
        result.error = repr(error)
    finally:
        client.close()
    return result


# --- the mixed workload -------------------------------------------------------------------

# (operation, weight): what a mail client does most is list, open and flag messages.
OPERATIONS = (("SELECT", 2), ("FETCH FLAGS", 3), ("FETCH ENVELOPE", 3), ("FETCH BODY", 4), ("STORE", 2),
              ("SEARCH", 2), ("APPEND", 1), ("EXPUNGE", 1), ("IDLE", 1))
OPERATION_DESCRIPTIONS = {
    "SELECT": "SELECT INBOX (the working mailbox)",
    "FETCH FLAGS": "UID FETCH n:n+99 (FLAGS), 100 messages",
    "FETCH ENVELOPE": "UID FETCH n:n+19 (UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE), 20 messages",
    "FETCH BODY": "UID FETCH n BODY.PEEK[], one whole message",
    "STORE": "UID STORE n:n+4 +FLAGS or -FLAGS (\\Flagged), 5 messages",
    "SEARCH": "UID SEARCH one of UNSEEN | FLAGGED | FROM name | SUBJECT word | SINCE date",
    "APPEND": "APPEND INBOX (\\Seen) one generated message (synchronising literal)",
    "EXPUNGE": "UID STORE n +FLAGS.SILENT (\\Deleted) + EXPUNGE of a message it appended",
    "IDLE": "IDLE, then DONE at the continuation",
}


@dataclass
class MixResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    abandoned: int = 0  # operations in flight at the deadline, not counted
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    machine_busy: float = 0.0

    @property
    def total(self) -> int:
        return sum(len(values) for values in self.latencies.values())


async def mixed_client(index: int, port: int, base: int, deadline: float, budget: list[int],
                       result: MixResult, appendable: list[bytes]) -> None:
    rng = random.Random(4242 + index)  # the same op sequence on both servers
    names, weights = zip(*OPERATIONS)
    client = await Client.connect(port, client_tls())
    appended: list[int] = []
    try:
        await client.login(WORK)
        await client.command("SELECT INBOX")
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            operation = rng.choices(names, weights)[0]
            if operation == "EXPUNGE" and not appended:
                operation = "APPEND"
            low = rng.randint(1, max(base - 100, 1))
            started = time.perf_counter()
            try:
                if operation == "SELECT":
                    await client.command("SELECT INBOX")
                elif operation == "FETCH FLAGS":
                    await client.command(f"UID FETCH {low}:{low + 99} (FLAGS)")
                elif operation == "FETCH ENVELOPE":
                    await client.command(f"UID FETCH {low}:{low + 19} (UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
                elif operation == "FETCH BODY":
                    await client.command(f"UID FETCH {low} BODY.PEEK[]")
                elif operation == "STORE":
                    await client.command(f"UID STORE {low}:{low + 4} {rng.choice('+-')}FLAGS (\\Flagged)")
                elif operation == "SEARCH":
                    kind = rng.randrange(5)
                    if kind == 0:
                        await client.command("UID SEARCH UNSEEN")
                    elif kind == 1:
                        await client.command("UID SEARCH FLAGGED")
                    elif kind == 2:
                        await client.command(f'UID SEARCH FROM "{rng.choice(_NAMES).split()[1]}"')
                    elif kind == 3:
                        await client.command(f'UID SEARCH SUBJECT "{rng.choice(_WORDS)}"')
                    else:
                        day = time.gmtime(BASE_TIME + rng.randrange(base) * 600)
                        await client.command(f"UID SEARCH SINCE {time.strftime('%d-%b-%Y', day)}")
                elif operation == "APPEND":
                    responses = await client.command("APPEND INBOX (\\Seen)", appendable[rng.randrange(len(appendable))])
                    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", responses[-1])
                    if match:
                        appended.append(int(match.group(1)))
                elif operation == "EXPUNGE":
                    uid = appended.pop(0)
                    await client.command(f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
                    await client.command("EXPUNGE")
                elif operation == "IDLE":
                    tag = client._tag()
                    client.writer.write(tag + b" IDLE\r\n")
                    while not (await client._response()).startswith(b"+"):
                        pass
                    client.writer.write(b"DONE\r\n")
                    await client._until(tag)
            except ImapError as error:
                result.errors.append(f"{operation}: {error}")
                continue
            result.latencies.setdefault(operation, []).append(time.perf_counter() - started)
        await client.command("LOGOUT")
    finally:
        client.close()


async def mixed(port: int, base: int, clients: int, duration: float, operations: int | None) -> MixResult:
    result = MixResult()
    appendable = [crlf(make_message(99, n, WORK)[0]) for n in range(200)]
    budget = [operations if operations else 1 << 62]
    started = time.monotonic()
    deadline = started + (duration if not operations else 1e9)
    tasks = [asyncio.create_task(mixed_client(i, port, base, deadline, budget, result, appendable))
             for i in range(clients)]
    # A --duration run ends at the deadline: operations still in flight then are abandoned
    # (their connections closed) and not counted, so a slow operation cannot stretch the run.
    done, pending = await asyncio.wait(tasks, timeout=None if operations else duration + 0.5)
    result.seconds = time.monotonic() - started
    result.abandoned = len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            result.errors.append(f"client failed: {task.exception()!r}")
    return result


# --- IDLE: many connections, memory, one delivery -----------------------------------------


@dataclass
class IdleResult:
    wanted: int = 0
    opened: int = 0
    open_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    before_kib: tuple[int, int] = (0, 0)  # (RSS, PSS) of all server processes
    after_kib: tuple[int, int] = (0, 0)
    processes_before: int = 0
    processes_after: int = 0
    available_drop_kib: int = 0  # MemAvailable before - after, whole machine
    exists_latencies: list[float] = field(default_factory=list)  # APPEND sent -> EXISTS seen
    append_seconds: float = 0.0  # APPEND sent -> its tagged OK
    delivery_problems: list[str] = field(default_factory=list)

    def per_connection(self, which: int) -> float:
        return (self.after_kib[which] - self.before_kib[which]) / max(self.opened, 1)


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


async def idle_test(port: int, count: int, server_pids: Callable[[], list[int]], existing: int) -> IdleResult:
    result = IdleResult(wanted=count)
    tls = client_tls()
    await asyncio.sleep(1.0)
    pids = server_pids()
    result.processes_before = len(pids)
    result.before_kib = memory_kib(pids)
    available_before = mem_available_kib()
    clients: list[Client] = []
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            client = None
            try:
                client = await Client.connect(port, tls)
                await client.login(IDLE)
                await client.command("SELECT INBOX")
                tag = client._tag()
                client.writer.write(tag + b" IDLE\r\n")
                while not (await client._response()).startswith(b"+"):
                    pass
                clients.append(client)
            except (TimeoutError, ImapError, OSError, asyncio.IncompleteReadError) as error:
                result.failures.append(repr(error))
                if client is not None:
                    client.close()

    started = time.monotonic()
    progress = asyncio.create_task(_progress(clients, count))
    await asyncio.gather(*(open_one() for _ in range(count)))
    progress.cancel()
    result.open_seconds = time.monotonic() - started
    result.opened = len(clients)
    await asyncio.sleep(3.0)  # let lazily started work (Dovecot's inotify, runbox's subscriptions) settle
    pids = server_pids()
    result.processes_after = len(pids)
    result.after_kib = memory_kib(pids)
    result.available_drop_kib = available_before - mem_available_kib()
    print(f"    {result.opened} connections in IDLE ({len(result.failures)} failed) after "
          f"{result.open_seconds:.1f} s; server memory {result.before_kib[1] / 1024:.0f} -> "
          f"{result.after_kib[1] / 1024:.0f} MiB PSS; delivering one message ...", flush=True)

    wanted = b"* %d EXISTS" % (existing + 1)
    seen: list[float] = []

    async def watch(client: Client) -> None:
        while True:
            line = await client._line()
            if line.startswith(wanted):
                seen.append(time.perf_counter())
                return

    watchers = [asyncio.create_task(watch(client)) for client in clients]
    sender_client: Client | None = None
    started = time.perf_counter()
    try:
        sender_client = await Client.connect(port, tls)
        await sender_client.login(IDLE)

        async def append(client: Client) -> None:
            await client.command("APPEND INBOX", crlf(make_message(77, 0, IDLE)[0]))
            result.append_seconds = time.perf_counter() - started

        started = time.perf_counter()
        appending = asyncio.create_task(append(sender_client))
        # Until the APPEND is answered and every IDLE has its EXISTS, or EXISTS_WAIT after sending.
        await asyncio.wait([appending, *watchers], timeout=EXISTS_WAIT)
        if not appending.done():
            result.delivery_problems.append(f"the APPEND was not answered within {EXISTS_WAIT:.0f} s")
            result.append_seconds = float("nan")
        elif appending.exception() is not None:
            result.delivery_problems.append(f"the APPEND failed: {appending.exception()!r}")
        appending.cancel()
    except (TimeoutError, ImapError, OSError, asyncio.IncompleteReadError) as error:
        result.delivery_problems.append(f"the delivering connection failed: {error!r}")
    finally:
        if sender_client is not None:
            sender_client.close()
        for watcher in watchers:
            watcher.cancel()
        for client in clients:
            client.close()
    result.exists_latencies = sorted(moment - started for moment in seen)
    return result


async def _progress(clients: list[Client], count: int) -> None:
    while True:
        await asyncio.sleep(15)
        print(f"    ... {len(clients)}/{count} open", flush=True)


# --- one server, all phases ---------------------------------------------------------------


@dataclass
class ServerRun:
    name: str
    big: BigResult | None = None
    mix: MixResult | None = None
    idle: IdleResult | None = None
    setup_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_async(coroutine):  # type: ignore[no-untyped-def]
    import uvloop

    handler = signal.getsignal(signal.SIGTERM)
    try:
        return uvloop.run(coroutine)
    finally:
        signal.signal(signal.SIGTERM, handler)  # the closed loop leaves its own handler behind


def run_phases(server: ServerRun, port: int, args: argparse.Namespace, server_pids: Callable[[], list[int]]) -> None:
    work: Path = args.work
    if args.idle_connections:
        # First, on the fresh process: memory the other phases allocated and freed would
        # otherwise be reused by the connections and hide their cost.
        print(f"  IDLE: opening {args.idle_connections} TLS connections ...", flush=True)
        server.idle = run_async(idle_test(port, args.idle_connections, server_pids, args.idle_messages))
        quiet = settle(work)
        if quiet > 5:
            server.notes.append(f"after closing the IDLE connections the server was busy for {quiet:.0f} s")
    print(f"  big mailbox ({args.messages} messages): SELECT x{SELECT_REPEAT}, UID FETCH 1:* (FLAGS) "
          f"x{FETCH_REPEAT + 1} ...", flush=True)
    server.big = run_async(big_mailbox(port))
    if server.big.error:
        server.notes.append(f"big mailbox: {server.big.error}")
    warn_if_busy(f"{server.name} mixed workload")
    what = f"{args.operations} operations" if args.operations else f"{args.duration:.0f} s"
    print(f"  mixed workload: {args.clients} clients, {what} ...", flush=True)
    busy0, total0 = cpu_times()
    usage0 = os.times()
    server0 = server_cpu(work)
    server.mix = run_async(mixed(port, args.work_messages, args.clients, args.duration, args.operations))
    usage1 = os.times()
    busy1, total1 = cpu_times()
    server.mix.server_cpu = server_cpu(work) - server0
    server.mix.client_cpu = (usage1.user - usage0.user) + (usage1.system - usage0.system)
    server.mix.machine_busy = (busy1 - busy0) / max(total1 - total0, 1.0)


def settle(work: Path, limit: float = 120.0) -> float:
    """Wait until the servers under `work` use under 5% of a CPU (closing 10,000 connections
    takes a while), so that the next phase starts on a quiet server; returns the seconds waited."""
    started = time.monotonic()
    before = server_cpu(work)
    while time.monotonic() - started < limit:
        time.sleep(1.0)
        now = server_cpu(work)
        if now - before < 0.05:
            break
        before = now
    return time.monotonic() - started


def maildirs(args: argparse.Namespace) -> dict[str, Path]:
    """Generate the three users' Maildirs once (both servers read the same files)."""
    base = args.work / "maildirs"
    paths = {user: base / user.split("@")[0] / "Maildir" for user in (BIG, WORK, IDLE)}
    if base.exists():
        return paths
    started = time.monotonic()
    total = 0
    for seed, (user, count) in enumerate(((BIG, args.messages), (WORK, args.work_messages),
                                          (IDLE, args.idle_messages)), start=1):
        total += write_maildir(paths[user], seed, count, user)
    print(f"  generated {args.messages + args.work_messages + args.idle_messages} messages "
          f"({total / 1e6:.0f} MB) as Maildirs in {time.monotonic() - started:.1f} s", flush=True)
    return paths


def bench_runbox(args: argparse.Namespace) -> ServerRun:
    work: Path = args.work
    sources = maildirs(args)
    port = free_port()
    server = ServerRun("runbox-mta")
    connections = args.idle_connections + args.clients + 100
    # Password hashing is not what this measures (Dovecot's passdb here is a static
    # plaintext password): Argon2id at its cheapest, so that 10,000 LOGINs cost little.
    extra = (f"[limits]\nconnections_per_address = {connections}\n"
             "[auth]\nargon2_time_cost = 1\nargon2_memory_kib = 8\nargon2_parallelism = 1\n"
             "[outbound]\nenabled = false\n")
    import_log: list[str] = []

    def prepare(command: list[str]) -> None:
        started = time.monotonic()
        for user, path in sources.items():
            output = run([*command, "import", user, str(path)]).strip()
            import_log.append(f"{user}: {output.splitlines()[-1] if output else '(no output)'}")
        server.setup_seconds = time.monotonic() - started
        print(f"  runbox-mta import of the Maildirs: {server.setup_seconds:.1f} s", flush=True)
        for line in import_log:
            print(f"    {line}", flush=True)

    with runbox_instance(work, hostname=f"imap.{DOMAIN}", domain=DOMAIN, users=[BIG, WORK, IDLE],
                         listeners=[Listener("imap", "implicit", port, max_connections=connections)],
                         extra_config=extra, prepare=prepare):
        pid = int((work / "runbox.pid").read_text())
        warn_if_busy("runbox-mta")
        print(f"  runbox-mta listening on 127.0.0.1:{port} (implicit TLS)", flush=True)
        run_phases(server, port, args, lambda: process_tree([pid]))
        server.notes.extend(f"log: {summary}"
                            for summary in summarise(log_problems(work / "runbox" / "runbox-mta.log")))
    return server


# --- Dovecot ------------------------------------------------------------------------------

LOGIN_CLIENT_LIMIT = 1000  # connections per imap-login process (high-performance mode)


def dovecot_settings(args: argparse.Namespace) -> dict[str, int]:
    connections = args.idle_connections + args.clients + 100
    login_processes = -(-connections // LOGIN_CLIENT_LIMIT) + 2
    return {"connections": connections, "login_processes": login_processes,
            "min_avail": os.cpu_count() or 2, "client_limit": connections + 1000}


DOVECOT_CONF = """\
# Private Dovecot instance for the IMAP benchmark: everything under {root}.
base_dir = {root}/run
state_dir = {root}/state
instance_name = bench-dovecot-imap-{tag}
protocols = imap
listen = 127.0.0.1
log_path = {root}/dovecot.log
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 500
ssl = required
ssl_cert = <{root}/certs/server.pem
ssl_key = <{root}/certs/server.key
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain
mail_location = maildir:~/Maildir
# mail_fsync = optimized is the default (fsync after writing a new message).
mail_fsync = optimized
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%n allow_all_users=yes
}}
protocol imap {{
  # 10 by default: all benchmark connections come from one address as one user.
  mail_max_userip_connections = {connections}
}}
# Sized for the IDLE connections: every service may take that many clients
# (log, stats, anvil, auth see one client per imap process).
default_client_limit = {client_limit}
default_process_limit = {connections}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
  # High-performance mode: one login process serves many connections (and, after
  # login, proxies their TLS to the imap process) instead of one per connection.
  service_count = 0
  client_limit = {login_client_limit}
  process_min_avail = {min_avail}
  process_limit = {login_processes}
}}
service imap {{
  # Dovecot's default: one imap process per connection (client_limit = 1).
  process_limit = {connections}
}}
"""


def dovecot_pids(root: Path) -> list[int]:
    try:
        master = int((root / "run" / "master.pid").read_text().split()[0])
    except (OSError, ValueError):
        return []
    return process_tree([master])


def bench_dovecot(args: argparse.Namespace) -> ServerRun:
    work: Path = args.work
    sources = maildirs(args)
    root = work / "dovecot"
    for path in (root, root / "run", root / "state", root / "mail", root / "certs"):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    server = ServerRun("dovecot")
    started = time.monotonic()
    for user, source in sources.items():
        # Hard links: Dovecot only ever renames (flag changes) or unlinks message files.
        home = root / "mail" / user.split("@")[0]
        home.mkdir(exist_ok=True)
        subprocess.run(["cp", "-al", str(source), str(home / "Maildir")], check=True)
    subprocess.run(["chown", "-R", f"{MAIL_UID}:{MAIL_GID}", str(root / "mail")], check=True)
    server.setup_seconds = time.monotonic() - started
    from runbox_mta.certs import (
        generate_self_signed,  # the same ECDSA P-256 certificate runbox-mta uses
    )
    generate_self_signed("localhost", root / "certs")
    port = free_port()
    settings = dovecot_settings(args)
    conf = root / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(root=root, tag=os.getpid(), password=BENCH_PASSWORD, uid=MAIL_UID,
                                        gid=MAIL_GID, port=port, login_client_limit=LOGIN_CLIENT_LIMIT,
                                        **settings))
    # 65535 is what Dovecot's own OS configuration notes suggest. Just above one per
    # connection is not enough: with 11,000 for 10,000 connections ~9,000 imap processes
    # still logged "Inotify instance limit ... exceeded" and fell back to polling every
    # 30 s (instances being released seem to count for a while).
    inotify = raise_inotify_instances(max(65535, 10 * args.idle_connections))
    if inotify:
        server.notes.append(f"fs.inotify.max_user_instances raised from {inotify[0]} to {inotify[1]} for Dovecot's "
                            f"IDLE (one inotify instance per imap process, all as uid {MAIL_UID}); restored after")
    try:
        start_daemon(["dovecot", "-c", str(conf)], root / "start.log")
        try:
            wait_for_port(port, 30, log=root / "dovecot.log", greeting=b"* OK", tls=client_tls())
            warn_if_busy("dovecot")
            print(f"  dovecot listening on 127.0.0.1:{port} (implicit TLS)", flush=True)
            run_phases(server, port, args, lambda: dovecot_pids(root))
        finally:
            subprocess.run(["dovecot", "-c", str(conf), "stop"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if inotify:
            INOTIFY_INSTANCES.write_text(f"{inotify[0]}\n")
    log = (root / "dovecot.log").read_text(errors="replace").splitlines()
    problems = [line for line in log if ("Error:" in line or "Fatal:" in line or "Warning:" in line)
                and "Killed with signal 15" not in line]  # that one is our own stop
    server.notes.extend(f"dovecot.log: {summary}" for summary in summarise(problems))
    return server


def log_problems(path: Path) -> list[str]:
    """runbox-mta's WARNING/ERROR lines, and for each traceback its exception line."""
    problems = []
    lines = path.read_text(errors="replace").splitlines()
    for index, line in enumerate(lines):
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
            problems.append(line)
        elif line.startswith("Traceback"):
            end = index + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                end += 1
            if end < len(lines):
                problems.append(f"traceback: {lines[end]}")
    return problems


def summarise(lines: list[str], kinds: int = 4) -> list[str]:
    """Log lines grouped by their text less timestamps, pids and numbers: the commonest kinds, counted."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        text = re.sub(r"^(\w{3} +\d+ [\d:]+|\d{4}-\d\d-\d\d [\d:,.]+) ", "", line)  # timestamps
        key = re.sub(r"\d+", "N", re.sub(r"<[^>]*>|\([^)]*\)|\[[^]]*\]", "", text))[:120]
        groups.setdefault(key, []).append(text)
    ranked = sorted(groups.values(), key=len, reverse=True)
    return [f"{len(group)} x {group[0][:240]}" for group in ranked[:kinds]]


def raise_inotify_instances(want: int) -> tuple[int, int] | None:
    try:
        current = int(INOTIFY_INSTANCES.read_text())
        if current >= want:
            return None
        INOTIFY_INSTANCES.write_text(f"{want}\n")
        return current, want
    except (OSError, ValueError):
        return None


def dovecot_version() -> str:
    try:
        return run(["dovecot", "--version"]).split()[0]
    except (SystemExit, OSError, IndexError):
        return "?"


# --- reporting ----------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def report(args: argparse.Namespace, runs: dict[str, ServerRun], nofile: int) -> None:
    rb, dc = runs.get("runbox"), runs.get("dovecot")
    print()
    what = f"{args.operations} operations" if args.operations else f"{args.duration:.0f} s"
    print(f"IMAP benchmark (nice {args.nice:+d}): runbox-mta vs Dovecot {dovecot_version()}, implicit TLS on "
          f"127.0.0.1, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"mailboxes: big {args.messages}, working {args.work_messages}, idle {args.idle_messages} messages "
          f"(generated, 55% text/plain, 30% multipart/alternative, 15% with an attachment; "
          f"80% \\Seen, 10% \\Answered, 4% \\Flagged)")

    print()
    print(f"1. Big mailbox ({args.messages} messages), one client")
    header = f"{'server':<12} {'first SELECT':>12} {'SELECT p50':>11} {'SELECT min':>11} {'first FETCH':>12} " \
             f"{'FETCH p50':>10} {'FETCH min':>10} {'lines':>7}"
    print(header)
    print("-" * len(header))
    for server in runs.values():
        big = server.big
        if big is None or not big.selects:
            print(f"{server.name:<12} failed: {big.error if big else 'not run'}")
            continue
        print(f"{server.name:<12} {_ms(big.first_select):>10}ms {_ms(statistics.median(big.selects)):>9}ms "
              f"{_ms(min(big.selects)):>9}ms {big.first_fetch:>11.2f}s {statistics.median(big.fetches):>9.2f}s "
              f"{min(big.fetches):>9.2f}s {big.fetch_lines:>7}")
    print("first SELECT: the first open after the server started (Dovecot builds its index of the")
    print(f"              new Maildir here); SELECT p50/min over the next {SELECT_REPEAT} (UNSELECT between),")
    print("              command sent to tagged OK. FETCH: UID FETCH 1:* (FLAGS), command sent to tagged OK,")
    print(f"              the first and then the median/best of {FETCH_REPEAT} more; lines = untagged")
    print("              responses received (one per message).")
    if rb and rb.big and rb.big.selects:
        select = statistics.median(rb.big.selects)
        fetch = statistics.median(rb.big.fetches)
        print(f"target: SELECT of {args.messages} messages under 100 ms: "
              f"{'met' if select < 0.1 else 'NOT met'} ({_ms(select)} ms median)"
              + ("" if args.messages >= 100000 else "  [fewer than 100,000 messages: not the target's size]"))
        print(f"target: UID FETCH 1:* (FLAGS) under 2 s: {'met' if fetch < 2.0 else 'NOT met'} ({fetch:.2f} s median)"
              + ("" if args.messages >= 100000 else "  [fewer than 100,000 messages: not the target's size]"))

    print()
    print(f"2. Mixed workload: {args.clients} concurrent clients on one {args.work_messages}-message INBOX "
          f"(one user, as devices of one account), {what}, each client a seeded op sequence (the same on both)")
    names = [name for name, _ in OPERATIONS]
    header = f"{'operation':<15}" + "".join(f" {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} |" for _ in runs.values())
    if rb and dc:
        header += f" {'ratio':>6}"
    print(f"{'':<15}" + "".join(f" {server.name:^25}|" for server in runs.values()))
    print(header)
    print("-" * len(header))

    def rate(server: ServerRun, name: str | None) -> float:
        mix = server.mix
        if mix is None or mix.seconds <= 0:
            return 0.0
        count = mix.total if name is None else len(mix.latencies.get(name, []))
        return count / mix.seconds

    for name in [*names, None]:
        row = f"{name or 'all':<15}"
        for server in runs.values():
            values = (server.mix.latencies.get(name, []) if name else
                      [v for vs in server.mix.latencies.values() for v in vs]) if server.mix else []
            row += f" {rate(server, name):>8.1f} {_ms(percentile_or_nan(values, 0.5)):>7} " \
                   f"{_ms(percentile_or_nan(values, 0.99)):>7} |"
        if rb and dc:
            ratio = rate(rb, name) / rate(dc, name) if rate(dc, name) else float("nan")
            row += f" {ratio:>5.2f}x"
        print(row)
    print("ops/s: completed operations of that kind per second of the run (all clients together);")
    print("       p50/p99: latency of one operation, command sent to tagged OK. ratio: runbox-mta / Dovecot.")
    for name in names:
        print(f"  {name:<15} {OPERATION_DESCRIPTIONS[name]}")
    for server in runs.values():
        mix = server.mix
        if mix:
            print(f"{server.name}: {mix.total} operations in {mix.seconds:.1f} s ({mix.abandoned} in flight at the "
                  f"end, abandoned, not counted), {len(mix.errors)} errors; server "
                  f"processes used {mix.server_cpu:.1f} CPU-s ({mix.server_cpu / max(mix.total, 1) * 1000:.2f} ms "
                  f"per op), the client {mix.client_cpu:.1f} CPU-s; all CPUs {mix.machine_busy:.0%} busy")
    if rb and dc and rb.mix and dc.mix:
        overall = rate(rb, None) / rate(dc, None) if rate(dc, None) else float("nan")
        print(f"target: overall op rate at least Dovecot's: {'met' if overall >= 1.0 else 'NOT met'} "
              f"({overall:.2f}x)")

    if args.idle_connections:
        print()
        print(f"3. IDLE: {args.idle_connections} TLS connections wanted (LOGIN, SELECT INBOX of "
              f"{args.idle_messages} messages, IDLE), then one APPEND from another connection")
        print("   All idle on the same INBOX, so the APPEND wakes every one of them: each of Dovecot's imap")
        print("   processes syncs the Maildir and its index files, each runbox-mta session reads the changes")
        print("   from the store.")
        header = f"{'server':<12} {'open':>6} {'failed':>6} {'secs':>6} {'procs':>11} {'PSS MiB':>15} " \
                 f"{'PSS/conn':>9} {'RSS/conn':>9} {'EXISTS<1s':>10} {'all':>6} {'p50 ms':>7} {'max ms':>7}"
        print(header)
        print("-" * len(header))
        for server in runs.values():
            idle = server.idle
            if idle is None:
                continue
            within = sum(1 for value in idle.exists_latencies if value <= EXISTS_WITHIN)
            print(f"{server.name:<12} {idle.opened:>6} {len(idle.failures):>6} {idle.open_seconds:>6.1f} "
                  f"{idle.processes_before:>5}->{idle.processes_after:<5} "
                  f"{idle.before_kib[1] / 1024:>6.0f}->{idle.after_kib[1] / 1024:<7.0f} "
                  f"{idle.per_connection(1):>6.0f}KiB {idle.per_connection(0):>6.0f}KiB {within:>10} "
                  f"{len(idle.exists_latencies):>6} "
                  f"{_ms(percentile_or_nan(idle.exists_latencies, 0.5)):>7} "
                  f"{_ms(max(idle.exists_latencies) if idle.exists_latencies else float('nan')):>7}")
        print("open/failed/secs: connections that reached IDLE, those that did not, time to open them all")
        print(f"            ({OPEN_CONCURRENCY} at a time). procs: server processes before -> after.")
        print("PSS MiB:    proportional set size summed over all server processes (/proc/PID/smaps_rollup),")
        print("            before opening (IDLE is each server's first phase) -> with all connections idling")
        print("            (3 s after the last); Dovecot: master, log, config, anvil, auth, stats, imap-login")
        print("            and every imap process; runbox-mta: its one process. PSS/conn, RSS/conn: the growth")
        print("            divided by the connections open.")
        print("EXISTS<1s:  IDLE connections that received '* N EXISTS' within 1 s of sending the APPEND")
        print("            (the commit is not visible to a client, and the APPEND's tagged OK can come after")
        print("            the pushes when the server is busy waking the others); measured in the client,")
        print(f"            which reads all of them on one event loop. all: how many got it within "
              f"{EXISTS_WAIT:.0f} s;")
        print("            p50/max: over those.")
        for server in runs.values():
            idle = server.idle
            if idle and idle.opened:
                print(f"{server.name}: machine MemAvailable fell by {idle.available_drop_kib / 1024:.0f} MiB "
                      f"({idle.available_drop_kib / idle.opened:.0f} KiB per connection; includes the client's "
                      f"side, kernel socket buffers and page tables, and is noisy: others use the machine too)")
                print(f"{server.name}: the APPEND took {idle.append_seconds * 1000:.0f} ms (sent -> tagged OK)")
                if idle.failures:
                    print(f"{server.name}: first open failures: {'; '.join(sorted(set(idle.failures))[:3])}")
                for problem in idle.delivery_problems:
                    print(f"{server.name}: {problem}")
        if rb and dc and rb.idle and dc.idle and rb.idle.opened and dc.idle.opened:
            ratio = rb.idle.per_connection(1) / dc.idle.per_connection(1) if dc.idle.per_connection(1) else float("nan")
            counts = {rb.idle.opened, dc.idle.opened}
            reached = (f"{args.idle_connections} reached on both" if counts == {args.idle_connections}
                       else f"NOT all {args.idle_connections} reached: runbox-mta {rb.idle.opened}, "
                            f"Dovecot {dc.idle.opened}")
            print(f"target: at most 1/10 of Dovecot's memory per IDLE connection (PSS): "
                  f"{'met' if ratio <= 0.1 else 'NOT met'} (runbox-mta / Dovecot = {ratio:.3f}; {reached})")
        print(f"RLIMIT_NOFILE of the driver and the servers it started: {nofile}")

    print()
    s = dovecot_settings(args)
    print("Setup: the same generated Maildirs on both; runbox-mta reads them with `runbox-mta import`")
    print("  before it starts, Dovecot gets hard-linked copies. runbox-mta: SQLite (WAL, synchronous=FULL);")
    print("  Argon2id at t=1, m=8 KiB, p=1 (password hashing is not what is measured; Dovecot's passdb is")
    print(f"  a static password); [limits] connections_per_address and the listener's max_connections = "
          f"{s['connections']}.")
    print("  Dovecot: Maildir, mail_fsync = optimized (the default), passdb static, userdb static;")
    print(f"  service imap-login: service_count = 0 (high-performance mode), client_limit = {LOGIN_CLIENT_LIMIT},")
    print(f"  process_min_avail = {s['min_avail']}, process_limit = {s['login_processes']}; service imap: "
          "client_limit = 1 (the default: one")
    print(f"  process per connection), process_limit = {s['connections']}; default_client_limit = "
          f"{s['client_limit']}; default_process_limit = {s['connections']};")
    print(f"  mail_max_userip_connections = {s['connections']}.")
    print("  Mail set up in: " + ", ".join(f"{server.name} {server.setup_seconds:.1f} s" for server in runs.values()))
    print(f"  runbox-mta code: {source_state()}")
    for server in runs.values():
        for note in server.notes:
            print(f"note: {server.name}: {note}")
        if server.mix:
            for error in sorted(set(server.mix.errors))[:5]:
                print(f"{server.name} error: {error}")


def source_state() -> str:
    """The commit the daemon ran from, and whether runbox_mta/ had uncommitted changes then
    (several people work in this tree)."""
    try:
        commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "runbox_mta"]).splitlines()
    except (SystemExit, OSError):
        return "unknown (no git)"
    return f"commit {commit}" + (f" + uncommitted changes in {len(dirty)} files under runbox_mta/" if dirty else "")


def percentile_or_nan(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    sub = parser.add_subparsers(dest="command", required=True)
    imap = sub.add_parser("imap", help="runbox-mta vs Dovecot, a mixed IMAP client workload")
    imap.add_argument("--messages", type=int, default=100000, help="messages in the big mailbox (SELECT, FETCH FLAGS)")
    imap.add_argument("--work-messages", type=int, default=10000, help="messages in the mixed workload's mailbox")
    imap.add_argument("--idle-messages", type=int, default=100, help="messages in the IDLE connections' INBOX")
    imap.add_argument("--clients", type=int, default=20, help="concurrent clients of the mixed workload")
    imap.add_argument("--duration", type=float, default=60.0, help="seconds of mixed workload per server")
    imap.add_argument("--operations", type=int, help="instead of --duration: this many operations per server")
    imap.add_argument("--idle-connections", type=int, default=10000, help="IDLE connections (0: skip)")
    imap.add_argument("--only", choices=("runbox", "dovecot"), help="run one side only")
    imap.add_argument("--nice", type=int, default=-10,
                      help="scheduling priority change for everything the benchmark runs (0: none)")
    imap.add_argument("--work", type=Path, required=True, help="temporary directory (scripts/bench makes it)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.messages < 1 or args.work_messages < 200 or args.clients < 1 or args.idle_messages < 1:
        parser.error("--messages, --clients and --idle-messages must be positive, --work-messages at least 200")
    if args.nice and os.geteuid() == 0:
        os.nice(args.nice)
    # Client sockets here, server sockets in the servers (which inherit the limit).
    nofile = raise_nofile(2 * args.idle_connections + 1000)
    if nofile < args.idle_connections + args.clients + 200:
        print(f"warning: RLIMIT_NOFILE is {nofile}: not enough for {args.idle_connections} connections", flush=True)
    runs: dict[str, ServerRun] = {}
    print(f"work directory {args.work}; generating the mailboxes ...", flush=True)
    maildirs(args)
    if args.only in (None, "runbox"):
        print("runbox-mta ...", flush=True)
        runs["runbox"] = bench_runbox(args)
    if args.only in (None, "dovecot"):
        print("dovecot ...", flush=True)
        runs["dovecot"] = bench_dovecot(args)
    report(args, runs, nofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
