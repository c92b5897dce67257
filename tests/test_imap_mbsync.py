"""mbsync (Debian's isync), the sync client real users run, against a real daemon over TLS,
on SQLite and PostgreSQL.

mbsync keeps UIDVALIDITY, UIDs and flags per message in a state file and
trusts the server to keep them stable (SPEC §6): if we renumbered, changed
UIDVALIDITY or lost flags, it would download everything again or propagate
the wrong changes. Each scenario syncs a server account to a local Maildir
and checks both sides. CI installs isync (.ci/run); a local run without it
skips these tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from runbox_mta.config import load_config
from runbox_mta.imap.server import ImapProtocol
from tests.daemon_config import listener_block, write_daemon_config
from tests.test_imap_server import certs, shared_certs  # noqa: F401 (fixtures)
from tests.threaded_daemon import ThreadedDaemon

MBSYNC = shutil.which("mbsync")
C = TypeVar("C")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(MBSYNC is None, reason="mbsync is not installed (apt-get install isync; CI has it)"),
]

ADDRESS = "ola@example.test"
PASSWORD = "correct horse battery staple"
MESSAGES = [
    b"From: a@example.net\r\nSubject: one\r\n\r\nfirst\r\n",
    b"From: b@example.net\r\nSubject: two\r\n\r\nsecond\r\n",
    b"From: c@example.net\r\nSubject: three\r\n\r\nthird\r\n",
]
# mbsync 1.4's names for connection security, by listener kind.
SSL_TYPES = {"implicit": "IMAPS", "starttls": "STARTTLS"}
# Commands that download a message or change the server; a sync without changes sends none.
TRANSFERS = re.compile(r"BODY|BINARY|RFC822|STORE|APPEND|EXPUNGE|MOVE|COPY")


class Mbsync:
    """mbsync channels between the server and Maildirs under `root`: "inbox" for INBOX alone,
    "all" for every folder, created on whichever side lacks it."""

    def __init__(self, root: Path, port: int, tls: str, certificate: Path) -> None:
        self.root = root
        self.maildir = root / "mail" / "INBOX"
        self.config = root / "mbsyncrc"
        (root / "mail").mkdir(parents=True)  # mbsync creates mailboxes, not the store's root
        self.config.write_text(f"""
IMAPAccount server
Host 127.0.0.1
Port {port}
User {ADDRESS}
Pass "{PASSWORD}"
SSLType {SSL_TYPES[tls]}
CertificateFile {certificate}

IMAPStore far
Account server

MaildirStore near
Path {root / "mail"}/
Inbox {self.maildir}
SubFolders Verbatim

Channel inbox
Far :far:
Near :near:
Patterns INBOX
Create Near
Sync All
Expunge Both
SyncState *

Channel all
Far :far:
Near :near:
Patterns *
Create Both
Sync All
Expunge Both
SyncState *
""")

    def run(self, channel: str = "inbox") -> str:
        """Sync once (verbose, with the IMAP traffic); the output, which must report success."""
        result = subprocess.run(
            [str(MBSYNC), "-V", "-Dn", "-c", str(self.config), channel], capture_output=True, text=True,
            check=False, timeout=60, env={**os.environ, "HOME": str(self.root)})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    def messages(self, folder: str = "INBOX") -> dict[bytes, Path]:
        """Each message of a local folder, in the server's form (CRLF, no X-TUID), and its file."""
        maildir = self.maildir if folder == "INBOX" else self.root / "mail" / folder
        return {without_tuid(path.read_bytes().replace(b"\n", b"\r\n")): path
                for sub in ("new", "cur") for path in (maildir / sub).iterdir()}


def without_tuid(message: bytes) -> bytes:
    """mbsync tags each message it copies with a header of its own (and stores LF line ends locally)."""
    return re.sub(rb"^X-TUID: \S+\r\n", b"", message, count=1, flags=re.MULTILINE)


def commands(output: str) -> list[str]:
    """The IMAP commands mbsync sent in one run (its -Dn trace), without tags."""
    return re.findall(r"^(?:\(\d+ in progress\) )?>>> \S+ (.*)$", output, re.MULTILINE)


def transfers(output: str) -> list[str]:
    return [command for command in commands(output) if TRANSFERS.search(command)]


def downloads(output: str) -> list[str]:
    return [command for command in commands(output) if "BODY.PEEK[]" in command]


Setup = tuple[ThreadedDaemon, int, Mbsync]


def sync_setup(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, certs: Path,
               client: Callable[[Path, int, str, Path], C]) -> Iterator[tuple[ThreadedDaemon, int, C]]:
    """A daemon serving IMAP (request.param: "implicit" or "starttls") with ADDRESS holding
    MESSAGES, its INBOX id, and `client` (root, port, TLS kind, server certificate) syncing it."""
    tls = request.param
    config = load_config(write_daemon_config(tmp_path, database_url, listeners=listener_block("imap", tls)))
    daemon = ThreadedDaemon(config, {"imap": ImapProtocol()}, asyncio.new_event_loop)
    inbox = daemon.add_account(ADDRESS, PASSWORD, MESSAGES)[1]
    yield daemon, inbox, client(tmp_path / "client", daemon.port(tls), tls, certs / "server.pem")
    assert daemon.stop() == 0, "a connection handler crashed"


@pytest.fixture(params=["implicit", "starttls"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, certs: Path) -> Iterator[Setup]:
    yield from sync_setup(request, tmp_path, database_url, certs, Mbsync)


def server_flags(daemon: ThreadedDaemon, inbox: int) -> dict[int, frozenset[str]]:
    async def flags() -> dict[int, frozenset[str]]:
        return {message.uid: frozenset(message.flags) for message in await daemon.store.list_messages(inbox)}

    return daemon.call(flags())


def server_messages(daemon: ThreadedDaemon, inbox: int) -> list[bytes]:
    async def messages() -> list[bytes]:
        return [await daemon.store.read_message(inbox, message.uid)
                for message in await daemon.store.list_messages(inbox)]

    return daemon.call(messages())


def test_first_sync_downloads_everything_and_a_second_one_nothing(setup: Setup):
    daemon, _, mbsync = setup
    first = mbsync.run()
    assert sorted(mbsync.messages()) == sorted(MESSAGES)
    assert downloads(first) == [f"UID FETCH {uid} (BODY.PEEK[])" for uid in (1, 2, 3)]
    state = (mbsync.maildir / ".mbsyncstate").read_text()
    account = daemon.call(daemon.store.get_account(ADDRESS)).id
    uidvalidity = daemon.call(daemon.store.get_mailbox(account, "INBOX")).uidvalidity
    assert re.search(rf"^FarUidValidity {uidvalidity}$", state, re.MULTILINE), state
    second = mbsync.run()
    # Same UIDVALIDITY and UIDs: mbsync recognises every message and transfers none.
    assert transfers(second) == []
    assert (mbsync.maildir / ".mbsyncstate").read_text() == state
    assert sorted(mbsync.messages()) == sorted(MESSAGES)


def test_changes_flow_both_ways(setup: Setup):
    daemon, inbox, mbsync = setup
    mbsync.run()

    # New server mail arrives locally, and only it is downloaded.
    new = b"From: d@example.net\r\nSubject: four\r\n\r\nfourth\r\n"
    daemon.call(daemon.store.deliver([inbox], new))
    output = mbsync.run()
    assert downloads(output) == ["UID FETCH 4 (BODY.PEEK[])"]
    assert sorted(mbsync.messages()) == sorted([*MESSAGES, new])

    # A flag set locally (the Maildir info suffix, ":2,F") reaches the server.
    local = mbsync.messages()
    flagged = local[MESSAGES[1]]
    flagged.rename(flagged.parent.parent / "cur" / (flagged.name.split(":2,")[0] + ":2,F"))
    mbsync.run()
    assert server_flags(daemon, inbox)[2] == {"\\Flagged"}

    # A local deletion expunges the message on the server.
    local[MESSAGES[0]].unlink()
    mbsync.run()
    assert sorted(server_flags(daemon, inbox)) == [2, 3, 4]

    # A flag set on the server reaches the local file name.
    daemon.call(daemon.store.update_flags(inbox, [3], "+", ["\\Seen"]))
    mbsync.run()
    assert mbsync.messages()[MESSAGES[2]].name.endswith(":2,S")

    # A message written locally is uploaded (APPEND with APPENDUID), once.
    written = b"From: ola@example.test\r\nSubject: draft\r\n\r\nwritten here\r\n"
    (mbsync.maildir / "new" / "1700000000.local.host").write_bytes(written.replace(b"\r\n", b"\n"))
    output = mbsync.run()
    assert [command.split(" {")[0] for command in transfers(output)] == ['APPEND "INBOX"']
    assert without_tuid(server_messages(daemon, inbox)[-1]) == written

    final = mbsync.run()
    assert transfers(final) == []
    assert sorted(mbsync.messages()) == sorted([MESSAGES[1], MESSAGES[2], new, written])


def test_folders_are_created_on_both_sides(setup: Setup):
    daemon, _, mbsync = setup
    account = daemon.call(daemon.store.get_account(ADDRESS)).id
    projects = daemon.call(daemon.store.create_mailbox(account, "Work/Projects")).id
    filed = b"From: boss@example.net\r\nSubject: plan\r\n\r\nthe plan\r\n"
    daemon.call(daemon.store.append(projects, filed))
    local = mbsync.root / "mail" / "Lists" / "rust"
    for sub in ("cur", "new", "tmp"):
        (local / sub).mkdir(parents=True)
    kept = b"From: list@example.org\r\nSubject: release\r\n\r\nreleased\r\n"
    (local / "new" / "1700000000.local.host").write_bytes(kept.replace(b"\r\n", b"\n"))

    mbsync.run("all")
    assert sorted(mbsync.messages("Work/Projects")) == [filed]
    names = {mailbox.name for mailbox in daemon.call(daemon.store.list_mailboxes(account))}
    assert {"Lists/rust", "Sent", "Trash", "Archive"} <= names
    rust = daemon.call(daemon.store.get_mailbox(account, "Lists/rust")).id
    assert [without_tuid(data) for data in server_messages(daemon, rust)] == [kept]
    for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert (mbsync.root / "mail" / folder / "cur").is_dir()

    assert transfers(mbsync.run("all")) == []
