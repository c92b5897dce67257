"""Daemon config files for tests: a real self-signed certificate, cheap Argon2
parameters (tests only), state under tmp_path and listeners on port 0."""

from __future__ import annotations

from pathlib import Path

from runbox_mta.certs import generate_self_signed


def listener_block(protocol: str, tls: str, extra: str = "") -> str:
    """One [[listeners]] table on 127.0.0.1, port 0 (any free port)."""
    return f'[[listeners]]\nprotocol = "{protocol}"\nbind = "127.0.0.1"\nport = 0\ntls = "{tls}"\n{extra}\n'


def write_daemon_config(tmp_path: Path, database_url: str, *, listeners: str = "", limits: str = "",
                        auth: str = "", outbound: str = "", hostname: str = "mail.example.test") -> Path:
    certs = tmp_path / "certs"
    if not (certs / "server.pem").exists():
        generate_self_signed("localhost", certs)
    path = tmp_path / "runbox-mta.toml"
    path.write_text(f'''
hostname = "{hostname}"
data_dir = "{tmp_path / 'var'}"
[database]
url = "{database_url}"
[tls]
cert = "certs/server.pem"
key = "certs/server.key"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 64
argon2_parallelism = 1
{auth}
[limits]
{limits}
[outbound]
{outbound}
{listeners}
''')
    return path
