"""imapclient end to end: a real daemon (SMTP in, IMAP out) on its own loop in a thread,
imapclient over implicit TLS and over STARTTLS, on SQLite and PostgreSQL.

imapclient parses every response itself (FETCH items, SELECT data, IDLE
pushes), so these tests check that a client library other than our own
transcripts understands the server.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import uvloop
from imapclient import IMAPClient
from imapclient.response_parser import parse_fetch_response

from runbox_mta.app import protocol_registry
from runbox_mta.config import load_config
from tests.daemon_config import listener_block, write_daemon_config
from tests.dns_server import DnsServer, dns_server  # noqa: F401 (fixture)
from tests.test_imap_server import certs, shared_certs  # noqa: F401 (fixtures)
from tests.threaded_daemon import ThreadedDaemon

pytestmark = pytest.mark.timeout(60)

ADDRESS = "ola@example.test"
PASSWORD = "correct horse battery staple"
MESSAGES = [
    b"From: a@example.net\r\nTo: ola@example.test\r\nSubject: one\r\n\r\nfirst\r\n",
    b"From: b@example.net\r\nTo: ola@example.test\r\nSubject: two\r\n\r\nsecond\r\n",
    b"From: c@example.net\r\nTo: ola@example.test\r\nSubject: three\r\n\r\nthird\r\n",
]
IDLE_PUSH_WITHIN = 1.0  # SPEC §6: SMTP delivery reaches an IDLE client within one second


class MailServer(ThreadedDaemon):
    """SMTP (the MX) and IMAP (STARTTLS and implicit TLS) in one daemon, with ADDRESS holding MESSAGES."""

    def __init__(self, tmp_path: Path, database_url: str, nameserver: str,
                 new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        listeners = "".join(listener_block(protocol, tls)
                            for protocol, tls in (("smtp", "starttls"), ("imap", "starttls"), ("imap", "implicit")))
        outbound = f'nameservers = ["{nameserver}"]\nenabled = false'  # nothing leaves: the queue stays put
        config = load_config(write_daemon_config(tmp_path, database_url, listeners=listeners, outbound=outbound))
        super().__init__(config, protocol_registry(), new_loop)
        self.add_account(ADDRESS, PASSWORD, MESSAGES)

    def listener_port(self, protocol: str, tls: str) -> int:
        return next(listener.address[1] for listener in self.daemon.listeners
                    if listener.config.protocol == protocol and listener.config.tls == tls)


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def server(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, certs: Path,
           dns_server: DnsServer) -> Iterator[MailServer]:
    """The daemon on asyncio's loop and on uvloop, which the CLI runs."""
    started = MailServer(tmp_path, database_url, dns_server.nameserver, request.param)
    yield started
    assert started.stop() == 0, "a connection handler crashed"


@pytest.fixture
def tls_client(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "server.pem"))


Connect = Callable[[], IMAPClient]


@pytest.fixture(params=["implicit", "starttls"])
def connect(request: pytest.FixtureRequest, server: MailServer, tls_client: ssl.SSLContext) -> Iterator[Connect]:
    """connect() -> a logged-in IMAPClient, over implicit TLS (993-style) or STARTTLS (143-style)."""
    clients: list[IMAPClient] = []

    def open_client() -> IMAPClient:
        port = server.listener_port("imap", request.param)
        if request.param == "implicit":
            client = IMAPClient("127.0.0.1", port, ssl=True, ssl_context=tls_client, timeout=10)
        else:
            client = IMAPClient("127.0.0.1", port, ssl=False, timeout=10)
            client.starttls(tls_client)
        client.login(ADDRESS, PASSWORD)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.logout()


def test_append_then_fetch_returns_identical_bytes(connect: Connect):
    client = connect()
    every_byte = bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"")
    data = (b"From: x@example.net\r\nSubject: =?utf-8?q?bl=C3=A5?=\r\nX-Raw: \xc3\xa6\xc3\xb8\r\n\r\n"
            + every_byte + b"\r\n" + b"line without end")
    when = datetime(2024, 3, 5, 10, 11, 12, tzinfo=timezone(timedelta(hours=1)))
    response = client.append("Drafts", data, flags=[b"\\Draft", b"$Label"], msg_time=when)
    assert response.startswith(b"[APPENDUID ")
    uid = int(response.split()[2].rstrip(b"]"))
    client.select_folder("Drafts")
    client.normalise_times = False  # keep INTERNALDATE's zone
    fetched = client.fetch([uid], ["BODY.PEEK[]", "RFC822.SIZE", "INTERNALDATE", "FLAGS"])[uid]
    assert fetched[b"BODY[]"] == data
    assert fetched[b"RFC822.SIZE"] == len(data)
    assert fetched[b"INTERNALDATE"] == when and fetched[b"INTERNALDATE"].utcoffset() == timedelta(hours=1)
    assert set(fetched[b"FLAGS"]) == {b"\\Draft", b"$Label"}
    assert client.fetch([uid], ["BINARY.PEEK[]"])[uid][b"BINARY[]"] == data


def test_flags_are_stored_reported_and_searched(connect: Connect):
    client = connect()
    client.select_folder("INBOX")
    uids = client.search(["ALL"])
    assert uids == [1, 2, 3]
    assert client.add_flags([1, 2], [b"\\Flagged", b"$Work"]) == {1: (b"\\Flagged", b"$Work"),
                                                                    2: (b"\\Flagged", b"$Work")}
    assert client.remove_flags([2], [b"$Work"]) == {2: (b"\\Flagged",)}
    client.set_flags([3], [b"\\Seen", b"\\Answered"])
    assert client.get_flags(uids) == {1: (b"\\Flagged", b"$Work"), 2: (b"\\Flagged",),
                                      3: (b"\\Answered", b"\\Seen")}
    assert client.search(["FLAGGED", "NOT", "KEYWORD", "$Work"]) == [2]
    assert client.search(["UNSEEN"]) == [1, 2]
    assert b"$Work" in client.select_folder("INBOX")[b"FLAGS"]  # the new keyword is announced


def test_copy_move_and_expunge(connect: Connect):
    client = connect()
    client.select_folder("INBOX")
    client.copy([1, 2], "Archive")
    client.move([3], "Trash")
    assert client.search(["ALL"]) == [1, 2]
    client.delete_messages([1])
    client.uid_expunge([1])
    assert client.search(["ALL"]) == [2]
    for folder, expected in (("Archive", MESSAGES[:2]), ("Trash", MESSAGES[2:]), ("INBOX", MESSAGES[1:2])):
        client.select_folder(folder, readonly=True)
        fetched = client.fetch(client.search(["ALL"]), ["BODY.PEEK[]"])
        assert [fetched[uid][b"BODY[]"] for uid in sorted(fetched)] == expected
    assert client.folder_status("INBOX", ["MESSAGES", "UIDNEXT"]) == {b"MESSAGES": 1, b"UIDNEXT": 4}


def test_condstore_and_qresync_resync_after_another_sessions_changes(connect: Connect):
    client, other = connect(), connect()
    assert client.enable("QRESYNC") == [b"QRESYNC"]
    selected = client.select_folder("INBOX")
    uidvalidity, modseq = selected[b"UIDVALIDITY"], selected[b"HIGHESTMODSEQ"]
    client.unselect_folder()

    other.select_folder("INBOX")
    other.add_flags([2], [b"\\Seen"])
    other.add_flags([1], [b"\\Deleted"])
    other.uid_expunge([1])
    other.add_flags([3], [b"$Later"])

    # CONDSTORE (RFC 7162 §3.1.4): only what changed since the client's MODSEQ.
    other.select_folder("INBOX")
    changed = other.fetch([2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq}"])
    assert {uid: item[b"FLAGS"] for uid, item in changed.items()} == {2: (b"\\Seen",), 3: (b"$Later",)}

    # QRESYNC (RFC 7162 §3.2.5): the reselect says exactly what vanished and what changed.
    imap = client._imap  # imapclient has no SELECT ... (QRESYNC ...); imaplib under it sends it
    typ, _ = imap._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {modseq} 1:3))")
    assert typ == "OK"
    assert imap.untagged_responses.pop("VANISHED") == [b"(EARLIER) 1"]
    fetches = parse_fetch_response(imap.untagged_responses.pop("FETCH"), uid_is_key=True)
    assert {uid: item[b"FLAGS"] for uid, item in fetches.items()} == {2: (b"\\Seen",), 3: (b"$Later",)}
    assert int(imap.untagged_responses["EXISTS"][-1]) == 2


def test_idle_sees_mail_delivered_over_smtp(connect: Connect, server: MailServer):
    client = connect()
    client.select_folder("INBOX")
    client.idle()
    message = b"From: sender@example.net\r\nTo: ola@example.test\r\nSubject: pushed\r\n\r\nover SMTP\r\n"
    with smtplib.SMTP("127.0.0.1", server.listener_port("smtp", "starttls"), timeout=10) as smtp:
        smtp.ehlo("mx.example.net")
        assert smtp.sendmail("sender@example.net", [ADDRESS], message) == {}
    deadline = time.monotonic() + IDLE_PUSH_WITHIN
    pushed: list[tuple] = []
    while (4, b"EXISTS") not in pushed and (left := deadline - time.monotonic()) > 0:
        pushed += client.idle_check(timeout=left)
    assert (4, b"EXISTS") in pushed
    client.idle_done()
    fetched = client.fetch([4], ["BODY.PEEK[]"])[4][b"BODY[]"]
    assert fetched.endswith(message)  # after the trace headers the MX prepended


def test_folders_envelope_bodystructure_and_unicode_search(connect: Connect):
    """imapclient's own parsers: LIST with modified UTF-7 names, ENVELOPE, BODYSTRUCTURE, SEARCH CHARSET."""
    client = connect()
    assert client.find_special_folder(b"\\Sent") == "Sent"
    client.create_folder("Arkiv/Blåbær")
    assert client.list_folders("Arkiv/", "*") == [((b"\\HasNoChildren",), b"/", "Arkiv/Blåbær")]
    message = ("From: Jørn <j@example.net>\r\nTo: ola@example.test, Kari <k@example.net>\r\n"
               "Subject: =?utf-8?q?R=C3=B8dgr=C3=B8d?=\r\nMessage-ID: <1@example.net>\r\n"
               "Date: Tue, 5 Mar 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               "blåbærsyltetøy\r\n--b\r\nContent-Type: image/png; name=x.png\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n").encode()
    client.append("Arkiv/Blåbær", message)
    client.select_folder("Arkiv/Blåbær")
    fetched = client.fetch([1], ["ENVELOPE", "BODYSTRUCTURE", "BINARY.PEEK[2]"])[1]
    envelope = fetched[b"ENVELOPE"]
    assert envelope.subject == b"=?utf-8?q?R=C3=B8dgr=C3=B8d?="
    assert [address.mailbox for address in envelope.to] == [b"ola", b"k"]
    assert envelope.from_[0].name == "Jørn".encode()
    assert envelope.message_id == b"<1@example.net>"
    structure = fetched[b"BODYSTRUCTURE"]
    assert structure.is_multipart and structure[1] == b"mixed"
    assert structure[0][0][:2] == (b"text", b"plain") and structure[0][1][:2] == (b"image", b"png")
    assert fetched[b"BINARY[2]"] == b"hello"
    assert client.search(["BODY", "syltetøy"], charset="UTF-8") == [1]
    assert client.search(["SUBJECT", "rødgrød"], charset="UTF-8") == [1]
    assert client.get_quota_root("INBOX")[0].mailbox == "INBOX"
    assert client.namespace().personal == (("", "/"),)
    assert client.id_({"name": "test"}) == ((b"name", b"runbox-mta"),)
