"""`generate_self_signed`: a development certificate local clients can verify."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from runbox_mta.certs import generate_self_signed
from runbox_mta.errors import RunboxError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_self_signed("mail.example.org", tmp_path_factory.mktemp("certs") / "tls")


def _certificate(pair: tuple[Path, Path]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pair[0].read_bytes())


def test_writes_server_pem_and_server_key_into_the_directory(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert (cert.name, key.name) == ("server.pem", "server.key")
    assert cert.parent == key.parent and cert.parent.name == "tls"


def test_names_the_host_localhost_and_both_loopback_addresses(pair: tuple[Path, Path]) -> None:
    names = _certificate(pair).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
    ]


def test_key_is_ecdsa_p256(pair: tuple[Path, Path]) -> None:
    public_key = _certificate(pair).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)


def test_key_file_is_readable_by_its_owner_only(pair: tuple[Path, Path]) -> None:
    assert stat.S_IMODE(pair[1].stat().st_mode) == 0o600


def test_is_valid_from_an_hour_ago_for_825_days(pair: tuple[Path, Path]) -> None:
    cert = _certificate(pair)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)
    assert abs(cert.not_valid_before_utc - start) < datetime.timedelta(minutes=5)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=825)


def test_is_a_server_certificate_not_a_ca(pair: tuple[Path, Path]) -> None:
    extensions = _certificate(pair).extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
    ]


def test_generating_again_replaces_both_files_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    first = generate_self_signed("mail.example.org", tmp_path)
    old_cert = first[0].read_bytes()
    generate_self_signed("mail.example.org", tmp_path)
    assert first[0].read_bytes() != old_cert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key", "server.pem"]


def test_unwritable_directory_raises_runbox_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(RunboxError, match="not-a-directory") as caught:
        generate_self_signed("mail.example.org", blocker / "tls")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_client_trusting_the_certificate_verifies_it_by_loopback_name(
    pair: tuple[Path, Path], server_hostname: str,
) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*pair)
    client = ssl.create_default_context(cafile=pair[0])  # check_hostname=True, CERT_REQUIRED
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_accept_and_greet, args=(listener, server))
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(100) == b"hello\n"
        thread.join(5)


def _accept_and_greet(listener: socket.socket, context: ssl.SSLContext) -> None:
    raw, _ = listener.accept()
    with context.wrap_socket(raw, server_side=True) as tls:
        tls.sendall(b"hello\n")
        tls.recv(1)  # wait for the client to close
