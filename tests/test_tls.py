"""The TLS policy of SPEC §4, shown with real handshakes over loopback.

Servers run `asyncio.start_server(ssl=factory.server_context())` on a loop in
a background thread, once with asyncio's loop and once with uvloop's; clients
are blocking `ssl` sockets, or a memory-BIO client that keeps the raw bytes
each side sent, so a test can read the server's alerts and key shares itself.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import shutil
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from runbox_mta.certs import generate_self_signed
from runbox_mta.config import SniCertificate, TlsConfig
from runbox_mta.errors import RunboxError
from runbox_mta.tls import TlsContextFactory, describe_tls

pytestmark = pytest.mark.timeout(30)

SNI_NAME = "mail.example.org"
T = TypeVar("T")

# Wire constants (RFC 8446 §4, §4.2.7; RFC 8422 §5.4).
HANDSHAKE_RECORD = 22
CLIENT_HELLO, SERVER_HELLO, SERVER_KEY_EXCHANGE = 1, 2, 12
KEY_SHARE_EXTENSION = 51
X25519, SECP256R1 = 0x001D, 0x0017


# --- certificates -----------------------------------------------------------

def _pair(directory: Path) -> TlsConfig:
    cert, key = generate_self_signed("mta.example.net", directory)
    return TlsConfig(cert=cert, key=key)


def _write_rsa_pair(directory: Path) -> TlsConfig:
    """An RSA-2048 pair, so suites with RSA key exchange or RSA auth can be offered at all."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa.example.net")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rsa.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "rsa.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return TlsConfig(cert=directory / "rsa.pem", key=directory / "rsa.key")


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


@pytest.fixture(scope="module")
def ecdsa_config(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    return _pair(tmp_path_factory.mktemp("ecdsa"))


@pytest.fixture(scope="module")
def rsa_config(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    return _write_rsa_pair(tmp_path_factory.mktemp("rsa"))


@pytest.fixture(scope="module")
def ecdsa(ecdsa_config: TlsConfig) -> TlsContextFactory:
    return TlsContextFactory(ecdsa_config)


@pytest.fixture(scope="module")
def configs(ecdsa_config: TlsConfig, rsa_config: TlsConfig) -> dict[str, TlsConfig]:
    return {"ecdsa": ecdsa_config, "rsa": rsa_config}


@pytest.fixture
def with_sni(tmp_path: Path) -> TlsConfig:
    default, named = _pair(tmp_path / "default"), _pair(tmp_path / "named")
    return TlsConfig(default.cert, default.key, (SniCertificate(SNI_NAME, named.cert, named.key),))


# --- the server: greet, then echo lines, on asyncio or uvloop ----------------

class _LoopThread:
    """An event loop running in a background thread, serving TLS listeners."""

    def __init__(self, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = new_loop()
        self.crashes: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.crashes.append(context))
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def serve(self, context: ssl.SSLContext) -> int:
        server = self._call(asyncio.start_server(self._greet_then_echo, "127.0.0.1", 0, ssl=context))
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _greet_then_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections[asyncio.current_task()] = writer
        try:
            writer.write(b"hello\n")
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away; not the server's fault
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._connections.values():
            writer.close()  # the handler then reads EOF and returns
        await asyncio.wait_for(asyncio.gather(*self._connections), 5)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[ssl.SSLContext], int]]:
    """serve(context) -> port of a greet-then-echo TLS server; fails on crashes in the loop."""
    server = _LoopThread(request.param)
    yield server.serve
    server.close()
    assert server.crashes == []


# --- clients ------------------------------------------------------------------

def _client(maximum: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that trusts anything: these tests look at the policy, not at verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum:
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def _connect(port: int, context: ssl.SSLContext | None = None,
             server_hostname: str | None = None) -> ssl.SSLSocket:
    """Handshake (no SNI unless server_hostname is given) and read the greeting."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = (context or _client()).wrap_socket(raw, server_hostname=server_hostname)
    assert tls.recv(100) == b"hello\n"
    return tls


def _echo(tls: ssl.SSLSocket, line: bytes = b"ping\n") -> bytes:
    tls.sendall(line)
    return tls.recv(100)


def _permissive(config: TlsConfig) -> ssl.SSLContext:
    """A server context with the same certificate that accepts TLS 1.0 and every suite."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(config.cert, config.key)
    return context


def _served_certificate(port: int, server_hostname: str | None = None) -> bytes:
    with _connect(port, server_hostname=server_hostname) as tls:
        return tls.getpeercert(binary_form=True)


@dataclass
class Transcript:
    sent: bytes  # every byte the client wrote
    received: bytes  # every byte the server wrote
    error: ssl.SSLError | None


def _handshake(port: int, context: ssl.SSLContext) -> Transcript:
    """Run a client handshake through memory BIOs, keeping both sides' bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    sent, received = bytearray(), bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while True:
            error = _step(tls)
            data = outgoing.read()
            sock.sendall(data)
            sent += data
            if not isinstance(error, ssl.SSLWantReadError):
                return Transcript(bytes(sent), bytes(received), error)
            chunk = sock.recv(65536)
            received += chunk
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()


def _step(tls: ssl.SSLObject) -> ssl.SSLError | None:
    try:
        tls.do_handshake()
    except ssl.SSLError as error:
        return error
    return None


def _refused(result: Transcript) -> bool:
    """The server ended the handshake without ever sending a ServerHello.

    It writes a fatal alert into its TLS buffer, but asyncio and uvloop close
    the connection without flushing it, so the client sees only EOF.
    """
    return result.error is not None and SERVER_HELLO not in _handshake_messages(result.received)


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """TLS records as (content type, payload); RFC 8446 §5.1."""
    while len(data) >= 5:
        end = 5 + int.from_bytes(data[3:5], "big")
        yield data[0], data[5:end]
        data = data[end:]


def _handshake_messages(data: bytes) -> dict[int, bytes]:
    """The plaintext handshake messages (type -> body) that open one side's byte stream."""
    stream = b"".join(payload for _, payload in
                      takewhile(lambda record: record[0] == HANDSHAKE_RECORD, _records(data)))
    messages = {}
    while len(stream) >= 4:
        end = 4 + int.from_bytes(stream[1:4], "big")
        messages[stream[0]] = stream[4:end]
        stream = stream[end:]
    return messages


def _server_key_share(received: bytes) -> tuple[int, bytes]:
    """(group, ephemeral public key) from a TLS 1.2 ServerKeyExchange or TLS 1.3 ServerHello."""
    messages = _handshake_messages(received)
    if SERVER_KEY_EXCHANGE in messages:  # RFC 8422 §5.4: curve_type, named_curve, point
        body = messages[SERVER_KEY_EXCHANGE]
        return int.from_bytes(body[1:3], "big"), body[4:4 + body[3]]
    share = _extensions(messages[SERVER_HELLO])[KEY_SHARE_EXTENSION]  # RFC 8446 §4.2.8
    return int.from_bytes(share[:2], "big"), share[4:4 + int.from_bytes(share[2:4], "big")]


def _extensions(server_hello: bytes) -> dict[int, bytes]:
    at = 2 + 32  # legacy_version, random
    at += 1 + server_hello[at] + 2 + 1  # session id, cipher suite, compression method
    end = at + 2 + int.from_bytes(server_hello[at:at + 2], "big")
    extensions, at = {}, at + 2
    while at < end:
        size = int.from_bytes(server_hello[at + 2:at + 4], "big")
        extensions[int.from_bytes(server_hello[at:at + 2], "big")] = server_hello[at + 4:at + 4 + size]
        at += 4 + size
    return extensions


# --- the contexts themselves ----------------------------------------------------

def test_server_context_is_the_same_object_for_the_daemons_lifetime(ecdsa: TlsContextFactory) -> None:
    front = ecdsa.server_context()
    ecdsa.reload()
    assert ecdsa.server_context() is front


def test_compression_and_renegotiation_are_off_in_every_context(ecdsa: TlsContextFactory) -> None:
    for context in (ecdsa.server_context(), ecdsa.client_context(False), ecdsa.client_context(True)):
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION


def test_server_prefers_its_own_cipher_order_and_issues_no_tickets(ecdsa: TlsContextFactory) -> None:
    context = ecdsa.server_context()
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.options & ssl.OP_NO_TICKET
    assert context.num_tickets == 0


def test_every_context_allows_tls12_and_up_with_ecdhe_aead_suites_only(ecdsa: TlsContextFactory) -> None:
    for context in (ecdsa.server_context(), ecdsa.client_context(False), ecdsa.client_context(True)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert {(c["kea"], c["aead"]) for c in tls12} == {("kx-ecdhe", True)}
        assert {c["name"] for c in tls12} == {
            "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305",
        }


def test_client_context_is_reused_per_verification_mode(ecdsa: TlsContextFactory) -> None:
    assert ecdsa.client_context(True) is ecdsa.client_context(True)
    assert ecdsa.client_context(False) is not ecdsa.client_context(True)


# --- protocol versions and cipher suites ------------------------------------------

def test_tls11_client_is_refused(
    serve: Callable[[ssl.SSLContext], int], ecdsa_config: TlsConfig, ecdsa: TlsContextFactory,
) -> None:
    client = _client(ciphers="DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs level 0 to speak TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
        client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
    assert _handshake(serve(_permissive(ecdsa_config)), client).error is None  # the client can do it
    result = _handshake(serve(ecdsa.server_context()), client)
    assert _handshake_messages(result.sent)[CLIENT_HELLO][:2] == b"\x03\x02"  # TLS 1.1 offered
    assert _refused(result)


@pytest.mark.parametrize("key_type, suite", [
    ("rsa", "AES128-GCM-SHA256"),  # RSA key exchange: no forward secrecy
    ("rsa", "ECDHE-RSA-AES128-SHA"),  # CBC
    ("ecdsa", "ECDHE-ECDSA-AES128-SHA"),  # CBC
    ("ecdsa", "ECDHE-ECDSA-AES128-SHA256"),  # CBC
])
def test_tls12_client_offering_only_a_weak_suite_is_refused(
    serve: Callable[[ssl.SSLContext], int], configs: dict[str, TlsConfig], key_type: str, suite: str,
) -> None:
    config = configs[key_type]
    client = _client(ssl.TLSVersion.TLSv1_2, suite)
    assert _handshake(serve(_permissive(config)), client).error is None  # the suite itself works
    assert _refused(_handshake(serve(TlsContextFactory(config).server_context()), client))


@pytest.mark.parametrize("key_type, suite", [
    ("ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("ecdsa", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ("rsa", "ECDHE-RSA-AES128-GCM-SHA256"),
    ("rsa", "ECDHE-RSA-CHACHA20-POLY1305"),
])
def test_tls12_client_with_an_ecdhe_aead_suite_connects(
    serve: Callable[[ssl.SSLContext], int], configs: dict[str, TlsConfig], key_type: str, suite: str,
) -> None:
    port = serve(TlsContextFactory(configs[key_type]).server_context())
    with _connect(port, _client(ssl.TLSVersion.TLSv1_2, suite)) as tls:
        assert (tls.version(), tls.cipher()[0]) == ("TLSv1.2", suite)
        assert _echo(tls) == b"ping\n"


def test_default_client_negotiates_tls13(
    serve: Callable[[ssl.SSLContext], int], ecdsa_config: TlsConfig, ecdsa: TlsContextFactory,
) -> None:
    client = ssl.create_default_context(cafile=ecdsa_config.cert)
    with _connect(serve(ecdsa.server_context()), client, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"


def test_describe_tls_names_protocol_and_cipher(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory,
) -> None:
    with _connect(serve(ecdsa.server_context())) as tls:
        assert describe_tls(tls) == f"TLS1.3 {tls.cipher()[0]}"
    assert describe_tls(None) == "none"


# --- forward secrecy ----------------------------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_every_handshake_gets_a_fresh_x25519_key(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory, version: ssl.TLSVersion,
) -> None:
    port = serve(ecdsa.server_context())
    first, second = (_handshake(port, _client(version)) for _ in range(2))
    assert first.error is None and second.error is None
    (group1, key1), (group2, key2) = _server_key_share(first.received), _server_key_share(second.received)
    assert group1 == group2 == X25519 and len(key1) == 32
    assert key1 != key2


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_x25519_gets_a_p256_key(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory, version: ssl.TLSVersion,
) -> None:
    client = _client(version)
    client.set_ecdh_curve("prime256v1")  # the client offers P-256 only
    result = _handshake(serve(ecdsa.server_context()), client)
    assert result.error is None
    group, key = _server_key_share(result.received)
    assert group == SECP256R1 and len(key) == 65  # uncompressed point


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_server_issues_no_session_ticket(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory, version: ssl.TLSVersion,
) -> None:
    with _connect(serve(ecdsa.server_context()), _client(version)) as tls:
        assert _echo(tls) == b"ping\n"  # TLS 1.3 tickets arrive after the handshake
        assert tls.session is not None and not tls.session.has_ticket


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_ticket_check_above_does_see_tickets_from_a_stock_server_context(
    serve: Callable[[ssl.SSLContext], int], ecdsa_config: TlsConfig, version: ssl.TLSVersion,
) -> None:
    stock = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stock.load_cert_chain(ecdsa_config.cert, ecdsa_config.key)
    with _connect(serve(stock), _client(version)) as tls:
        assert _echo(tls) == b"ping\n"
        assert tls.session.has_ticket


# --- SNI ---------------------------------------------------------------------------

@pytest.mark.parametrize("server_hostname", [SNI_NAME, SNI_NAME.upper(), SNI_NAME + "."])
def test_client_asking_for_the_sni_name_gets_its_certificate(
    serve: Callable[[ssl.SSLContext], int], with_sni: TlsConfig, server_hostname: str,
) -> None:
    port = serve(TlsContextFactory(with_sni).server_context())
    assert _served_certificate(port, server_hostname) == _der(with_sni.sni[0].cert)


@pytest.mark.parametrize("server_hostname", [None, "other.example.org"])
def test_client_asking_for_another_name_or_none_gets_the_default_certificate(
    serve: Callable[[ssl.SSLContext], int], with_sni: TlsConfig, server_hostname: str | None,
) -> None:
    port = serve(TlsContextFactory(with_sni).server_context())
    assert _served_certificate(port, server_hostname) == _der(with_sni.cert)


# --- reload ------------------------------------------------------------------------

@pytest.mark.parametrize("server_hostname", [None, SNI_NAME])
def test_reload_serves_new_certificates_to_new_connections(
    serve: Callable[[ssl.SSLContext], int], with_sni: TlsConfig, server_hostname: str | None,
) -> None:
    """Also for clients that send no server name, so the SNI callback runs for them too."""
    factory = TlsContextFactory(with_sni)
    port = serve(factory.server_context())
    cert = with_sni.sni[0].cert if server_hostname else with_sni.cert
    before = _served_certificate(port, server_hostname)
    generate_self_signed("renewed.example.net", cert.parent)
    factory.reload()
    after = _served_certificate(port, server_hostname)
    assert before != after == _der(cert)


def test_connection_opened_before_reload_keeps_working(
    serve: Callable[[ssl.SSLContext], int], with_sni: TlsConfig,
) -> None:
    factory = TlsContextFactory(with_sni)
    port = serve(factory.server_context())
    with _connect(port) as old:
        generate_self_signed("renewed.example.net", with_sni.cert.parent)
        factory.reload()
        assert _served_certificate(port) == _der(with_sni.cert)
        assert _echo(old, b"still here\n") == b"still here\n"


@pytest.mark.parametrize("breakage", ["garbage key", "key of another certificate", "missing key"])
def test_failed_reload_raises_and_keeps_serving_the_old_certificate(
    serve: Callable[[ssl.SSLContext], int], with_sni: TlsConfig, tmp_path: Path, breakage: str,
) -> None:
    factory = TlsContextFactory(with_sni)
    port = serve(factory.server_context())
    before = _served_certificate(port)
    generate_self_signed("renewed.example.net", with_sni.cert.parent)
    _break_key(with_sni.key, breakage, tmp_path)
    with pytest.raises(RunboxError, match=re.escape(str(with_sni.key))):
        factory.reload()
    assert _served_certificate(port) == before


def _break_key(key: Path, breakage: str, scratch: Path) -> None:
    if breakage == "garbage key":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    elif breakage == "key of another certificate":
        shutil.copy(_pair(scratch / "other").key, key)
    else:
        key.unlink()


# --- bad files at start-up -------------------------------------------------------------

@pytest.mark.parametrize("culprit", ["cert", "key", "sni cert", "sni key"])
@pytest.mark.parametrize("breakage", ["missing", "not PEM"])
def test_unusable_file_at_startup_raises_runbox_error_naming_it(
    with_sni: TlsConfig, culprit: str, breakage: str,
) -> None:
    entry = with_sni.sni[0]
    path = {"cert": with_sni.cert, "key": with_sni.key, "sni cert": entry.cert, "sni key": entry.key}[culprit]
    if breakage == "missing":
        path.unlink()
    else:
        path.write_text("hello\n")
    with pytest.raises(RunboxError, match=re.escape(str(path))) as caught:
        TlsContextFactory(with_sni)
    assert "\n" not in str(caught.value)


def test_encrypted_key_raises_runbox_error_instead_of_asking_for_a_passphrase(
    with_sni: TlsConfig,
) -> None:
    key = serialization.load_pem_private_key(with_sni.key.read_bytes(), password=None)
    with_sni.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(RunboxError, match=re.escape(f"{with_sni.key}: the private key is encrypted")):
        TlsContextFactory(with_sni)


def test_key_that_does_not_match_the_certificate_raises_runbox_error_naming_both(
    with_sni: TlsConfig, tmp_path: Path,
) -> None:
    shutil.copy(_pair(tmp_path / "other").key, with_sni.key)
    with pytest.raises(RunboxError, match="does not match") as caught:
        TlsContextFactory(with_sni)
    assert str(with_sni.key) in str(caught.value) and str(with_sni.cert) in str(caught.value)


# --- outbound client contexts ------------------------------------------------------------

def test_opportunistic_client_encrypts_to_a_self_signed_server(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory,
) -> None:
    client = ecdsa.client_context(verify=False)
    with _connect(serve(ecdsa.server_context()), client, server_hostname="mx.example.com") as tls:
        assert tls.version() == "TLSv1.3"


def test_verifying_client_refuses_a_self_signed_server(
    serve: Callable[[ssl.SSLContext], int], ecdsa: TlsContextFactory,
) -> None:
    client = ecdsa.client_context(verify=True)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(serve(ecdsa.server_context()), client, server_hostname="localhost")
