"""POP3 end to end: a real daemon (asyncio or uvloop loop, in a thread) and real clients
(poplib, raw sockets) over STLS and POP3S, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import poplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from sqlalchemy import select

from runbox_mta.auth.app_passwords import generate_app_password, normalise_app_password
from runbox_mta.auth.passwords import PasswordHasher
from runbox_mta.certs import generate_self_signed
from runbox_mta.config import Config, load_config
from runbox_mta.pop3.message import transmitted_size
from runbox_mta.pop3 import session as session_module
from runbox_mta.pop3.server import Pop3Protocol
from runbox_mta.store import ChangeKind, CommitFailed, open_store
from runbox_mta.store import models as m
from tests.daemon_config import listener_block, write_daemon_config
from tests.threaded_daemon import ThreadedDaemon

pytestmark = pytest.mark.timeout(60)

ADDRESS = "ola@example.test"
PASSWORD = "correct horse battery staple"
MESSAGES = [
    b"From: a@example.net\r\nSubject: one\r\n\r\nhello\r\n",
    b"From: b@example.net\r\nSubject: two\r\n\r\n.leading dot\r\n.\r\n..\r\nafter\r\n",
    b"From: c@example.net\r\nSubject: three\r\n\r\nlast\r\n",
]
LOOPS = pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop],
                                ids=["asyncio", "uvloop"])


class ServingDaemon(ThreadedDaemon):
    """A daemon serving POP3 for blocking clients (poplib)."""

    def __init__(self, config: Config, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        super().__init__(config, {"pop3": Pop3Protocol()}, new_loop)
        self.expected_crashes = 0

    def populate(self, messages: list[bytes] = MESSAGES, **policy: bool) -> tuple[int, int]:
        return self.add_account(ADDRESS, PASSWORD, messages, **policy)


def write_config(tmp_path: Path, database_url: str, limits: str, extra: str) -> Path:
    listeners = "".join(listener_block("pop3", tls, extra) for tls in ("starttls", "implicit"))
    return write_daemon_config(tmp_path, database_url, listeners=listeners, limits=limits)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    generate_self_signed("localhost", tmp_path / "certs")
    return tmp_path / "certs"


@pytest.fixture
def serve(tmp_path: Path, database_url: str, certs: Path) -> Iterator[Callable[..., ServingDaemon]]:
    started: list[ServingDaemon] = []

    def start(new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
              limits: str = "", extra: str = "") -> ServingDaemon:
        daemon = ServingDaemon(load_config(write_config(tmp_path, database_url, limits, extra)), new_loop)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        assert daemon.stop() == daemon.expected_crashes, "a connection handler crashed"


@pytest.fixture
def tls_client(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "server.pem"))


def pop3_client(daemon: ServingDaemon, context: ssl.SSLContext, mode: str = "pop3s") -> poplib.POP3:
    if mode == "pop3s":
        return poplib.POP3_SSL("127.0.0.1", daemon.port("implicit"), context=context, timeout=10)
    client = poplib.POP3("127.0.0.1", daemon.port("starttls"), timeout=10)
    client.stls(context)
    return client


def logged_in(daemon: ServingDaemon, context: ssl.SSLContext, mode: str = "pop3s") -> poplib.POP3:
    client = pop3_client(daemon, context, mode)
    client.user(ADDRESS)
    client.pass_(PASSWORD)
    return client


class Raw:
    """A line-level client for transcripts poplib cannot write (pipelining, garbage, AUTH)."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock
        self.file = self.sock.makefile("rb")
        assert self.line() == b"+OK POP3 server ready."

    def line(self) -> bytes:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return line[:-2]

    def chat(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def until_unlocked(daemon: ServingDaemon, context: ssl.SSLContext) -> poplib.POP3:
    """Log in as soon as the previous session's lock is gone (it goes when the server sees EOF)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return logged_in(daemon, context)
        except poplib.error_proto as error:
            if b"[IN-USE]" not in error.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- real clients ------------------------------------------------------------------------------


@LOOPS
@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_poplib_reads_and_deletes_over_tls(serve, tls_client, new_loop, mode):
    daemon = serve(new_loop)
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)
    client = logged_in(daemon, tls_client, mode)
    sizes = [transmitted_size(data) for data in MESSAGES]
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [f"{n} {size}".encode() for n, size in enumerate(sizes, 1)]
    for number, data in enumerate(MESSAGES, 1):
        _, lines, _ = client.retr(number)
        assert b"\r\n".join(lines) + b"\r\n" == data  # poplib undid the dot-stuffing: the stored bytes
    assert client.top(2, 1)[1] == [b"From: b@example.net", b"Subject: two", b"", b".leading dot"]
    assert client.dele(2).startswith(b"+OK")
    assert client.quit() == b"+OK Logging out, messages deleted."
    assert daemon.uids(inbox) == [uids[0], uids[2]]


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_large_message_arrives_exactly(serve, tls_client, new_loop):
    daemon = serve(new_loop)
    body = b"".join(b".%05d %s\r\n" % (i, b"x" * 70) for i in range(40_000))  # 3 MB, every line stuffed
    data = b"Subject: big\r\n\r\n" + body
    daemon.populate([data])
    client = logged_in(daemon, tls_client)
    assert client.list(1) == f"+OK 1 {transmitted_size(data)}".encode()
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == data
    client.quit()


def test_the_announced_size_is_exactly_what_retr_sends(serve, tls_client):
    daemon = serve()
    messages = [*MESSAGES, b"Subject: bare\n\n.LF only\nno final newline"]
    daemon.populate(messages)
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == b"+OK Logged in."
    for number in range(1, len(messages) + 1):
        size = int(raw.chat(b"LIST %d" % number).split()[2])
        assert raw.chat(b"RETR %d" % number) == b"+OK %d octets" % size
        received = bytearray()
        while (line := raw.file.readline()) != b".\r\n":
            received += line
        assert len(received) == size
    raw.close()


def test_uidl_is_stable_across_sessions_and_names_the_imap_identity(serve, tls_client):
    daemon = serve()
    account, inbox = daemon.populate()
    mailbox = daemon.call(daemon.store.get_mailbox(account, "INBOX"))
    client = logged_in(daemon, tls_client)
    first = client.uidl()[1]
    client.quit()
    assert first == [f"{n} {uid:08X}{mailbox.uidvalidity:08X}".encode()
                     for n, uid in enumerate(daemon.uids(inbox), 1)]
    daemon.call(daemon.store.append(inbox, b"Subject: new\r\n\r\n"))
    client = logged_in(daemon, tls_client, "stls")
    second = client.uidl()[1]
    client.dele(1)
    client.quit()
    assert second[:3] == first
    client = logged_in(daemon, tls_client)
    assert [line.split()[1] for line in client.uidl()[1]] == [line.split()[1] for line in second[1:]]
    client.quit()


# --- deletion is safe ----------------------------------------------------------------------------


def test_quit_deletions_are_expunges_imap_will_report(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)

    async def subscribe():
        return daemon.store.subscribe(mailbox_id=inbox)

    changes = daemon.call(subscribe())
    client = logged_in(daemon, tls_client)
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")  # only after the commit
    events = [daemon.call(asyncio.wait_for(changes.get(), 1)) for _ in range(2)]
    assert [(event.uid, event.kind) for event in events] == [(uids[0], ChangeKind.EXPUNGE),
                                                            (uids[2], ChangeKind.EXPUNGE)]

    async def tombstones():
        async with daemon.store.engine.connect() as conn:
            return sorted((await conn.execute(select(m.Expunged.uid).where(m.Expunged.mailbox_id == inbox))).scalars())

    assert daemon.call(tombstones()) == [uids[0], uids[2]]
    assert daemon.uids(inbox) == [uids[1]]


def test_a_dropped_connection_deletes_nothing_and_frees_the_maildrop(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)
    client = logged_in(daemon, tls_client)
    client.dele(1)
    client.dele(2)
    client.close()  # no QUIT: poplib just shuts the socket
    client = until_unlocked(daemon, tls_client)
    assert client.stat()[0] == 3
    client.quit()
    assert daemon.uids(inbox) == uids


def test_rset_before_quit_deletes_nothing(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)
    client = logged_in(daemon, tls_client)
    client.dele(1)
    client.rset()
    assert client.quit() == b"+OK Logging out."
    assert daemon.uids(inbox) == uids


def test_a_failed_commit_answers_sys_temp_and_deletes_nothing(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)

    async def broken_expunge(mailbox_id, wanted):
        raise CommitFailed("the database did not store the change: disk full")

    daemon.store.expunge = broken_expunge  # type: ignore[method-assign]
    client = logged_in(daemon, tls_client)
    client.dele(1)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.quit()
    assert daemon.uids(inbox) == uids


def test_a_message_expunged_over_imap_meanwhile(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)
    client = logged_in(daemon, tls_client)
    daemon.call(daemon.store.expunge(inbox, [uids[1]]))
    with pytest.raises(poplib.error_proto, match="deleted by another client"):
        client.retr(2)
    assert client.stat()[0] == 3  # the snapshot's counts
    assert client.retr(3)[1][-1] == b"last"
    client.dele(2)
    assert client.quit().startswith(b"+OK")  # deleting what is already gone is fine
    assert daemon.uids(inbox) == [uids[0], uids[2]]


def test_a_second_session_is_told_the_maildrop_is_in_use(serve, tls_client):
    daemon = serve()
    daemon.populate()
    first = logged_in(daemon, tls_client)
    second = pop3_client(daemon, tls_client, "stls")
    second.user(ADDRESS)
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(PASSWORD)
    assert refused.value.args[0] == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
    first.quit()
    second.user(ADDRESS)
    assert second.pass_(PASSWORD) == b"+OK Logged in."
    second.quit()


# --- authentication ------------------------------------------------------------------------------


def test_before_tls_capa_hides_user_and_sasl_and_logins_are_refused(serve, tls_client):
    daemon = serve()
    daemon.populate()
    raw = Raw(daemon.port("starttls"))
    assert raw.chat(b"CAPA") == b"+OK Capability list follows"
    capabilities = raw.multiline()
    assert b"STLS" in capabilities and b"USER" not in capabilities
    assert not any(line.startswith(b"SASL") for line in capabilities)
    refusal = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
    assert raw.chat(b"USER " + ADDRESS.encode()) == refusal
    assert raw.chat(b"PASS " + PASSWORD.encode()) == refusal
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == refusal
    raw.close()


def test_stls_discards_plaintext_pipelined_after_it(serve, tls_client):
    daemon = serve()
    raw = Raw(daemon.port("starttls"))
    # An injected command in the same packet as STLS must never be executed (CVE-2011-0411).
    raw.sock.sendall(b"STLS\r\nCAPA\r\n")
    assert raw.line() == b"+OK Begin TLS negotiation now."
    raw.starttls(tls_client)
    assert raw.chat(b"QUIT") == b"+OK Logging out."
    raw.close()


def test_auth_plain_initial_response_continuation_and_cancel(serve, tls_client):
    daemon = serve()
    daemon.populate()
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(b"AUTH PLAIN") == b"+ "
    assert raw.chat(b"*") == b"-ERR Authentication cancelled."
    assert raw.chat(b"AUTH PLAIN") == b"+ "
    assert raw.chat(_plain(ADDRESS, PASSWORD).encode()) == b"+OK Logged in."
    assert raw.chat(b"QUIT") == b"+OK Logging out."
    raw.close()
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, 'wrong')}".encode()) == b"-ERR [AUTH] Authentication failed."
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == b"+OK Logged in."
    raw.close()


def test_app_passwords_need_the_pop3_scope_and_app_passwords_only_refuses_the_main_one(serve, tls_client):
    daemon = serve()
    daemon.populate(app_passwords_only=True)
    hasher = PasswordHasher(daemon.config.auth)
    secrets = {"phone": generate_app_password(), "tablet": generate_app_password()}
    try:
        for label, scopes in (("phone", ["pop3"]), ("tablet", ["imap"])):
            password_hash = hasher.hash(normalise_app_password(secrets[label]))
            daemon.call(daemon.store.add_app_password(ADDRESS, label, scopes, password_hash))
    finally:
        hasher.close()
    for password in (PASSWORD, secrets["tablet"]):
        client = pop3_client(daemon, tls_client)
        client.user(ADDRESS)
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] Authentication failed\.'$"):
            client.pass_(password)
        client.quit()
    client = pop3_client(daemon, tls_client)
    client.user(ADDRESS)
    assert client.pass_(secrets["phone"].upper()) == b"+OK Logged in."
    client.quit()


# --- limits and bad input ------------------------------------------------------------------------


def test_garbage_and_over_long_lines_get_err_and_the_connection_survives(serve, tls_client):
    daemon = serve()
    daemon.populate()
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(b"\x00\xff\xfe garbage") == b"-ERR Invalid characters in command."
    assert raw.chat(b"HELO there") == b"-ERR Unknown command."
    assert raw.chat(b"USER " + b"x" * 1000) == b"-ERR Line too long."
    assert raw.chat(b"STAT") == b"-ERR Command not valid in this state."
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == b"+OK Logged in."
    assert raw.chat(b"RETR 99") == b"-ERR No such message."
    raw.sock.sendall(b"NOOP\r\nSTAT\r\nLIST 1\r\n")  # PIPELINING
    assert [raw.line() for _ in range(3)] == [
        b"+OK", b"+OK 3 %d" % sum(map(transmitted_size, MESSAGES)), b"+OK 1 %d" % transmitted_size(MESSAGES[0])]
    assert raw.chat(b"QUIT") == b"+OK Logging out."
    raw.close()


def test_too_many_errors_close_the_connection(serve, tls_client):
    daemon = serve()
    raw = Raw(daemon.port("implicit"), tls_client)
    for _ in range(9):
        assert raw.chat(b"BOGUS") == b"-ERR Unknown command."
    assert raw.chat(b"BOGUS") == b"-ERR Too many errors, closing connection."
    assert raw.file.read() == b""
    raw.close()


def test_an_idle_session_is_closed_and_its_lock_freed(serve, tls_client):
    daemon = serve(limits='pop3_idle_timeout = "0.3s"')
    daemon.populate()
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == b"+OK Logged in."
    assert raw.line() == b"-ERR Disconnected for inactivity."
    assert raw.file.read() == b""
    raw.close()
    client = logged_in(daemon, tls_client)  # no [IN-USE]: the lock went with the session
    client.quit()


def test_shutdown_says_goodbye_and_deletes_nothing(serve, tls_client):
    daemon = serve()
    _, inbox = daemon.populate()
    uids = daemon.uids(inbox)
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.chat(f"AUTH PLAIN {_plain(ADDRESS, PASSWORD)}".encode()) == b"+OK Logged in."
    assert raw.chat(b"DELE 1").startswith(b"+OK")
    stopping = asyncio.run_coroutine_threadsafe(daemon.daemon.stop(grace=0.1), daemon.loop)
    assert raw.line() == b"-ERR [SYS/TEMP] Server shutting down."
    raw.close()
    stopping.result(10)
    # The daemon closed its store: look with a fresh one.
    assert asyncio.run(_uids_in(daemon.config.database.url, inbox)) == uids


def test_a_crashed_session_gives_its_maildrop_back(serve, tls_client, monkeypatch):
    daemon = serve()
    daemon.populate()
    daemon.expected_crashes = 1

    def bug(session, argument):
        raise RuntimeError("deliberate bug")

    monkeypatch.setitem(session_module._COMMANDS, "STAT", (bug, (session_module.Transaction,)))
    client = logged_in(daemon, tls_client)
    with pytest.raises((poplib.error_proto, OSError)):
        client.stat()  # the handler dies: the connection closes without a reply
    client.close()
    client = logged_in(daemon, tls_client)  # no [IN-USE]
    client.quit()


def test_a_full_listener_answers_sys_temp(serve, tls_client):
    daemon = serve(extra="max_connections = 1")
    first = Raw(daemon.port("starttls"))
    second = socket.create_connection(("127.0.0.1", daemon.port("starttls")), timeout=10)
    assert second.makefile("rb").readline() == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    second.close()
    first.close()


async def _uids_in(database_url: str, mailbox_id: int) -> list[int]:
    store = await open_store(database_url)
    try:
        return [message.uid for message in await store.list_messages(mailbox_id)]
    finally:
        await store.close()


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
