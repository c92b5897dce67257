"""Self-signed development certificates (`runbox-mta certs generate`).

The certificate is ECDSA P-256 (small, fast, accepted by every current
client) and names the host, localhost, 127.0.0.1 and ::1, so a local client
that trusts it can connect by any of those names with hostname checking on.
Both files are replaced atomically (temp file + rename): a SIGHUP reload
racing the write sees the old file or the new one, never half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runbox_mta.errors import RunboxError

# Apple platforms reject TLS server certificates valid for more than 825 days.
VALIDITY = datetime.timedelta(days=825)
# Backdated so a client whose clock runs a little behind accepts it at once.
BACKDATE = datetime.timedelta(hours=1)


def generate_self_signed(hostname: str, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/server.pem and out_dir/server.key; return their paths."""
    cert_path, key_path = Path(out_dir) / "server.pem", Path(out_dir) / "server.key"
    write_self_signed(hostname, cert_path, key_path)
    return cert_path, key_path


def write_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """Create a new key and self-signed certificate for `hostname` at the given paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(hostname, key)
    _write_atomically(Path(key_path), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ), mode=0o600)
    _write_atomically(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _certificate(hostname: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    dns_names = dict.fromkeys([hostname, "localhost"])  # ordered, without duplicates
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600, so the key is never readable by others.
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # the rename must never expose an empty file
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as error:
        raise RunboxError(f"{path}: cannot write: {error.strerror or error}") from None
