"""SPF, DKIM, DMARC and the Authentication-Results header, against a real
DNS responder on 127.0.0.1 and messages signed by dkimpy with keys made here."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from functools import cache

import dkim
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbox_mta.smtp.auth_results import DkimResult, MessageAuthentication, authenticate_message
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (pytest fixture)

SERVER = "mx.runbox.test"
CLIENT_IP = "192.0.2.10"
HELO = "mail.example.test"
SENDER = "alice@example.test"
SPF_PASS = f"v=spf1 ip4:{CLIENT_IP} -all"


@cache
def private_key(name: str, bits: int = 1024) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def key_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def message(from_: str = "Alice <alice@example.test>", body: bytes = b"Hello Bob\r\n", headers: bytes = b"") -> bytes:
    return (
        f"From: {from_}\r\n".encode()
        + b"To: bob@runbox.test\r\nSubject: lunch\r\nMessage-ID: <1@example.test>\r\n"
        + headers
        + b"\r\n"
        + body
    )


def sign(
    data: bytes,
    domain: str = "example.test",
    selector: str = "sel",
    key: rsa.RSAPrivateKey | None = None,
    algorithm: bytes = b"rsa-sha256",
) -> bytes:
    signature = dkim.sign(
        data,
        selector.encode(),
        domain.encode(),
        pem(key or private_key("main")),
        include_headers=[b"from", b"to", b"subject"],
        signature_algorithm=algorithm,
    )
    return signature + data


def publish_key(
    server: DnsServer, domain: str = "example.test", selector: str = "sel", key: rsa.RSAPrivateKey | None = None
) -> None:
    server.add_txt(f"{selector}._domainkey.{domain}", key_record(key or private_key("main")))


async def check(
    server: DnsServer,
    data: bytes,
    *,
    client_ip: str = CLIENT_IP,
    helo: str = HELO,
    mail_from: str = SENDER,
    sampler: Callable[[], float] = lambda: 0.0,
) -> MessageAuthentication:
    return await authenticate_message(
        data,
        client_ip=client_ip,
        helo=helo,
        mail_from=mail_from,
        resolver=server.resolver(),
        authserv_id=SERVER,
        sampler=sampler,
    )


# --- SPF (RFC 7208) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([SPF_PASS], "pass"),
        (["v=spf1 ip4:192.0.2.0/24 -all"], "pass"),
        (["v=spf1 ip4:198.51.100.1 -all"], "fail"),
        (["v=spf1 ip4:198.51.100.1 ~all"], "softfail"),
        (["v=spf1 ip4:198.51.100.1 ?all"], "neutral"),
        ([], "none"),
        (["some other text"], "none"),
        ([SPF_PASS, "v=spf1 -all"], "permerror"),
        (["v=spf1 ip4:not-an-address -all"], "permerror"),
        (["v=spf1 include:nowhere.example.test -all"], "permerror"),
        (["v=spf1 a:smtp.example.test -all"], "pass"),
        (["v=spf1 mx -all"], "pass"),
    ],
)
async def test_spf(dns_server: DnsServer, records: list[str], expected: str) -> None:
    for record in records:
        dns_server.add_txt("example.test", record)
    dns_server.add("smtp.example.test", "A", CLIENT_IP)
    dns_server.add("example.test", "MX", "10 smtp.example.test.")
    result = await check(dns_server, message())
    assert result.spf == expected


async def test_spf_include_chain(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 include:_spf.example.test -all")
    dns_server.add_txt("_spf.example.test", "v=spf1 include:_net.example.test -all")
    dns_server.add_txt("_net.example.test", "v=spf1 ip4:192.0.2.0/24 -all")
    assert (await check(dns_server, message())).spf == "pass"
    assert (await check(dns_server, message(), client_ip="198.51.100.1")).spf == "fail"


async def test_spf_servfail_is_temperror(dns_server: DnsServer) -> None:
    dns_server.servfail("example.test")
    assert (await check(dns_server, message())).spf == "temperror"


async def test_spf_servfail_inside_an_include_is_temperror(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 include:_spf.example.test -all")
    dns_server.servfail("_spf.example.test")
    assert (await check(dns_server, message())).spf == "temperror"


async def test_null_sender_checks_the_helo_identity(dns_server: DnsServer) -> None:
    dns_server.add_txt(HELO, SPF_PASS)
    dns_server.add_txt("example.test", "v=spf1 -all")
    result = await check(dns_server, message(), mail_from="")
    assert result.spf == "pass"
    assert "spf=pass smtp.helo=mail.example.test;" in result.header


async def test_spf_on_ipv6_client(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 ip6:2001:db8::/32 -all")
    assert (await check(dns_server, message(), client_ip="2001:db8::25")).spf == "pass"


async def test_invalid_client_address_is_permerror(dns_server: DnsServer) -> None:
    assert (await check(dns_server, message(), client_ip="not an ip")).spf == "permerror"


def test_pyspf_outside_authenticate_message_cannot_bypass_the_resolver() -> None:
    assert spf.check2(i=CLIENT_IP, s=SENDER, h=HELO)[0] == "temperror"


# --- DKIM (RFC 6376) -------------------------------------------------------------


@pytest.mark.parametrize("bits", [1024, 2048])
async def test_dkim_pass(dns_server: DnsServer, bits: int) -> None:
    key = private_key(f"pass-{bits}", bits)
    publish_key(dns_server, key=key)
    result = await check(dns_server, sign(message(), key=key))
    assert result.dkim == (DkimResult("pass", "example.test", "sel"),)


async def test_dkim_ed25519_signature_passes(dns_server: DnsServer) -> None:
    """RFC 8463 Ed25519 keys are short enough for any DNS provider; more senders use them."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    dns_server.add_txt("ed._domainkey.example.test",
                       f"v=DKIM1; k=ed25519; p={base64.b64encode(bytes(key.verify_key)).decode()}")
    data = message()
    signature = dkim.sign(data, b"ed", b"example.test", base64.b64encode(bytes(key)),
                          include_headers=[b"from", b"to", b"subject"], signature_algorithm=b"ed25519-sha256")
    result = await check(dns_server, signature + data)
    assert result.dkim == (DkimResult("pass", "example.test", "ed"),)


async def test_dkim_fails_after_a_body_change(dns_server: DnsServer) -> None:
    publish_key(dns_server)
    signed = sign(message())
    result = await check(dns_server, signed.replace(b"Hello Bob", b"Hello Eve"))
    assert result.dkim == (DkimResult("fail", "example.test", "sel"),)


async def test_dkim_fails_after_a_signed_header_change(dns_server: DnsServer) -> None:
    publish_key(dns_server)
    signed = sign(message())
    result = await check(dns_server, signed.replace(b"Subject: lunch", b"Subject: wire the money"))
    assert result.dkim == (DkimResult("fail", "example.test", "sel"),)


async def test_unsigned_message_has_no_dkim_results(dns_server: DnsServer) -> None:
    result = await check(dns_server, message())
    assert result.dkim == ()
    assert "\tdkim=none;" in result.header


async def test_dkim_missing_key_is_permerror(dns_server: DnsServer) -> None:
    result = await check(dns_server, sign(message()))
    assert result.dkim == (DkimResult("permerror", "example.test", "sel"),)


async def test_dkim_malformed_key_is_permerror(dns_server: DnsServer) -> None:
    dns_server.add_txt("sel._domainkey.example.test", "v=DKIM1; k=rsa; p=not-base64!")
    assert (await check(dns_server, sign(message()))).dkim[0].result == "permerror"


async def test_dkim_key_servfail_is_temperror(dns_server: DnsServer) -> None:
    dns_server.servfail("sel._domainkey.example.test")
    assert (await check(dns_server, sign(message()))).dkim[0].result == "temperror"


async def test_dkim_wrong_key_fails(dns_server: DnsServer) -> None:
    publish_key(dns_server, key=private_key("other"))
    assert (await check(dns_server, sign(message()))).dkim[0].result == "fail"


async def test_dkim_two_signatures_one_good_one_bad(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    publish_key(dns_server)
    publish_key(dns_server, domain="relay.test", selector="s2", key=private_key("published"))
    data = sign(sign(message()), domain="relay.test", selector="s2", key=private_key("unpublished"))
    result = await check(dns_server, data)
    # Topmost (the relay's, added last) first.
    assert result.dkim == (DkimResult("fail", "relay.test", "s2"), DkimResult("pass", "example.test", "sel"))
    assert result.dmarc == "pass"


async def test_dkim_rsa_sha1_is_not_accepted(dns_server: DnsServer) -> None:
    publish_key(dns_server)
    result = await check(dns_server, sign(message(), algorithm=b"rsa-sha1"))
    assert result.dkim == (DkimResult("permerror", "example.test", "sel"),)


async def test_dkim_signature_missing_tags_is_permerror(dns_server: DnsServer) -> None:
    data = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from\r\n" + message()
    assert (await check(dns_server, data)).dkim == (DkimResult("permerror", None, None),)


async def test_dkim_on_a_header_section_dkimpy_refuses(dns_server: DnsServer) -> None:
    publish_key(dns_server)
    data = sign(message()).replace(b"To: bob", b"garbage line\r\nTo: bob")
    assert (await check(dns_server, data)).dkim == (DkimResult("permerror", None, None),)


# --- DMARC (RFC 7489) ------------------------------------------------------------


async def test_dmarc_pass_via_aligned_spf(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", SPF_PASS)
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    result = await check(dns_server, message())
    assert (result.spf, result.dkim, result.dmarc, result.dmarc_policy) == ("pass", (), "pass", "none")


async def test_dmarc_pass_via_aligned_dkim(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    publish_key(dns_server)
    result = await check(dns_server, sign(message()))
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("fail", "pass", "none")


async def test_dmarc_spf_pass_for_another_domain_does_not_align(dns_server: DnsServer) -> None:
    dns_server.add_txt("bounces.test", SPF_PASS)
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    result = await check(dns_server, message(), mail_from="x@bounces.test")
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("pass", "fail", "reject")


async def test_dmarc_dkim_pass_for_another_domain_does_not_align(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    publish_key(dns_server, domain="other.test")
    result = await check(dns_server, sign(message(), domain="other.test"))
    assert result.dkim[0].result == "pass"
    assert (result.dmarc, result.dmarc_policy) == ("fail", "reject")


@pytest.mark.parametrize("policy", ["reject", "quarantine", "none"])
async def test_dmarc_fail_applies_the_policy(dns_server: DnsServer, policy: str) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    dns_server.add_txt("_dmarc.example.test", f"v=DMARC1; p={policy}; rua=mailto:d@example.test")
    result = await check(dns_server, message())
    assert (result.dmarc, result.dmarc_policy) == ("fail", policy)


async def test_dmarc_sp_applies_to_subdomains(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject; sp=quarantine")
    result = await check(dns_server, message(from_="x@news.example.test"), mail_from="x@news.example.test")
    assert (result.from_domain, result.dmarc, result.dmarc_policy) == ("news.example.test", "fail", "quarantine")
    result = await check(dns_server, message())
    assert (result.dmarc, result.dmarc_policy) == ("fail", "reject")


async def test_dmarc_subdomain_with_its_own_record_uses_its_p(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=none; sp=none")
    dns_server.add_txt("_dmarc.news.example.test", "v=DMARC1; p=reject; sp=none")
    result = await check(dns_server, message(from_="x@news.example.test"))
    assert (result.dmarc, result.dmarc_policy) == ("fail", "reject")


async def test_dmarc_organizational_domain_fallback(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
    result = await check(dns_server, message(from_="x@a.b.example.test"))
    assert (result.from_domain, result.dmarc, result.dmarc_policy) == ("a.b.example.test", "fail", "quarantine")


@pytest.mark.parametrize(
    ("adkim", "expected"), [("", "pass"), ("; adkim=r", "pass"), ("; adkim=s", "fail"), ("; adkim=bogus", "pass")]
)
async def test_dmarc_dkim_alignment_modes(dns_server: DnsServer, adkim: str, expected: str) -> None:
    dns_server.add_txt("_dmarc.example.test", f"v=DMARC1; p=reject{adkim}")
    publish_key(dns_server, domain="mail.example.test")
    result = await check(dns_server, sign(message(), domain="mail.example.test"))
    assert result.dkim[0].result == "pass"
    assert result.dmarc == expected


@pytest.mark.parametrize(("aspf", "expected"), [("", "pass"), ("; aspf=s", "fail")])
async def test_dmarc_spf_alignment_modes(dns_server: DnsServer, aspf: str, expected: str) -> None:
    dns_server.add_txt("_dmarc.example.test", f"v=DMARC1; p=reject{aspf}")
    dns_server.add_txt("bounce.example.test", SPF_PASS)
    result = await check(dns_server, message(), mail_from="b@bounce.example.test")
    assert (result.spf, result.dmarc) == ("pass", expected)


async def test_dmarc_null_sender_aligns_through_the_helo_domain(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    dns_server.add_txt(HELO, SPF_PASS)
    result = await check(dns_server, message(), mail_from="")
    assert (result.spf, result.dmarc) == ("pass", "pass")


async def test_dmarc_without_a_record_is_none(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    dns_server.add_txt("_dmarc.example.test", "v=spf1 not dmarc")
    result = await check(dns_server, message())
    assert (result.dmarc, result.dmarc_policy) == ("none", "none")


async def test_dmarc_two_records_is_none(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=none")
    assert (await check(dns_server, message())).dmarc == "none"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=DMARC1; p=bogus", ("permerror", "none")),
        ("v=DMARC1", ("permerror", "none")),
        ("v=DMARC1; p=reject; sp=bogus", ("permerror", "none")),
        ("v=DMARC1; p=bogus; rua=mailto:d@example.test", ("fail", "none")),
        ("v=DMARC1;p=REJECT", ("fail", "reject")),
        ("  v = DMARC1 ; p = reject ; pct = 200", ("fail", "reject")),
    ],
)
async def test_dmarc_record_syntax(dns_server: DnsServer, record: str, expected: tuple[str, str]) -> None:
    dns_server.add_txt("_dmarc.example.test", record)
    result = await check(dns_server, message())
    assert (result.dmarc, result.dmarc_policy) == expected


@pytest.mark.parametrize(
    ("policy", "pct", "sample", "applied"),
    [
        ("reject", 0, 0.0, "quarantine"),
        ("quarantine", 0, 0.0, "none"),
        ("reject", 50, 0.3, "reject"),
        ("reject", 50, 0.7, "quarantine"),
        ("reject", 100, 0.999, "reject"),
    ],
)
async def test_dmarc_pct_sampling(dns_server: DnsServer, policy: str, pct: int, sample: float, applied: str) -> None:
    dns_server.add_txt("_dmarc.example.test", f"v=DMARC1; p={policy}; pct={pct}")
    result = await check(dns_server, message(), sampler=lambda: sample)
    assert (result.dmarc, result.dmarc_policy) == ("fail", applied)


async def test_dmarc_record_servfail_is_temperror_and_never_rejects(dns_server: DnsServer) -> None:
    dns_server.servfail("_dmarc.example.test")
    result = await check(dns_server, message())
    assert (result.dmarc, result.dmarc_policy) == ("temperror", "none")


async def test_dmarc_aligned_temperror_does_not_fail(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    dns_server.servfail("example.test")
    result = await check(dns_server, message())
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("temperror", "temperror", "none")


async def test_dmarc_unaligned_temperror_still_fails(dns_server: DnsServer) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    dns_server.servfail("attacker.test")
    result = await check(dns_server, message(), mail_from="x@attacker.test")
    assert (result.spf, result.dmarc, result.dmarc_policy) == ("temperror", "fail", "reject")


@pytest.mark.parametrize(
    "from_header",
    [
        b"From: a@example.test, b@example.test\r\n",
        b"From: a@example.test\r\nFrom: b@example.test\r\n",
        b"",
        b"From: undisclosed:;\r\n",
        b"From: attacker@evil.test <victim@example.test>\r\n",
        b"From: <a@example.test> <b@evil.test>\r\n",
        b"From: a@[192.0.2.1]\r\n",
        b"From: nobody\r\n",
    ],
)
async def test_dmarc_without_exactly_one_author_domain_is_permerror(
    dns_server: DnsServer, from_header: bytes
) -> None:
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    data = from_header + b"Subject: x\r\n\r\nbody\r\n"
    result = await check(dns_server, data)
    assert (result.from_domain, result.dmarc, result.dmarc_policy) == (None, "permerror", "none")


@pytest.mark.parametrize(
    ("from_", "domain"),
    [
        ('"victim@bank.test" <a@example.test>', "example.test"),
        ("a@Example.TEST (comment with b@bank.test)", "example.test"),
        ("=?utf-8?q?x=40bank.test?= <a@example.test>", "example.test"),
        ("a@bücher.test", "xn--bcher-kva.test"),
    ],
)
async def test_author_domain_is_the_address_not_the_display_name(
    dns_server: DnsServer, from_: str, domain: str
) -> None:
    assert (await check(dns_server, message(from_=from_))).from_domain == domain


async def test_from_after_a_garbage_line_is_still_seen(dns_server: DnsServer) -> None:
    data = b"Subject: x\r\n\x00garbage\r\nFrom: a@example.test\r\nFrom: b@bank.test\r\n\r\nbody"
    assert (await check(dns_server, data)).dmarc == "permerror"


# --- Authentication-Results header (RFC 8601) ----------------------------------


async def test_header_golden_all_pass(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", SPF_PASS)
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    publish_key(dns_server)
    result = await check(dns_server, sign(message()))
    assert result.header == (
        "Authentication-Results: mx.runbox.test;\r\n"
        "\tspf=pass smtp.mailfrom=example.test;\r\n"
        "\tdkim=pass header.d=example.test header.s=sel;\r\n"
        "\tdmarc=pass header.from=example.test\r\n"
    )


async def test_header_golden_null_sender_unsigned_no_policy(dns_server: DnsServer) -> None:
    result = await check(dns_server, message(), mail_from="")
    assert result.header == (
        "Authentication-Results: mx.runbox.test;\r\n"
        "\tspf=none smtp.helo=mail.example.test;\r\n"
        "\tdkim=none;\r\n"
        "\tdmarc=none header.from=example.test\r\n"
    )


async def test_header_golden_failures(dns_server: DnsServer) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    publish_key(dns_server, domain="relay.test", selector="s2")
    data = sign(sign(message()), domain="relay.test", selector="s2")
    result = await check(dns_server, data)
    assert result.header == (
        "Authentication-Results: mx.runbox.test;\r\n"
        "\tspf=fail smtp.mailfrom=example.test;\r\n"
        "\tdkim=pass header.d=relay.test header.s=s2;\r\n"
        "\tdkim=permerror header.d=example.test header.s=sel;\r\n"
        "\tdmarc=fail header.from=example.test\r\n"
    )


async def test_header_folds_long_resinfos(dns_server: DnsServer) -> None:
    # dkimpy folds longer d= values inside the name, which breaks its own signature.
    long_domain = ".".join(["a" * 25, "b" * 25, "example.test"])
    long_selector = "s" * 50
    publish_key(dns_server, domain=long_domain, selector=long_selector)
    data = sign(message(from_=f"x@{long_domain}"), domain=long_domain, selector=long_selector)
    result = await check(dns_server, data, mail_from=f"x@{long_domain}")
    lines = result.header.split("\r\n")
    assert lines[-1] == ""
    assert all(line.startswith("\t") for line in lines[1:-1])
    # Each line fits in 78 columns (a tab counts as 8) unless one word alone is longer.
    for line in lines[:-1]:
        assert len(line.expandtabs(8)) <= 78 or " " not in line.strip()
    assert result.dkim == (DkimResult("pass", long_domain, long_selector),)
    assert f"header.d={long_domain}" in result.header
    assert f"header.s={long_selector}" in result.header


SAFE_HEADER = re.compile(r"Authentication-Results: [a-z0-9.;=_ -]+(\r\n\t[a-z0-9.;=_ -]+)*\r\n")


def assert_safe(header: str, resinfos: int = 3) -> None:
    assert SAFE_HEADER.fullmatch(header), header
    assert header.count(";") == resinfos
    assert "injected" not in header.lower()


@pytest.mark.parametrize(
    "data",
    [
        b"From: x@evil.test\rX-Injected: 1\r\n\r\nbody",
        b"From: x@evil.test\r\n X-Injected: 1\r\n\r\nbody",
        b'From: "x@evil.test\r\nX-Injected: 1" <a@example.test>\r\n\r\nbody',
        b"From: =?utf-8?q?x=0D=0AX-Injected=3A_1?= <x@evil;test>\r\n\r\nbody",
        b"From: x@evil.test;dmarc=pass\r\n\r\nbody",
    ],
)
async def test_header_injection_through_from(dns_server: DnsServer, data: bytes) -> None:
    assert_safe((await check(dns_server, data)).header)


@pytest.mark.parametrize(
    "tags",
    [
        b"d=evil .test; s=sel",
        b"d=evil.test\r\n\tX-Injected: 1; s=sel",
        b"d=evil.test; s=sel;dmarc=pass",
        b"d=evil.test; s=a b",
        b'd="evil.test"; s=sel',
        b"d=ev\\il.test; s=sel",
        b"d=evil.test\xc3\xa9\xff; s=sel",
    ],
)
async def test_header_injection_through_dkim_tags(dns_server: DnsServer, tags: bytes) -> None:
    signature = b"DKIM-Signature: v=1; a=rsa-sha256; " + tags + b"; h=from; bh=AAAA; b=AAAA\r\n"
    result = await check(dns_server, signature + message())
    assert_safe(result.header)
    assert result.dkim[0].result == "permerror"


@pytest.mark.parametrize(
    ("mail_from", "helo"), [("a@evil.test;dmarc=pass", HELO), ("", "x;dkim=pass"), ("", "[192.0.2.1]")]
)
async def test_header_injection_through_the_envelope(dns_server: DnsServer, mail_from: str, helo: str) -> None:
    result = await check(dns_server, message(), mail_from=mail_from, helo=helo)
    assert_safe(result.header)
    assert "smtp.mailfrom=" not in result.header and "smtp.helo=" not in result.header


async def test_invalid_authserv_id_is_refused(dns_server: DnsServer) -> None:
    with pytest.raises(ValueError):
        await authenticate_message(
            message(), client_ip=CLIENT_IP, helo=HELO, mail_from=SENDER,
            resolver=dns_server.resolver(), authserv_id="mx; dkim=pass",
        )


# --- never raises -------------------------------------------------------------------

RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}

header_lines = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.builds(lambda v: b"From: " + v, st.binary(max_size=60)),
        st.builds(lambda v: b"DKIM-Signature: v=1; a=rsa-sha256; d=e.test; s=sel; " + v, st.binary(max_size=60)),
        st.sampled_from([b" continued", b"\t", b"", b"\r", b"From x@y Mon Jan  1 00:00:00 2024"]),
    ),
    max_size=8,
)
messages = st.one_of(st.binary(max_size=400), st.builds(lambda lines: b"\r\n".join(lines), header_lines))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=messages)
def test_arbitrary_bytes_never_raise(dns_server: DnsServer, data: bytes) -> None:
    result = asyncio.run(check(dns_server, data))
    assert result.spf in RESULTS and result.dmarc in RESULTS
    assert all(r.result in RESULTS for r in result.dkim)
    assert result.dmarc_policy == "none"
    assert SAFE_HEADER.fullmatch(result.header)
