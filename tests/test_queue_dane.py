"""DANE (RFC 7672) for outbound mail: secure TLSA records make TLS mandatory and authenticate it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runbox_mta.dns import TlsaRecord
from runbox_mta.queue.dane import DanePolicy, matches, usable
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.outbound_peers import SinkFactory, start_sink  # noqa: F401  (fixture)
from tests.test_queue_delivery import ALICE, MESSAGE, Start, queue_empty, start_mta, store_of, wait_until  # noqa: F401


def sink_certificate(tmp_path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((tmp_path / "sink-certs" / "server.pem").read_bytes())


def spki_sha256(certificate: x509.Certificate) -> str:
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


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
                                                              dns_server: DnsServer, tmp_path: Path) -> None:
    sink = await start_sink("starttls")
    publish(dns_server, sink.port, f"3 1 1 {spki_sha256(sink_certificate(tmp_path))}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    (received,) = await sink.wait_for(1)
    assert received.tls
    await queue_empty(store)


async def test_a_dane_mismatch_keeps_the_mail_queued(start_mta: Start, start_sink: SinkFactory,
                                                     dns_server: DnsServer) -> None:
    sink = await start_sink("starttls")
    publish(dns_server, sink.port, f"3 1 1 {'00' * 32}")
    store = store_of(await start_mta(f"port = {sink.port}"))
    await store.enqueue(ALICE, ["bob@remote.test"], MESSAGE)
    await deferred_with(store, "does not match its TLSA records (DANE)")
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
            assert not matches(TlsaRecord(3, selector, mtype, b"\0" + data[1:]), der)
    assert not usable(TlsaRecord(2, 1, 1, b"x")) and not usable(TlsaRecord(3, 1, 9, b"x"))
    assert DanePolicy(()).check(der)  # secure but unusable records: TLS required, any certificate
