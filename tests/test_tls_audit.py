"""`runbox-mta tls audit` against real TLS servers: the daemon's policy passes,
a permissive server is caught, and STARTTLS listeners are probed after their preamble."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from runbox_mta.certs import generate_self_signed
from runbox_mta.cli import main
from runbox_mta.config import TlsConfig
from runbox_mta.tls import TlsContextFactory

pytestmark = pytest.mark.timeout(60)


def rsa_pair(directory: Path) -> tuple[Path, Path]:
    """An RSA certificate, so that a permissive server can pick RSA key exchange."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "rsa.pem", directory / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def permissive_context(directory: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(*rsa_pair(directory))
    return context


async def tls_server(context: ssl.SSLContext) -> asyncio.AbstractServer:
    async def greet(reader, writer):
        writer.write(b"hello\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)


async def stls_server(context: ssl.SSLContext) -> asyncio.AbstractServer:
    """POP3's STLS preamble, then TLS on the same connection."""

    async def serve(reader, writer):
        writer.write(b"+OK ready\r\n")
        if await reader.readline() == b"STLS\r\n":
            writer.write(b"+OK begin TLS\r\n")
            await writer.drain()
            try:
                await writer.start_tls(context)
            except (ssl.SSLError, OSError):
                pass
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def write_config(tmp_path: Path, protocol: str, port: int, tls: str) -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(f'hostname = "mail.example.test"\n[[listeners]]\nprotocol = "{protocol}"\n'
                    f'bind = "127.0.0.1"\nport = {port}\ntls = "{tls}"\n')
    return path


async def run_audit(config: Path, capsys) -> tuple[int, str]:
    status = await asyncio.to_thread(main, ["--config", str(config), "tls", "audit"])
    return status, capsys.readouterr().out


@pytest.fixture
def factory(tmp_path) -> TlsContextFactory:
    cert, key = generate_self_signed("localhost", tmp_path / "certs")
    return TlsContextFactory(TlsConfig(cert=cert, key=key))


async def test_the_daemon_policy_passes_the_audit(tmp_path, factory, capsys):
    server = await tls_server(factory.server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        status, out = await run_audit(write_config(tmp_path, "submission", port, "implicit"), capsys)
    assert status == 0, out
    assert "refused: TLSv1, TLSv1.1" in out
    tls12 = next(line for line in out.splitlines() if line.strip().startswith("TLSv1.2:")).split()[1:]
    assert tls12 and all(suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite) for suite in tls12)
    assert "TLSv1.3: TLS_" in out
    assert "every listener meets the policy" in out


async def test_a_permissive_server_fails_the_audit(tmp_path, capsys):
    server = await tls_server(permissive_context(tmp_path))
    async with server:
        port = server.sockets[0].getsockname()[1]
        status, out = await run_audit(write_config(tmp_path, "imap", port, "implicit"), capsys)
    assert status == 1
    assert "PROBLEM: accepts TLSv1.1" in out
    assert "PROBLEM: accepts AES128-GCM-SHA256 without forward secrecy" in out
    assert "PROBLEM: accepts AECDH-AES128-SHA, which authenticates no server (anonymous)" in out


async def test_starttls_listeners_are_probed_after_their_preamble(tmp_path, factory, capsys):
    server = await stls_server(factory.server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        status, out = await run_audit(write_config(tmp_path, "pop3", port, "starttls"), capsys)
    assert status == 0, out
    assert "TLSv1.3: TLS_" in out


async def test_an_unreachable_listener_fails_the_audit(tmp_path, capsys):
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    status, out = await run_audit(write_config(tmp_path, "submission", port, "implicit"), capsys)
    assert status == 1
    assert "PROBLEM: cannot connect" in out
