"""OfflineIMAP (Debian's offlineimap3), a second sync client real users run, against a real
daemon over TLS, on SQLite and PostgreSQL.

Like mbsync it keeps UIDVALIDITY and UIDs per message (its status files) and
trusts the server to keep them stable; unlike mbsync it finds an uploaded
message's UID through UIDPLUS's APPENDUID, or else by searching for a header
it adds, and it syncs flags with UID STORE of whole flag lists. Each scenario
syncs a server account to a local Maildir and checks both sides. CI installs
offlineimap3 (.ci/run); a local run without it skips these tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_imap_mbsync import (
    ADDRESS, MESSAGES, PASSWORD, TRANSFERS, server_flags, server_messages, sync_setup,
)
from tests.test_imap_server import certs, shared_certs  # noqa: F401 (fixtures)
from tests.threaded_daemon import ThreadedDaemon

OFFLINEIMAP = shutil.which("offlineimap")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(OFFLINEIMAP is None, reason="offlineimap is not installed (apt-get install offlineimap3; "
                                                   "CI has it)"),
]


class OfflineImap:
    """One OfflineIMAP account syncing the server's INBOX with a local Maildir under `root`."""

    def __init__(self, root: Path, port: int, tls: str, certificate: Path) -> None:
        self.root = root
        self.maildir = root / "mail" / "INBOX"
        self.config = root / "offlineimaprc"
        root.mkdir(parents=True)
        der = ssl.PEM_cert_to_DER_cert(certificate.read_text())
        security = "ssl = yes\nstarttls = no" if tls == "implicit" else "ssl = no\nstarttls = yes"
        self.config.write_text(f"""
[general]
accounts = test
metadata = {root / "state"}

[Account test]
localrepository = near
remoterepository = far

[Repository near]
type = Maildir
localfolders = {root / "mail"}

[Repository far]
type = IMAP
remotehost = 127.0.0.1
remoteport = {port}
remoteuser = {ADDRESS}
remotepass = {PASSWORD}
{security}
cert_fingerprint = {hashlib.sha256(der).hexdigest()}
folderfilter = lambda name: name == "INBOX"
""")

    def run(self) -> str:
        """Sync once; the IMAP traffic it logged (-d imap), after checking it succeeded."""
        log = self.root / "log"
        log.unlink(missing_ok=True)
        result = subprocess.run(
            [str(OFFLINEIMAP), "-c", str(self.config), "-o", "-u", "basic", "-d", "imap", "-l", str(log)],
            capture_output=True, text=True, check=False, timeout=90, env={**os.environ, "HOME": str(self.root)})
        traffic = log.read_text() if log.exists() else ""
        assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, (
            result.stdout + result.stderr + traffic[-3000:])
        return traffic

    def messages(self) -> dict[bytes, Path]:
        """Each message of the local INBOX in the server's form (CRLF) and its file."""
        return {path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"): path
                for sub in ("new", "cur") for path in (self.maildir / sub).iterdir()}


def commands(traffic: str) -> list[str]:
    """The IMAP commands OfflineIMAP sent in one run (imaplib2's debug lines), without tags."""
    return re.findall(r"writer > b'[A-Z]+\d+ (.*?)\\r\\n", traffic)


def transfers(traffic: str) -> list[str]:
    return [command for command in commands(traffic) if TRANSFERS.search(command)]


Setup = tuple[ThreadedDaemon, int, OfflineImap]


@pytest.fixture(params=["implicit", "starttls"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, certs: Path) -> Iterator[Setup]:
    yield from sync_setup(request, tmp_path, database_url, certs, OfflineImap)


def test_offlineimap_syncs_both_ways_and_a_quiet_sync_transfers_nothing(setup: Setup):
    daemon, inbox, client = setup
    first = client.run()
    assert sorted(client.messages()) == sorted(MESSAGES)
    assert transfers(client.run()) == [], "a second sync without changes transferred something"
    assert any("FETCH" in command for command in commands(first))

    # Server mail arrives locally; a flag set on the server reaches the local file name.
    new = b"From: d@example.net\r\nSubject: four\r\n\r\nfourth\r\n"
    daemon.call(daemon.store.deliver([inbox], new))
    daemon.call(daemon.store.update_flags(inbox, [3], "+", ["\\Seen"]))
    client.run()
    local = client.messages()
    assert sorted(local) == sorted([*MESSAGES, new])
    assert local[MESSAGES[2]].name.endswith(",S")

    # A flag set locally reaches the server; a local deletion expunges the message there.
    flagged = local[MESSAGES[1]]
    flagged.rename(flagged.parent.parent / "cur" / (flagged.name.split(":2,")[0] + ":2,F"))
    local[MESSAGES[0]].unlink()
    client.run()
    flags = server_flags(daemon, inbox)
    assert sorted(flags) == [2, 3, 4] and flags[2] == {"\\Flagged"} and flags[3] == {"\\Seen"}

    # A message written locally is uploaded once, and keeps the UID the server gave it.
    written = b"From: ola@example.test\r\nSubject: draft\r\n\r\nwritten here\r\n"
    (client.maildir / "new" / "1700000000.local.host").write_bytes(written.replace(b"\r\n", b"\n"))
    uploaded = client.run()
    assert [command.split(" ")[0] for command in transfers(uploaded)] == ["APPEND"]
    assert server_messages(daemon, inbox)[-1].endswith(b"\r\n\r\nwritten here\r\n")
    assert transfers(client.run()) == []
    assert len(client.messages()) == 4
