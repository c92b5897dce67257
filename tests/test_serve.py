"""`runbox-mta serve` as a real process under a fake systemd: sd_notify states,
watchdog pings, SIGHUP certificate reload, SIGTERM exit within 10 s, dropping root."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

from runbox_mta.certs import generate_self_signed

pytestmark = pytest.mark.timeout(60)

TLS = '[tls]\ncert = "certs/server.pem"\nkey = "certs/server.key"\n'


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET, in the abstract namespace ("@name") as
    systemd may use, so a daemon that dropped root can still reach it."""

    def __init__(self) -> None:
        self.address = f"@runbox-test-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.seen: list[str] = []

    def expect(self, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.seen.extend(message.splitlines())
            if state in message.splitlines():
                return
        raise AssertionError(f"no {state} from the daemon; saw {self.seen}")


def config_file(tmp_path: Path, database_url: str, extra: str = "") -> Path:
    generate_self_signed("localhost", tmp_path / "certs")
    path = tmp_path / "runbox-mta.toml"
    data_dir = "" if "data_dir" in extra else 'data_dir = "var"\n'
    path.write_text(f'hostname = "mail.example.test"\n{data_dir}{extra}\n'
                    f'[database]\nurl = "{database_url}"\n{TLS}')
    return path


def start_serving(config: Path, systemd: FakeSystemd, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "runbox_mta", "--config", str(config), "serve"],
        env={**os.environ, "NOTIFY_SOCKET": systemd.address, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_serve_notifies_reloads_and_stops_within_ten_seconds(tmp_path, database_url):
    config = config_file(tmp_path, database_url)
    systemd = FakeSystemd()
    # WatchdogSec=0.4s: the daemon must ping every 0.2 s.
    daemon = start_serving(config, systemd, WATCHDOG_USEC="400000")
    try:
        systemd.expect("READY=1")
        systemd.expect("WATCHDOG=1", timeout=2)

        generate_self_signed("renewed.example.test", tmp_path / "certs")
        daemon.send_signal(signal.SIGHUP)
        systemd.expect("RELOADING=1")
        systemd.expect("READY=1")

        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        systemd.expect("STOPPING=1")
        assert daemon.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        daemon.kill()
        daemon.wait()
    out, err = daemon.communicate()
    assert "certificates reloaded" in err
    assert "Traceback" not in err


def test_a_broken_certificate_on_reload_keeps_the_daemon_serving(tmp_path, database_url):
    config = config_file(tmp_path, database_url)
    systemd = FakeSystemd()
    daemon = start_serving(config, systemd)
    try:
        systemd.expect("READY=1")
        (tmp_path / "certs" / "server.key").write_text("not a key\n")
        daemon.send_signal(signal.SIGHUP)
        systemd.expect("READY=1")
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        daemon.kill()
        daemon.wait()
    assert "certificate reload failed" in daemon.communicate()[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_serve_started_as_root_drops_to_the_configured_user(tmp_path, database_url):
    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path is private to root; the daemon's state must be nobody's.
    data_dir = Path(tempfile.mkdtemp(prefix="runbox-nobody-"))
    if database_url.startswith("sqlite"):
        shutil.copy(database_url.split("///", 1)[1], data_dir / "runbox.sqlite3")
        database_url = f"sqlite+aiosqlite:///{data_dir / 'runbox.sqlite3'}"
    for path in (data_dir, *data_dir.iterdir()):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    config = config_file(tmp_path, database_url, extra=f'user = "nobody"\ndata_dir = "{data_dir}"')
    systemd = FakeSystemd()
    daemon = start_serving(config, systemd)
    try:
        systemd.expect("READY=1")
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(map(int, uids)) == {nobody.pw_uid}
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        daemon.kill()
        daemon.wait()
        shutil.rmtree(data_dir)
    assert "Traceback" not in daemon.communicate()[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gets the warning")
def test_serve_as_root_without_a_user_warns(tmp_path, database_url):
    path = tmp_path / "c.toml"
    generate_self_signed("localhost", tmp_path / "certs")
    path.write_text(f'hostname = "mail.example.test"\ndata_dir = "var"\n[database]\nurl = "{database_url}"\n{TLS}')
    systemd = FakeSystemd()
    daemon = start_serving(path, systemd)
    try:
        systemd.expect("READY=1")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        daemon.kill()
        daemon.wait()
    assert "serving as root: set `user` in the config" in daemon.communicate()[1]
