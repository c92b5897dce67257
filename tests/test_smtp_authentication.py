"""SPF, DKIM and DMARC on the MX, end to end: a real local DNS responder publishes the sender's
records, a client delivers, and the stored message (or the refusal) shows the verdict."""

from __future__ import annotations

import dkim
import pytest

from runbox_mta.app import Daemon
from runbox_mta.domains import dkim_public_record
from runbox_mta.smtp import codes
from tests.dns_server import DnsServer
from tests.smtp_helpers import (  # noqa: F401  (fixtures)
    ALICE, MX, SmtpClient, dkim_key, dns_server, mail, messages_in, start_mail,
)

pytestmark = pytest.mark.timeout(30)

SENDER_DOMAIN = "sender.example"
SELECTOR = "s2025"
MESSAGE = (b"From: Sam <sam@sender.example>\r\nTo: alice@example.test\r\nSubject: report\r\n"
           b"Message-ID: <1@sender.example>\r\n\r\nThe numbers.\r\n")


def publish(dns_server: DnsServer, *, spf: str, dmarc: str | None) -> None:
    dns_server.add_txt(SENDER_DOMAIN, spf)
    dns_server.add_txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", dkim_public_record(dkim_key()[1]))
    if dmarc:
        dns_server.add_txt(f"_dmarc.{SENDER_DOMAIN}", dmarc)


def signed(message: bytes = MESSAGE) -> bytes:
    signature = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), dkim_key()[1].encode(),
                          canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"subject", b"to"])
    return signature + message


async def deliver(daemon: Daemon, data: bytes, sender: str = "bounces@sender.example") -> str:
    client = await SmtpClient.connect(daemon, MX)
    await client.reply()
    await client.ehlo("mx.sender.example")
    return await client.send_mail(sender, [ALICE], data)


def auth_results(stored: bytes) -> list[str]:
    """The resinfo lines of the (first) Authentication-Results field."""
    field = stored.split(b"Authentication-Results: ", 1)[1].split(b"\r\nReceived:", 1)[0].decode()
    return [part.strip().rstrip(";") for part in field.split("\r\n")]


async def test_spf_dkim_and_dmarc_pass(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=reject")
    assert (await deliver(mail, signed())).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert auth_results(stored) == [
        "mail.example.test", "spf=pass smtp.mailfrom=sender.example",
        f"dkim=pass header.d=sender.example header.s={SELECTOR}", "dmarc=pass header.from=sender.example",
    ]
    assert dkim.verify(stored, dnsfunc=lambda name, timeout=5: dkim_public_record(dkim_key()[1]).encode())


async def test_dmarc_passes_on_aligned_dkim_even_when_spf_fails(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    assert (await deliver(mail, signed())).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    results = auth_results(stored)
    assert results[1] == "spf=fail smtp.mailfrom=sender.example" and results[3].startswith("dmarc=pass")


async def test_dmarc_reject_refuses_a_forgery(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    tampered = signed().replace(b"The numbers.", b"Other numbers.")
    assert await deliver(mail, tampered) == codes.DMARC_REJECT
    assert mail.services is not None
    assert await messages_in(mail.services.store, ALICE) == []


async def test_dmarc_quarantine_delivers_to_junk(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 -all", dmarc="v=DMARC1; p=quarantine")
    assert (await deliver(mail, MESSAGE)).startswith("250 ")
    assert mail.services is not None
    assert await messages_in(mail.services.store, ALICE) == []
    (junk,) = await messages_in(mail.services.store, ALICE, "Junk")
    assert auth_results(junk)[1:] == ["spf=fail smtp.mailfrom=sender.example", "dkim=none",
                                      "dmarc=fail header.from=sender.example"]


async def test_dmarc_none_only_records_the_failure(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 ~all", dmarc="v=DMARC1; p=none")
    assert (await deliver(mail, MESSAGE)).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert auth_results(stored)[1] == "spf=softfail smtp.mailfrom=sender.example"
    assert auth_results(stored)[3] == "dmarc=fail header.from=sender.example"


async def test_dns_trouble_never_rejects(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 -all", dmarc=None)
    dns_server.servfail(f"_dmarc.{SENDER_DOMAIN}")
    assert (await deliver(mail, MESSAGE)).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert auth_results(stored)[3] == "dmarc=temperror header.from=sender.example"


async def test_a_forged_authentication_results_field_of_ours_is_removed(mail: Daemon, dns_server: DnsServer) -> None:
    publish(dns_server, spf="v=spf1 -all", dmarc=None)
    forged = b"Authentication-Results: mail.example.test; dmarc=pass header.from=example.test\r\n" + MESSAGE
    assert (await deliver(mail, forged)).startswith("250 ")
    assert mail.services is not None
    (stored,) = await messages_in(mail.services.store, ALICE)
    assert stored.count(b"Authentication-Results:") == 1 and stored.endswith(b"\r\n" + MESSAGE)
