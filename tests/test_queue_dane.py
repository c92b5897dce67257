"""DANE (RFC 7672) for outbound mail: secure TLSA records make TLS mandatory and authenticate it."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runbox_mta.dns import TlsaRecord
from runbox_mta.queue.dane import DanePolicy, matches, name_matches, usable
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.outbound_peers import Authority, SinkFactory, start_sink  # noqa: F401  (fixture)
from tests.test_queue_delivery import ALICE, MESSAGE, Start, queue_empty, start_mta, store_of, wait_until  # noqa: F401


def sink_certificate(tmp_path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((tmp_path / "sink-certs" / "server.pem").read_bytes())


def spki_sha256(certificate: x509.Certificate) -> str:
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def delivered_over(caplog: pytest.LogCaptureFixture) -> str:
    """The TLS outcome the queue logged for the delivery (delivered entries leave the queue)."""
    lines = [record.getMessage() for record in caplog.records if " delivered, " in record.getMessage()]
    assert lines, "no delivery was logged"
    return lines[-1].partition(" over ")[2]


def publish(dns_server: DnsServer, port: int, tlsa: str, *, secure: bool = True) -> None:
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.1")
    dns_server.add(f"_{port}._tcp.mx.remote.test", "TLSA", tlsa)
    dns_server.set_ad(secure, "remote.test")


async def deferred_with(store, text: str) -> None:  # type: ignore[no-untyped-def]
    async def deferred() -> bool:
        entries = await store.list_queue()
        return bool(entries) and entries[0].recipients[0].attempts >= 1

    await wait_until(deferred)
    (entry,) = await store.list_queue()
    assert text in (entry.recipients[0].last_error or "")


async def test_a_matching_dane_ee_record_authenticates_the_mx(start_mta: Start, start_sink: SinkFactory,
                                                              dns_server: DnsServer, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "runbox_mta.queue")
    sink = await start_sink("starttls")
    publish(dns_server, sink.port, f"3 1 1 {spki_sha256(sink_certificate(tmp_path))}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)
    assert delivered_over(caplog).endswith(" verified by DANE-EE")


@pytest.fixture
def issuing_ca() -> Authority:
    """An intermediate CA under a root: the usual DANE-TA(2) trust anchor (RFC 7672 §3.1.2)."""
    return Authority.root("DANE test root").intermediate("DANE test issuing CA")


@pytest.mark.parametrize("record", [
    lambda ca: f"2 0 1 {cert_sha256(ca.certificate)}",
    lambda ca: f"2 1 1 {spki_sha256(ca.certificate)}",
    lambda ca: f"2 0 0 {ca.certificate.public_bytes(Encoding.DER).hex()}",
], ids=["2 0 1 on the CA", "2 1 1 on the CA", "2 0 0 on the CA"])
async def test_a_dane_ta_record_on_the_issuing_ca_authenticates_the_mx(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, tmp_path: Path,
        issuing_ca: Authority, caplog: pytest.LogCaptureFixture, record: Callable[[Authority], str]) -> None:
    caplog.set_level(logging.INFO, "runbox_mta.queue")
    sink = await start_sink("starttls", issuing_ca.issue("mx.remote.test", tmp_path / "pki"))
    publish(dns_server, sink.port, record(issuing_ca))
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)
    assert delivered_over(caplog).endswith(" verified by DANE-TA")


async def test_a_dane_ta_record_on_an_unrelated_ca_keeps_the_mail_queued(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, tmp_path: Path,
        issuing_ca: Authority) -> None:
    unrelated = Authority.root("Someone else's root").intermediate("Someone else's CA")
    sink = await start_sink("starttls", issuing_ca.issue("mx.remote.test", tmp_path / "pki"))
    publish(dns_server, sink.port, f"2 1 1 {spki_sha256(unrelated.certificate)}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "DANE: no TLSA record matches the certificate chain")
    assert not sink.messages


async def test_a_dane_ta_certificate_for_another_name_keeps_the_mail_queued(
        start_mta: Start, start_sink: SinkFactory, dns_server: DnsServer, tmp_path: Path,
        issuing_ca: Authority) -> None:
    sink = await start_sink("starttls", issuing_ca.issue("mx.elsewhere.test", tmp_path / "pki"))
    publish(dns_server, sink.port, f"2 1 1 {spki_sha256(issuing_ca.certificate)}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "DANE-TA: the certificate names mx.elsewhere.test, not mx.remote.test or remote.test")
    assert not sink.messages


def chain_of(authority: Authority, hostname: str, tmp_path: Path, *, expired: bool = False) -> list[bytes]:
    """The DER chain a server with this certificate sends: its own, then its CAs up to the root."""
    pem, _ = authority.issue(hostname, tmp_path, expired=expired)
    return [certificate.public_bytes(Encoding.DER) for certificate in x509.load_pem_x509_certificates(pem.read_bytes())]


def test_dane_ta_judges_the_chain_the_server_sent(issuing_ca: Authority, tmp_path: Path) -> None:
    on_ca = DanePolicy((TlsaRecord(2, 1, 1, bytes.fromhex(spki_sha256(issuing_ca.certificate))),),
                       ("mx.remote.test", "remote.test"))
    good = chain_of(issuing_ca, "mx.remote.test", tmp_path)
    assert on_ca.check(good).accepted
    assert on_ca.check(chain_of(issuing_ca, "remote.test", tmp_path)).accepted  # the next-hop domain, §3.2.2
    expired = on_ca.check(chain_of(issuing_ca, "mx.remote.test", tmp_path, expired=True))
    assert not expired.accepted and "expired" in expired.why
    # RFC 7672 §3.1.2: the anchor must be in the chain as sent; without it nothing matches.
    assert not on_ca.check(good[:1]).accepted
    # The anchor is in the chain, but the server's certificate was not issued under it.
    impostor = chain_of(Authority.root("Impostor root"), "mx.remote.test", tmp_path / "impostor")
    assert not on_ca.check([impostor[0], *good[1:]]).accepted


@pytest.mark.parametrize("pattern, name, expected", [
    ("mx.remote.test", "MX.Remote.Test.", True),
    ("*.remote.test", "mx.remote.test", True),
    ("*.remote.test", "remote.test", False),  # the wildcard is one whole label, never none
    ("*.remote.test", "a.mx.remote.test", False),  # ... nor two
    ("mx*.remote.test", "mx1.remote.test", False),  # partial-label wildcards are not honoured
    ("*.", "mx", False),
])
def test_certificate_name_matching(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


async def test_a_dane_mismatch_keeps_the_mail_queued(start_mta: Start, start_sink: SinkFactory,
                                                     dns_server: DnsServer) -> None:
    sink = await start_sink("starttls")
    publish(dns_server, sink.port, f"3 1 1 {'00' * 32}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "not authenticated: DANE: no TLSA record matches the certificate chain")
    assert not sink.messages


@pytest.mark.parametrize("kind", ["plain", "broken-tls"])
async def test_dane_never_falls_back_to_plaintext(start_mta: Start, start_sink: SinkFactory,
                                                  dns_server: DnsServer, tmp_path: Path, kind: str) -> None:
    sink = await start_sink(kind)
    publish(dns_server, sink.port, f"3 1 1 {spki_sha256(sink_certificate(tmp_path))}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "TLS is required")
    assert not sink.messages


async def test_tlsa_records_without_dnssec_are_ignored(start_mta: Start, start_sink: SinkFactory,
                                                       dns_server: DnsServer) -> None:
    sink = await start_sink("starttls")
    publish(dns_server, sink.port, f"3 1 1 {'00' * 32}", secure=False)  # RFC 7672 §2.2: not DANE
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls


async def test_matching_by_selector_and_matching_type(tmp_path: Path, start_sink: SinkFactory) -> None:
    await start_sink("plain")  # makes the certificate
    certificate = sink_certificate(tmp_path)
    der = certificate.public_bytes(Encoding.DER)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for selector, subject in ((0, der), (1, spki)):
        for mtype, data in ((0, subject), (1, hashlib.sha256(subject).digest()), (2, hashlib.sha512(subject).digest())):
            record = TlsaRecord(3, selector, mtype, data)
            assert usable(record) and matches(record, der)
            # One byte changed (flipped: a hash may already start with any value).
            assert not matches(TlsaRecord(3, selector, mtype, bytes([data[0] ^ 0xFF]) + data[1:]), der)
    assert usable(TlsaRecord(2, 1, 1, b"x"))
    # RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) are not for SMTP.
    assert not any(usable(TlsaRecord(usage, 1, 1, b"x")) for usage in (0, 1))
    assert not usable(TlsaRecord(3, 1, 9, b"x")) and not usable(TlsaRecord(3, 2, 1, b"x"))
    assert DanePolicy(()).check([der]).accepted  # secure but unusable records: TLS required, any certificate
