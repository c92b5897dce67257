"""IMAP end to end: a real daemon on its own loop in a thread, raw transcripts over
loopback sockets and imaplib over TLS, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import re
import shutil
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from sqlalchemy import text

from runbox_mta.auth.app_passwords import generate_app_password, normalise_app_password
from runbox_mta.certs import generate_self_signed
from runbox_mta.config import load_config
from runbox_mta.imap.server import ImapProtocol
from tests.daemon_config import listener_block, write_daemon_config
from tests.threaded_daemon import ThreadedDaemon
from tests.smtp_helpers import ALICE, SmtpClient, client_tls, dns_server, start_mail  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

ADDRESS = "ola@example.test"
PASSWORD = "correct horse battery staple"
MESSAGES = [
    b"From: Ann <a@example.net>\r\nTo: ola@example.test\r\nSubject: one\r\nDate: Mon, 2 Jan 2023 10:00:00 +0000\r\n"
    b"\r\nhello world\r\n",
    b"From: b@example.net\r\nSubject: two\r\n\r\nsecond body with needle\r\n",
    b"From: c@example.net\r\nSubject: three\r\n\r\nlast\r\n",
]


class ServingDaemon(ThreadedDaemon):
    """A daemon serving IMAP for blocking clients (imaplib)."""

    def __init__(self, tmp_path: Path, database_url: str, new_loop: Callable[[], asyncio.AbstractEventLoop],
                 limits: str) -> None:
        listeners = "".join(listener_block("imap", tls) for tls in ("starttls", "implicit"))
        config = load_config(write_daemon_config(tmp_path, database_url, listeners=listeners, limits=limits))
        super().__init__(config, {"imap": ImapProtocol()}, new_loop)

    def populate(self, messages: list[bytes] = MESSAGES) -> tuple[int, int]:
        return self.add_account(ADDRESS, PASSWORD, messages)


@pytest.fixture(scope="session")
def shared_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certificate pair for the whole run; each test gets a copy (generating one per test is slow)."""
    directory = tmp_path_factory.mktemp("imap-certs")
    generate_self_signed("localhost", directory)
    return directory


@pytest.fixture
def certs(tmp_path: Path, shared_certs: Path) -> Path:
    shutil.copytree(shared_certs, tmp_path / "certs")  # write_daemon_config keeps an existing pair
    return tmp_path / "certs"


@pytest.fixture
def serve(tmp_path: Path, database_url: str, certs: Path) -> Iterator[Callable[..., ServingDaemon]]:
    started: list[ServingDaemon] = []

    def start(new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
              limits: str = "") -> ServingDaemon:
        daemon = ServingDaemon(tmp_path, database_url, new_loop, limits)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        assert daemon.stop() == 0, "a connection handler crashed"


@pytest.fixture
def daemon(serve: Callable[..., ServingDaemon]) -> ServingDaemon:
    """A daemon whose test account has MESSAGES in its INBOX."""
    started = serve()
    started.populate()
    return started


@pytest.fixture
def tls_client(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "server.pem"))


class Raw:
    """A line-level client for transcripts: sends a command, returns every line up to its tagged reply."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> bytes:
        """One response line, literals inlined."""
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        line = line[:-2]
        while (match := re.search(rb"\{(\d+)\}$", line)):
            line += b"\r\n" + self.file.read(int(match.group(1)))
            rest = self.file.readline()
            assert rest.endswith(b"\r\n")
            line += rest[:-2]
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def chat(self, command: bytes, tag: bytes = b"a") -> list[bytes]:
        self.send(tag + b" " + command + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")

    def login(self) -> None:
        assert self.chat(f'LOGIN {ADDRESS} "{PASSWORD}"'.encode())[-1].startswith(b"a OK [CAPABILITY ")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def expect(lines: list[bytes], patterns: list[str]) -> None:
    """Each line matches its pattern (a regex over the whole line)."""
    assert len(lines) == len(patterns), lines
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern.encode(), line, re.S), (line, pattern)


def session(daemon: ServingDaemon, context: ssl.SSLContext, select: bytes | None = None) -> Raw:
    """A raw client over implicit TLS, logged in, with `select` selected if given."""
    raw = Raw(daemon.port("implicit"), context)
    raw.login()
    if select is not None:
        assert raw.chat(b"SELECT " + select)[-1].startswith(b"a OK")
    return raw


def imaps(daemon: ServingDaemon, context: ssl.SSLContext) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", daemon.port("implicit"), ssl_context=context, timeout=10)
    client.login(ADDRESS, PASSWORD)
    return client


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


# --- connection, TLS and authentication ----------------------------------------------------------


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_starttls_listener_refuses_login_before_tls_then_accepts_it(serve, tls_client, new_loop):
    daemon = serve(new_loop)
    daemon.populate()
    raw = Raw(daemon.port("starttls"))
    assert re.fullmatch(rb"\* OK \[CAPABILITY IMAP4rev1 IMAP4rev2 .* STARTTLS LOGINDISABLED\] runbox-mta ready",
                        raw.greeting)
    expect(raw.chat(b"CAPABILITY"), [r"\* CAPABILITY IMAP4rev1 .*STARTTLS LOGINDISABLED", r"a OK .*"])
    expect(raw.chat(f"LOGIN {ADDRESS} x".encode()), [r"a NO \[PRIVACYREQUIRED\] .*"])
    expect(raw.chat(b"AUTHENTICATE PLAIN " + plain(ADDRESS, PASSWORD)), [r"a NO \[PRIVACYREQUIRED\] .*"])
    # Pipelined plaintext after STARTTLS is discarded, never run under TLS.
    raw.send(b"s STARTTLS\r\nx LOGOUT\r\n")
    expect(raw.until(b"s"), [r"s OK Begin TLS negotiation now\."])
    raw.starttls(tls_client)
    capability = raw.chat(b"CAPABILITY")[0]
    assert b"AUTH=PLAIN" in capability and b"STARTTLS" not in capability and b"LOGINDISABLED" not in capability
    expect(raw.chat(b"STARTTLS"), [r"a BAD .*"])
    raw.login()
    expect(raw.chat(b"LOGOUT"), [r"\* BYE .*", r"a OK LOGOUT completed\."])
    raw.close()


def test_authenticate_plain_with_initial_response_continuation_and_failures(daemon, tls_client):
    raw = Raw(daemon.port("implicit"), tls_client)
    expect(raw.chat(b"AUTHENTICATE PLAIN " + plain(ADDRESS, "wrong")), [r"a NO \[AUTHENTICATIONFAILED\] .*"])
    expect(raw.chat(b"AUTHENTICATE CRAM-MD5"), [r"a NO .*"])
    raw.send(b"b AUTHENTICATE PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(b"*\r\n")
    expect(raw.until(b"b"), [r"b BAD Authentication cancelled\."])
    raw.send(b"w AUTHENTICATE PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(plain(ADDRESS, "wrong") + b"\r\n")
    expect(raw.until(b"w"), [r"w NO \[AUTHENTICATIONFAILED\] Authentication failed\."])
    raw.send(b"c AUTHENTICATE PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(plain(ADDRESS, PASSWORD) + b"\r\n")
    expect(raw.until(b"c"), [r"c OK \[CAPABILITY IMAP4rev1 .*\] Logged in\."])
    expect(raw.chat(b"LOGIN x y"), [r"a BAD LOGIN is not allowed in this state"])
    raw.close()


def test_app_password_needs_the_imap_scope(daemon, tls_client):
    secrets = {"mail": generate_app_password(), "pop": generate_app_password()}
    for label, scopes in (("mail", ["imap"]), ("pop", ["pop3"])):
        daemon.call(daemon.store.add_app_password(ADDRESS, label, scopes,
                                                  daemon.hash(normalise_app_password(secrets[label]))))
    raw = Raw(daemon.port("implicit"), tls_client)
    expect(raw.chat(f'LOGIN {ADDRESS} "{secrets["pop"]}"'.encode()), [r"a NO \[AUTHENTICATIONFAILED\] .*"])
    expect(raw.chat(f'LOGIN {ADDRESS} "{secrets["mail"]}"'.encode()), [r"a OK .*"])
    raw.close()


def test_bad_commands_get_bad_and_too_many_close_the_connection(daemon, tls_client):
    raw = Raw(daemon.port("implicit"), tls_client)
    expect(raw.chat(b"FROBNICATE"), [r"a BAD .*"])
    expect(raw.chat(b"SELECT INBOX"), [r"a BAD SELECT is not allowed in this state"])
    expect(raw.chat(b"FETCH 1 FLAGS"), [r"a BAD .*"])
    raw.send(b"\x01\r\n")
    assert raw.line().startswith(b"* BAD ")
    for _ in range(15):  # 19 BADs so far
        raw.chat(b"NOPE")
    raw.send(b"a NOPE\r\n")
    assert raw.line().startswith(b"a BAD")
    assert raw.line() == b"* BYE Too many errors."
    assert raw.file.read() == b""
    raw.close()


def test_login_timeout_says_bye(serve, tls_client):
    daemon = serve(limits='imap_login_timeout = "0.3s"')
    raw = Raw(daemon.port("implicit"), tls_client)
    assert raw.line() == b"* BYE Disconnected for inactivity."
    raw.close()


def test_id_namespace_enable(daemon, tls_client):
    raw = Raw(daemon.port("implicit"), tls_client)
    expect(raw.chat(b'ID ("name" "test")'), [r'\* ID \("name" "runbox-mta"\)', r"a OK .*"])
    raw.login()
    expect(raw.chat(b"NAMESPACE"), [r'\* NAMESPACE \(\("" "/"\)\) NIL NIL', r"a OK .*"])
    expect(raw.chat(b"ENABLE CONDSTORE X-UNKNOWN UTF8=ACCEPT"),
           [r"\* ENABLED CONDSTORE UTF8=ACCEPT", r"a OK .*"])
    raw.close()


# --- mailboxes ------------------------------------------------------------------------------------


def test_list_create_rename_delete_subscribe_status(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b'LIST "" ""'), [r'\* LIST \(\\Noselect\) "/" ""', r"a OK .*"])
    expect(raw.chat(b'LIST "" *'), [
        r'\* LIST \(\\HasNoChildren\) "/" "INBOX"',
        r'\* LIST \(\\HasNoChildren \\Archive\) "/" "Archive"',
        r'\* LIST \(\\HasNoChildren \\Drafts\) "/" "Drafts"',
        r'\* LIST \(\\HasNoChildren \\Junk\) "/" "Junk"',
        r'\* LIST \(\\HasNoChildren \\Sent\) "/" "Sent"',
        r'\* LIST \(\\HasNoChildren \\Trash\) "/" "Trash"',
        r"a OK LIST completed\."])
    expect(raw.chat("CREATE Work/Projekt/Bl\u00e5b\u00e6r".encode().replace(
        "Bl\u00e5b\u00e6r".encode(), b"Bl&AOU-b&AOY-r")), [r"a OK CREATE completed\."])
    expect(raw.chat(b"CREATE Work"), [r"a NO \[ALREADYEXISTS\] .*"])
    expect(raw.chat(b"CREATE INBOX"), [r"a NO \[ALREADYEXISTS\] .*"])
    expect(raw.chat(b"CREATE Important (USE (\\Flagged))"), [r"a NO \[USEATTR\] .*"])
    expect(raw.chat(b'LIST "" Work/%'), [r'\* LIST \(\\HasChildren\) "/" "Work/Projekt"', r"a OK .*"])
    expect(raw.chat(b'LIST "Work/" %/*'), [r'\* LIST \(\\HasNoChildren\) "/" "Work/Projekt/Bl&AOU-b&AOY-r"',
                                           r"a OK .*"])
    expect(raw.chat(b"DELETE Work"), [r"a NO .*children.*"])
    expect(raw.chat(b"RENAME Work Play"), [r"a OK RENAME completed\."])
    expect(raw.chat(b'LIST "" Play*'), [r'\* LIST .* "Play"', r'\* LIST .* "Play/Projekt"',
                                        r'\* LIST .* "Play/Projekt/Bl&AOU-b&AOY-r"', r"a OK .*"])
    expect(raw.chat(b"DELETE Nope"), [r"a NO \[NONEXISTENT\] .*"])
    expect(raw.chat(b"DELETE INBOX"), [r"a NO .*"])
    expect(raw.chat(b"UNSUBSCRIBE Junk"), [r"a OK .*"])
    expect(raw.chat(b'LSUB "" J*'), [r"a OK .*"])
    expect(raw.chat(b'LIST (SUBSCRIBED) "" "J*"'), [r"a OK .*"])
    expect(raw.chat(b'LIST (SPECIAL-USE) "" "*" RETURN (SUBSCRIBED)'), [
        r'\* LIST \(\\HasNoChildren \\Archive \\Subscribed\) "/" "Archive"',
        r'\* LIST \(\\HasNoChildren \\Drafts \\Subscribed\) "/" "Drafts"',
        r'\* LIST \(\\HasNoChildren \\Junk\) "/" "Junk"',
        r'\* LIST \(\\HasNoChildren \\Sent \\Subscribed\) "/" "Sent"',
        r'\* LIST \(\\HasNoChildren \\Trash \\Subscribed\) "/" "Trash"',
        r"a OK .*"])
    expect(raw.chat(b"STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ RECENT)"), [
        r'\* STATUS "INBOX" \(MESSAGES 3 RECENT 0 UIDNEXT 4 UIDVALIDITY \d+ UNSEEN 3 DELETED 0 SIZE %d '
        r'HIGHESTMODSEQ \d+\)' % sum(map(len, MESSAGES)), r"a OK .*"])
    expect(raw.chat(b'LIST "" INBOX RETURN (STATUS (MESSAGES))'),
           [r'\* LIST .* "INBOX"', r'\* STATUS "INBOX" \(MESSAGES 3\)', r"a OK .*"])
    expect(raw.chat(b"STATUS Nope (MESSAGES)"), [r"a NO \[NONEXISTENT\] .*"])
    raw.close()


def test_renaming_inbox_moves_its_messages_and_leaves_it_empty(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b"RENAME inbox Old"), [r"a OK .*"])
    expect(raw.chat(b"STATUS INBOX (MESSAGES)"), [r'\* STATUS "INBOX" \(MESSAGES 0\)', r"a OK .*"])
    expect(raw.chat(b"STATUS Old (MESSAGES UIDNEXT)"), [r'\* STATUS "Old" \(MESSAGES 3 UIDNEXT 4\)', r"a OK .*"])
    raw.close()


def test_utf8_names_after_enable(daemon, tls_client):
    raw = session(daemon, tls_client)
    raw.chat(b"ENABLE UTF8=ACCEPT")
    expect(raw.chat('CREATE "Bl\u00e5"'.encode()), [r"a OK .*"])
    assert raw.chat(b'LIST "" Bl*')[0] == '* LIST (\\HasNoChildren) "/" "Bl\u00e5"'.encode()
    raw.close()


# --- selected state -------------------------------------------------------------------------------


def test_select_examine_and_their_responses(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b"SELECT INBOX"), [
        r"\* FLAGS \(\\Answered \\Flagged \\Deleted \\Seen \\Draft\)",
        r"\* OK \[PERMANENTFLAGS \(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\\*\)\] .*",
        r"\* 3 EXISTS", r"\* 0 RECENT", r"\* OK \[UIDVALIDITY \d+\] .*", r"\* OK \[UIDNEXT 4\] .*",
        r"\* OK \[HIGHESTMODSEQ \d+\] .*", r"a OK \[READ-WRITE\] SELECT completed\."])
    expect(raw.chat(b"EXAMINE Nope"), [r"a NO \[NONEXISTENT\] .*"])
    expect(raw.chat(b"FETCH 1 FLAGS"), [r"a BAD .*"])  # the failed EXAMINE deselected
    raw.chat(b"ENABLE IMAP4rev2")
    lines = raw.chat(b"EXAMINE INBOX")
    assert not any(b"RECENT" in line for line in lines)
    assert lines[-2] == b'* LIST () "/" "INBOX"' and lines[-1] == b"a OK [READ-ONLY] EXAMINE completed."
    expect(raw.chat(b"STORE 1 +FLAGS (\\Seen)"), [r"a NO \[READ-ONLY\] .*"])
    expect(raw.chat(b"FETCH 1 BODY[TEXT]"), [r"\* 1 FETCH \(BODY\[TEXT\] \{13\}\r\nhello world\r\n\)", r"a OK .*"])
    expect(raw.chat(b"FETCH 1 FLAGS"), [r"\* 1 FETCH \(FLAGS \(\)\)", r"a OK .*"])  # EXAMINE never sets \Seen
    expect(raw.chat(b"UNSELECT"), [r"a OK .*"])
    raw.close()


def test_fetch_store_search_transcript(daemon, tls_client):
    raw = session(daemon, tls_client)
    raw.chat(b"SELECT INBOX")
    expect(raw.chat(b"FETCH 1:* (UID FLAGS RFC822.SIZE)"), [
        r"\* %d FETCH \(UID %d FLAGS \(\) RFC822.SIZE %d\)" % (n, n, len(MESSAGES[n - 1])) for n in (1, 2, 3)
    ] + [r"a OK FETCH completed\."])
    expect(raw.chat(b"FETCH 4 FLAGS"), [r"a BAD .*"])
    expect(raw.chat(b"FETCH 1 (ENVELOPE INTERNALDATE)"), [
        r'\* 1 FETCH \(ENVELOPE \("Mon, 2 Jan 2023 10:00:00 \+0000" "one" \(\("Ann" NIL "a" "example.net"\)\) '
        r'.*\) INTERNALDATE "\d\d-\w\w\w-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"\)', r"a OK .*"])
    expect(raw.chat(b"FETCH 2 BODYSTRUCTURE"), [r'\* 2 FETCH \(BODYSTRUCTURE \("text" "plain" .*\)\)', r"a OK .*"])
    expect(raw.chat(b"FETCH 1 BODY[]<0.4>"), [r"\* 1 FETCH \(BODY\[\]<0> \{4\}\r\nFrom FLAGS \(\\Seen\)\)",
                                              r"a OK .*"])
    expect(raw.chat(b"UID STORE 2 +FLAGS (\\Flagged $Work)"), [
        r"\* FLAGS \(\\Answered \\Flagged \\Deleted \\Seen \\Draft \$Work\)",
        r"\* OK \[PERMANENTFLAGS .*\$Work \\\*\)\] .*",
        r"\* 2 FETCH \(FLAGS \(\\Flagged \$Work\) UID 2\)", r"a OK STORE completed\."])
    expect(raw.chat(b"STORE 1:3 -FLAGS.SILENT (\\Seen)"), [r"a OK .*"])
    expect(raw.chat(b"STORE 3 FLAGS \\Deleted"), [r"\* 3 FETCH \(FLAGS \(\\Deleted\)\)", r"a OK .*"])
    expect(raw.chat(b"FETCH 2 (FLAGS MODSEQ)"), [r"\* 2 FETCH \(FLAGS \(\\Flagged \$Work\) MODSEQ \(\d+\)\)",
                                                 r"a OK .*"])
    expect(raw.chat(b"SEARCH FLAGGED"), [r"\* SEARCH 2", r"a OK SEARCH completed\."])
    expect(raw.chat(b"SEARCH MODSEQ 1 FLAGGED"), [r"\* SEARCH 2 \(MODSEQ \d+\)", r"a OK .*"])
    expect(raw.chat(b"SEARCH RETURN (COUNT) MODSEQ 1 FLAGGED"),
           [r'\* ESEARCH \(TAG "a"\) COUNT 1 MODSEQ \d+', r"a OK .*"])
    expect(raw.chat(b"UID SEARCH BODY needle"), [r"\* SEARCH 2", r"a OK .*"])
    expect(raw.chat(b"SEARCH FROM ann SUBJECT ONE"), [r"\* SEARCH 1", r"a OK .*"])
    expect(raw.chat(b"SEARCH NOT DELETED LARGER 10"), [r"\* SEARCH 1 2", r"a OK .*"])
    expect(raw.chat(b"SEARCH OR SENTBEFORE 1-Jan-2024 KEYWORD $Work 1:2"), [r"\* SEARCH 1 2", r"a OK .*"])
    expect(raw.chat(b"SEARCH RETURN (MIN MAX COUNT ALL) ALL"),
           [r'\* ESEARCH \(TAG "a"\) MIN 1 MAX 3 COUNT 3 ALL 1:3', r"a OK .*"])
    expect(raw.chat(b"UID SEARCH RETURN (COUNT) SUBJECT nothing"), [r'\* ESEARCH \(TAG "a"\) UID COUNT 0',
                                                                    r"a OK .*"])
    expect(raw.chat(b"SEARCH CHARSET KOI8-R ALL"), [r"a NO \[BADCHARSET .*"])
    expect(raw.chat(b"UID STORE 1 (UNCHANGEDSINCE 1) +FLAGS (\\Answered)"),
           [r"a OK \[MODIFIED 1\] .*"])
    expect(raw.chat(b"STORE 1 +FLAGS.SILENT (\\Answered)"),  # CONDSTORE is on: the new MODSEQ, not FLAGS
           [r"\* 1 FETCH \(UID 1 MODSEQ \(\d+\)\)", r"a OK .*"])
    expect(raw.chat(b"EXPUNGE"), [r"\* 3 EXPUNGE", r"a OK EXPUNGE completed\."])
    expect(raw.chat(b"CLOSE"), [r"a OK .*"])
    raw.close()


def test_search_of_messages_stored_without_a_searchable_header_reads_their_bytes(daemon, tls_client):
    async def forget_search_headers() -> None:  # as blobs stored before schema revision 0002
        async with daemon.store.engine.begin() as conn:
            await conn.execute(text("UPDATE blobs SET search_header = NULL"))

    raw = session(daemon, tls_client, b"INBOX")
    expect(raw.chat(b"SEARCH FROM ann SUBJECT ONE"), [r"\* SEARCH 1", r"a OK .*"])
    daemon.call(forget_search_headers())
    expect(raw.chat(b"SEARCH FROM ann SUBJECT ONE"), [r"\* SEARCH 1", r"a OK .*"])
    expect(raw.chat(b"SEARCH OR FROM b@ TEXT last"), [r"\* SEARCH 2 3", r"a OK .*"])
    expect(raw.chat(b"SEARCH SENTSINCE 1-Jan-2023 SENTBEFORE 3-Jan-2023"), [r"\* SEARCH 1", r"a OK .*"])
    raw.close()


def test_append_copy_move_with_uidplus(serve, tls_client):
    daemon = serve(limits="message_size = 1000")
    daemon.populate()
    raw = session(daemon, tls_client)
    message = b"Subject: appended\r\n\r\nbody\r\n"
    raw.send(b'a APPEND Drafts (\\Draft) "05-Mar-2024 10:11:12 +0100" {%d}\r\n' % len(message))
    assert raw.line() == b"+ Ready for literal data"
    raw.send(message + b"\r\n")
    expect(raw.until(b"a"), [r"a OK \[APPENDUID \d+ 1\] APPEND completed\."])
    expect(raw.chat(b"APPEND Nope {%d+}\r\n" % len(message) + message), [r"a NO \[TRYCREATE\] .*"])
    expect(raw.chat(b"APPEND Drafts {2000+}\r\n" + b"x" * 2000), [r"a NO \[TOOBIG\] .*"])
    raw.chat(b"SELECT Drafts")
    expect(raw.chat(b"FETCH 1 (FLAGS INTERNALDATE BODY.PEEK[])"), [
        r'\* 1 FETCH \(FLAGS \(\\Draft\) INTERNALDATE "05-Mar-2024 10:11:12 \+0100" BODY\[\] \{%d\}\r\n%s\)'
        % (len(message), re.escape(message.decode())), r"a OK .*"])
    raw.chat(b"SELECT INBOX")
    expect(raw.chat(b"COPY 1:2 Archive"), [r"a OK \[COPYUID \d+ 1:2 1:2\] COPY completed\."])
    expect(raw.chat(b"COPY 1 Nope"), [r"a NO \[TRYCREATE\] .*"])
    expect(raw.chat(b"UID MOVE 2:3 Trash"), [r"\* OK \[COPYUID \d+ 2:3 1:2\] Moved\.", r"\* 3 EXPUNGE",
                                             r"\* 2 EXPUNGE", r"a OK MOVE completed\."])
    expect(raw.chat(b"STATUS Trash (MESSAGES)"), [r'\* STATUS "Trash" \(MESSAGES 2\)', r"a OK .*"])
    raw.close()


def test_other_sessions_changes_arrive_at_noop_but_no_expunge_during_fetch(daemon, tls_client):
    first, second = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    second.chat(b"STORE 1 +FLAGS (\\Deleted)")
    second.chat(b"EXPUNGE")
    second.chat(b"STORE 1 +FLAGS (\\Flagged)")
    expect(first.chat(b"FETCH 3 UID"), [r"\* 3 FETCH \(UID 3\)", r"\* 2 FETCH \(FLAGS \(\\Flagged\)\)",
                                        r"a OK .*"])
    expect(first.chat(b"NOOP"), [r"\* 1 EXPUNGE", r"a OK NOOP completed\."])
    daemon.call(daemon.store.deliver([1], MESSAGES[0]))
    expect(first.chat(b"NOOP"), [r"\* 3 EXISTS", r"a OK .*"])
    for raw in (first, second):
        raw.close()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_idle_sees_a_delivery_within_a_second(serve, tls_client, new_loop):
    daemon = serve(new_loop)
    _, inbox = daemon.populate()
    raw = session(daemon, tls_client)
    raw.chat(b"SELECT INBOX")
    raw.send(b"i IDLE\r\n")
    assert raw.line() == b"+ idling"
    started = time.monotonic()
    daemon.call(daemon.store.deliver([inbox], MESSAGES[1]))
    assert raw.line() == b"* 4 EXISTS"
    assert time.monotonic() - started < 1.0
    raw.send(b"DONE\r\n")
    expect(raw.until(b"i"), [r"i OK IDLE terminated\."])
    raw.close()


# --- real clients --------------------------------------------------------------------------------


def test_imaplib_round_trip(daemon, tls_client):
    client = imaps(daemon, tls_client)
    assert client.select("INBOX") == ("OK", [b"3"])
    every_byte = bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"\r\n")  # imaplib makes LF CRLF
    data = b"From: x@example.net\r\nSubject: exact\r\n\r\n" + every_byte + b"\r\n"
    typ, response = client.append("INBOX", r"(\Flagged)", imaplib.Time2Internaldate(time.time()), data)
    assert typ == "OK" and b"APPENDUID" in response[0]
    client.noop()
    typ, fetched = client.fetch("4", "(BODY[])")
    assert fetched[0][1] == data
    assert client.fetch("4", "(FLAGS)")[1][0] == b"4 (FLAGS (\\Flagged \\Seen))"
    assert client.uid("SEARCH", "FLAGGED")[1] == [b"4"]
    assert client.copy("1", "Archive")[0] == "OK"
    assert client.uid("MOVE", "2", "Trash")[0] == "OK"
    client.store("1", "+FLAGS", r"(\Deleted)")
    assert client.expunge()[1] == [b"2", b"1"]  # MOVE's EXPUNGE, then EXPUNGE's own
    assert client.select("INBOX", readonly=True)[1] == [b"2"]
    client.logout()


def test_imaplib_starttls(daemon, tls_client):
    client = imaplib.IMAP4("127.0.0.1", daemon.port("starttls"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        client.login(ADDRESS, PASSWORD)  # imaplib honours LOGINDISABLED
    client.starttls(tls_client)
    client.login(ADDRESS, PASSWORD)
    assert client.list()[0] == "OK"
    client.logout()


def test_idle_reports_other_sessions_flags_and_expunges(daemon, tls_client):
    idler, other = (session(daemon, tls_client, b"INBOX") for _ in range(2))
    idler.send(b"i IDLE\r\n")
    assert idler.line() == b"+ idling"
    other.chat(b"STORE 2 +FLAGS.SILENT (\\Seen)")
    assert idler.line() == b"* 2 FETCH (FLAGS (\\Seen))"
    other.chat(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.chat(b"EXPUNGE")
    lines = [idler.line()]
    if lines[0] != b"* 1 EXPUNGE":  # the STORE's event, read before the EXPUNGE committed, shows the flag
        lines.append(idler.line())
    assert lines[-1] == b"* 1 EXPUNGE" and lines[:-1] in ([], [b"* 1 FETCH (FLAGS (\\Deleted))"])
    idler.send(b"DONE\r\n")
    expect(idler.until(b"i"), [r"i OK IDLE terminated\."])
    for raw in (idler, other):
        raw.close()


def test_deleting_the_selected_mailbox_ends_the_other_session(daemon, tls_client):
    watcher, deleter = session(daemon, tls_client, b"Junk"), session(daemon, tls_client)
    expect(deleter.chat(b"DELETE Junk"), [r"a OK DELETE completed\."])
    watcher.send(b"a NOOP\r\n")
    assert watcher.line() == b"* BYE The selected mailbox was deleted."
    assert watcher.file.read() == b""
    for raw in (watcher, deleter):
        raw.close()


def test_list_extended_recursivematch_shows_parents_of_subscribed_mailboxes(daemon, tls_client):
    raw = session(daemon, tls_client)
    raw.chat(b"CREATE Lists/rust")
    raw.chat(b"UNSUBSCRIBE Lists")
    expect(raw.chat(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "L%"'),
           [r'\* LIST \(\\HasChildren\) "/" "Lists" \("CHILDINFO" \("SUBSCRIBED"\)\)', r"a OK .*"])
    expect(raw.chat(b'LIST (SUBSCRIBED) "" "L%"'), [r"a OK .*"])
    expect(raw.chat(b'LIST (RECURSIVEMATCH) "" "*"'), [r"a BAD .*"])  # RFC 5258 §3 MUST
    raw.close()


def test_garbage_never_crashes_the_connection(daemon, tls_client):
    raw = session(daemon, tls_client)
    raw.chat(b"SELECT INBOX")
    for line in (b"a FETCH 1:* (BODY[1.2.3.MIME] BINARY[7] BODY[HEADER.FIELDS (X)]<5.3>)", b"a FETCH * BODY[",
                 b"a STORE 1 +FLAGS (\\Recent)", b"a SEARCH OR", b"a UID FETCH 0 FLAGS", b"a COPY 1 \"\"",
                 b"a APPEND INBOX {0+}\r\n", b"a LIST \"\" \"&Jjo\"", b"a SELECT \"a\x01b\"", b"a UID STORE 9 X",
                 b"a CREATE a//b", b"a RENAME INBOX INBOX", b"a STATUS INBOX ()", b"a ENABLE QRESYNC"):
        raw.send(line + b"\r\n")
        reply = raw.until(b"a")[-1]
        assert re.match(rb"a (OK|NO|BAD) ", reply), (line, reply)
    raw.close()


def test_a_large_message_is_fetched_exactly(serve, tls_client):
    daemon = serve()
    body = b"".join(b"%06d %s\r\n" % (i, b"x" * 70) for i in range(40_000))  # 3 MB
    data = b"Subject: big\r\n\r\n" + body
    daemon.populate([data])
    client = imaps(daemon, tls_client)
    client.select("INBOX")
    assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == data
    assert client.fetch("1", "(BODY.PEEK[TEXT]<100.50>)")[1][0][1] == body[100:150]
    client.logout()


def test_quota(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b"GETQUOTAROOT INBOX"), [r'\* QUOTAROOT "INBOX"', r"a OK .*"])
    expect(raw.chat(b'GETQUOTA ""'), [r"a NO \[NONEXISTENT\] .*"])
    daemon.call(daemon.store.update_account(ADDRESS, quota_bytes=10 * 1024))
    used = -(-sum(map(len, MESSAGES)) // 1024)
    expect(raw.chat(b"GETQUOTAROOT INBOX"),
           [r'\* QUOTAROOT "INBOX" ""', rf'\* QUOTA "" \(STORAGE {used} 10\)', r"a OK .*"])
    expect(raw.chat(b'GETQUOTA ""'), [rf'\* QUOTA "" \(STORAGE {used} 10\)', r"a OK .*"])
    expect(raw.chat(b'SETQUOTA "" (STORAGE 1)'), [r"a NO \[NOPERM\] .*"])
    big = b"Subject: big\r\n\r\n" + b"x" * 20_000
    expect(raw.chat(b"APPEND INBOX {%d+}\r\n" % len(big) + big), [r"a NO \[OVERQUOTA\] .*"])
    expect(raw.chat(b"STATUS INBOX (DELETED-STORAGE)"), [r'\* STATUS "INBOX" \(DELETED-STORAGE 0\)', r"a OK .*"])
    raw.close()


def test_qresync_reports_vanished_and_changed_messages(daemon, tls_client):
    client, other = session(daemon, tls_client), session(daemon, tls_client, b"INBOX")
    selected = b"\n".join(client.chat(b"SELECT INBOX"))
    uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", selected).group(1))
    modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", selected).group(1))
    client.chat(b"UNSELECT")
    other.chat(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.chat(b"EXPUNGE")
    other.chat(b"UID STORE 2 +FLAGS.SILENT (\\Seen)")
    expect(client.chat(b"SELECT INBOX (QRESYNC (%d %d))" % (uidvalidity, modseq)), [r"a BAD .*"])
    expect(client.chat(b"ENABLE QRESYNC"), [r"\* ENABLED QRESYNC", r"a OK .*"])
    lines = client.chat(b"SELECT INBOX (QRESYNC (%d %d 1:3))" % (uidvalidity, modseq))
    assert b"* VANISHED (EARLIER) 1" in lines
    assert any(re.fullmatch(rb"\* 1 FETCH \(FLAGS \(\\Seen\) UID 2 MODSEQ \(\d+\)\)", line) for line in lines)
    expect(client.chat(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % modseq), [
        r"\* VANISHED \(EARLIER\) 1", r"\* 1 FETCH \(UID 2 FLAGS \(\\Seen\) MODSEQ \(\d+\)\)", r"a OK .*"])
    client.chat(b"STORE 2 +FLAGS.SILENT (\\Deleted)")
    expect(client.chat(b"EXPUNGE"), [r"\* VANISHED 3", r"a OK .*"])
    for raw in (client, other):
        raw.close()


def test_compress_deflate(daemon, tls_client):
    raw = session(daemon, tls_client)
    expect(raw.chat(b"COMPRESS X"), [r"a BAD .*"])
    # The command after COMPRESS is pipelined in the same packet, already compressed.
    deflate, inflate = zlib.compressobj(wbits=-15), zlib.decompressobj(-15)
    raw.send(b"c COMPRESS DEFLATE\r\n" + deflate.compress(b"s SELECT INBOX\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
    expect(raw.until(b"c"), [r"c OK DEFLATE active\."])
    received = compressed = b""
    while b"s OK" not in received:
        chunk = raw.sock.recv(65536)
        compressed += chunk
        received += inflate.decompress(chunk)
    assert b"* 3 EXISTS\r\n" in received
    # SELECT's eight lines went out as one write: one sync flush (an empty stored block), not eight.
    assert received.count(b"\r\n") == 8 and compressed.count(b"\x00\x00\xff\xff") == 1
    raw.sock.sendall(deflate.compress(b"f FETCH 1 BODY.PEEK[]\r\nz COMPRESS DEFLATE\r\n")
                     + deflate.flush(zlib.Z_SYNC_FLUSH))
    received = b""
    while b"z " not in received:
        received += inflate.decompress(raw.sock.recv(65536))
    assert MESSAGES[0] in received
    assert b"z NO [COMPRESSIONACTIVE]" in received
    raw.close()


def test_idle_ended_by_something_else_than_done(daemon, tls_client):
    raw = session(daemon, tls_client)
    raw.send(b"i IDLE\r\n")
    assert raw.line() == b"+ idling"
    raw.send(b"a NOOP\r\n")
    expect(raw.until(b"i"), [r'i BAD expected "DONE" to end IDLE'])
    expect(raw.chat(b"NOOP"), [r"a OK NOOP completed\."])
    raw.close()


def test_a_drain_ends_idle_sessions_at_once(daemon, tls_client):
    idle = session(daemon, tls_client, b"INBOX")
    idle.send(b"i IDLE\r\n")
    assert idle.line() == b"+ idling"
    between_commands = session(daemon, tls_client)
    started = time.monotonic()
    stopping = asyncio.run_coroutine_threadsafe(daemon.daemon.stop(grace=60), daemon.loop)
    assert idle.line() == b"* BYE [UNAVAILABLE] Server shutting down."
    assert between_commands.line() == b"* BYE [UNAVAILABLE] Server shutting down."
    stopping.result(30)
    assert time.monotonic() - started < 30  # not the 60 s grace period


def test_searchres_saves_a_result_for_dollar(daemon, tls_client):
    raw = session(daemon, tls_client, b"INBOX")
    expect(raw.chat(b"SEARCH RETURN (SAVE) OR SUBJECT one SUBJECT three"), [r"a OK .*saved\."])
    expect(raw.chat(b"FETCH $ (UID)"), [r"\* 1 FETCH \(UID 1\)", r"\* 3 FETCH \(UID 3\)", r"a OK .*"])
    expect(raw.chat(b"UID SEARCH UID $ NOT SUBJECT one"), [r"\* SEARCH 3", r"a OK .*"])
    expect(raw.chat(b"SEARCH RETURN (SAVE MAX) ALL"), [r'\* ESEARCH \(TAG "a"\) MAX 3', r"a OK .*"])
    expect(raw.chat(b"UID FETCH $ (FLAGS)"), [r"\* 3 FETCH \(UID 3 FLAGS \(\)\)", r"a OK .*"])
    raw.chat(b"STORE 3 +FLAGS.SILENT (\\Deleted)")
    raw.chat(b"EXPUNGE")
    expect(raw.chat(b"FETCH $ (UID)"), [r"a OK .*"])  # the saved message is gone
    raw.close()


async def test_mail_received_over_smtp_reaches_an_idle_client_within_a_second(start_mail, tmp_path):
    daemon = await start_mail(listeners=(("smtp", "starttls"), ("imap", "implicit")))
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.listeners[1].address[1],
                                                   ssl=client_tls(tmp_path), server_hostname="localhost")

    async def chat(line: bytes) -> list[bytes]:
        writer.write(line + b"\r\n")
        lines = [await reader.readline()]
        while not lines[-1].startswith(line.split()[0] + b" "):
            lines.append(await reader.readline())
        return lines

    assert (await reader.readline()).startswith(b"* OK [CAPABILITY")
    assert (await chat(f'a LOGIN {ALICE} "{PASSWORD}"'.encode()))[-1].startswith(b"a OK")
    assert b"* 0 EXISTS\r\n" in await chat(b"s SELECT INBOX")
    writer.write(b"i IDLE\r\n")
    assert await reader.readline() == b"+ idling\r\n"
    smtp = await SmtpClient.connect(daemon)
    await smtp.reply()
    await smtp.ehlo("mx.example.net")
    assert (await smtp.send_mail("sender@example.net", [ALICE], MESSAGES[1])).startswith("250 ")
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.readline(), 1.0) == b"* 1 EXISTS\r\n"
    assert asyncio.get_running_loop().time() - started < 1.0
    writer.write(b"DONE\r\n")
    assert await reader.readline() == b"i OK IDLE terminated.\r\n"
    smtp.close()
    writer.close()
