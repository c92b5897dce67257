"""One mailbox, two protocols: POP3 and IMAP clients over TLS see the same
messages, POP3's UIDL is IMAP's UID and UIDVALIDITY, and a POP3 deletion
reaches an open IMAP session as EXPUNGE."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import ssl
from pathlib import Path

import pytest

from runbox_mta.config import load_config
from runbox_mta.imap.server import ImapProtocol
from runbox_mta.pop3.server import Pop3Protocol
from tests.daemon_config import listener_block, write_daemon_config
from tests.threaded_daemon import ThreadedDaemon

pytestmark = pytest.mark.timeout(60)

ADDRESS = "alice@example.test"
PASSWORD = "correct horse battery"
MESSAGES = [
    b"From: bob@example.test\r\nSubject: one\r\n\r\nfirst\r\n",
    b"From: bob@example.test\r\nSubject: two\r\n\r\n.leading dot\r\nsecond\r\n",
    b"From: bob@example.test\r\nSubject: three\r\n\r\nthird\r\n",
]


@pytest.fixture
def daemon(tmp_path: Path, database_url: str):
    listeners = listener_block("pop3", "implicit") + listener_block("imap", "implicit")
    config = load_config(write_daemon_config(tmp_path, database_url, listeners=listeners))
    serving = ThreadedDaemon(config, {"pop3": Pop3Protocol(), "imap": ImapProtocol()}, asyncio.new_event_loop)
    serving.add_account(ADDRESS, PASSWORD, MESSAGES)
    yield serving
    assert serving.stop() == 0  # no hidden crashes


def client_tls(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "certs" / "server.pem"))


def port(daemon: ThreadedDaemon, protocol: str) -> int:
    return next(l.address[1] for l in daemon.daemon.listeners if l.config.protocol == protocol)


def imap_login(daemon: ThreadedDaemon, tmp_path: Path) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", port(daemon, "imap"), ssl_context=client_tls(tmp_path))
    imap.login(ADDRESS, PASSWORD)
    return imap


def pop3_login(daemon: ThreadedDaemon, tmp_path: Path) -> poplib.POP3_SSL:
    pop = poplib.POP3_SSL("127.0.0.1", port(daemon, "pop3"), context=client_tls(tmp_path))
    pop.user(ADDRESS)
    pop.pass_(PASSWORD)
    return pop


def test_uidl_is_imap_uid_and_uidvalidity_and_bytes_agree(daemon, tmp_path):
    imap = imap_login(daemon, tmp_path)
    imap.select("INBOX", readonly=True)
    _, (uidvalidity,) = imap.response("UIDVALIDITY")
    uidvalidity = int(uidvalidity)
    _, fetched = imap.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    imap_messages = {int(re.search(rb"UID (\d+)", meta).group(1)): body
                     for meta, body in (item for item in fetched if isinstance(item, tuple))}
    imap.logout()

    pop = pop3_login(daemon, tmp_path)
    _, listing, _ = pop.uidl()
    pop_uidls = [line.split()[1].decode() for line in listing]
    assert pop_uidls == [f"{uid:08X}{uidvalidity:08X}" for uid in sorted(imap_messages)]
    for number, uid in enumerate(sorted(imap_messages), start=1):
        _, lines, _ = pop.retr(number)
        assert b"\r\n".join(lines) + b"\r\n" == imap_messages[uid] == MESSAGES[number - 1]
    pop.quit()


def test_a_pop3_deletion_reaches_an_open_imap_session_as_expunge(daemon, tmp_path):
    imap = imap_login(daemon, tmp_path)
    imap.select("INBOX")

    pop = pop3_login(daemon, tmp_path)
    pop.dele(2)
    pop.quit()  # deletions take effect here, durably, before +OK

    imap.noop()
    assert imap.untagged_responses.get("EXPUNGE") == [b"2"]
    _, data = imap.search(None, "ALL")
    assert data == [b"1 2"]
    _, subjects = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert [item[1].strip() for item in subjects if isinstance(item, tuple)] == [b"Subject: one", b"Subject: three"]
    imap.logout()


def test_a_pop3_session_dropped_before_quit_deletes_nothing_imap_can_see(daemon, tmp_path):
    pop = pop3_login(daemon, tmp_path)
    pop.dele(1)
    pop.sock.close()  # no QUIT: the UPDATE state is never reached

    imap = imap_login(daemon, tmp_path)
    _, data = imap.select("INBOX", readonly=True)
    assert data == [b"3"]
    imap.logout()
