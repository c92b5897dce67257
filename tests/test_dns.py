"""The Resolver against a real DNS responder on 127.0.0.1 (tests/dns_server.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import pytest

from runbox_mta.dns import Answer, DnsPermError, DnsTempError, Resolver, TlsaRecord, parse_nameserver
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (pytest fixture)

DIGEST = "ab" * 32


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    return dns_server.resolver()


# --- answers ------------------------------------------------------------------


async def test_txt_joins_the_strings_of_each_record(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "TXT", '"v=spf1 " "ip4:127.0.0.1 -all"')
    dns_server.add("example.test", "TXT", '"second"')
    assert sorted(await resolver.txt("example.test")) == ["second", "v=spf1 ip4:127.0.0.1 -all"]


async def test_txt_with_bytes_that_are_not_utf8_still_answers(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add_txt("example.test", b"v=DMARC1; rua=\xff")
    assert await resolver.txt("example.test") == ["v=DMARC1; rua=\ufffd"]


async def test_mx_a_aaaa(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "10 MX1.example.test.")
    dns_server.add("example.test", "MX", "20 mx2.example.test.")
    dns_server.add("mx1.example.test", "A", "192.0.2.1")
    dns_server.add("mx1.example.test", "AAAA", "2001:db8::1")
    assert sorted(await resolver.mx("example.test")) == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert await resolver.a("mx1.example.test") == ["192.0.2.1"]
    assert await resolver.aaaa("mx1.example.test") == ["2001:db8::1"]


async def test_null_mx_reads_as_the_root(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "0 .")
    assert await resolver.mx("example.test") == [(0, ".")]


async def test_cname_is_followed(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("alias.example.test", "CNAME", "host.example.test.")
    dns_server.add("host.example.test", "A", "192.0.2.7")
    assert await resolver.a("alias.example.test") == ["192.0.2.7"]


async def test_ptr_for_ipv4_and_ipv6(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("7.2.0.192.in-addr.arpa", "PTR", "host.example.test.")
    dns_server.add("1." + "0." * 23 + "8.b.d.0.1.0.0.2.ip6.arpa", "PTR", "v6.example.test.")
    assert await resolver.ptr("192.0.2.7") == ["host.example.test"]
    assert await resolver.ptr("2001:db8::1") == ["v6.example.test"]
    with pytest.raises(DnsPermError):
        await resolver.ptr("not-an-address")


async def test_tlsa_records(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_25._tcp.mx.example.test", "TLSA", f"3 1 1 {DIGEST}")
    records, authenticated = await resolver.tlsa("_25._tcp.mx.example.test")
    assert records == [TlsaRecord(usage=3, selector=1, mtype=1, data=bytes.fromhex(DIGEST))]
    assert authenticated is False


async def test_ad_bit_is_reported_only_when_the_resolver_sets_it(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_25._tcp.mx.secure.test", "TLSA", f"3 1 1 {DIGEST}")
    dns_server.add("_25._tcp.mx.insecure.test", "TLSA", f"3 1 1 {DIGEST}")
    dns_server.set_ad(True, zone="secure.test")
    assert (await resolver.tlsa("_25._tcp.mx.secure.test"))[1] is True
    assert (await resolver.tlsa("_25._tcp.mx.insecure.test"))[1] is False
    dns_server.set_ad(False, zone="secure.test")
    fresh = dns_server.resolver()  # `resolver` holds the authenticated answer for its TTL
    assert (await fresh.tlsa("_25._tcp.mx.secure.test"))[1] is False


async def test_queries_ask_for_dnssec(dns_server: DnsServer, resolver: Resolver) -> None:
    captured = []
    respond = dns_server.respond

    def spy(wire: bytes, transport: str) -> bytes | None:
        captured.append(wire)
        return respond(wire, transport)

    dns_server.respond = spy  # type: ignore[method-assign]
    await resolver.query("example.test", "A")
    query = dns.message.from_wire(captured[0])
    assert query.flags & dns.flags.AD and query.ednsflags & dns.flags.DO


async def test_sync_twin_uses_the_same_nameservers(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    assert resolver.sync_txt("example.test") == await resolver.txt("example.test") == ["v=spf1 -all"]
    assert resolver.sync_query("example.test", "A") == await resolver.query("example.test", "A")


# --- the cache --------------------------------------------------------------------


async def test_answers_are_cached_for_their_ttl_and_shared_with_the_sync_twin(
    dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.add_txt("example.test", "v=spf1 -all")
    assert await resolver.txt("example.test") == ["v=spf1 -all"]
    assert await resolver.txt("example.test") == ["v=spf1 -all"]
    assert resolver.sync_txt("example.test") == ["v=spf1 -all"]
    assert len(dns_server.queries) == 1
    await resolver.query("example.test", "MX")  # another type is another question
    assert len(dns_server.queries) == 2


async def test_nxdomain_is_cached_too(dns_server: DnsServer, resolver: Resolver) -> None:
    assert (await resolver.query("missing.example.test", "TXT")).nxdomain
    assert (await resolver.query("missing.example.test", "TXT")).nxdomain
    assert len(dns_server.queries) == 1


async def test_failures_are_not_cached(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.servfail("flaky.example.test")
    with pytest.raises(DnsTempError):
        await resolver.txt("flaky.example.test")
    dns_server.heal("flaky.example.test")
    dns_server.add_txt("flaky.example.test", "v=spf1 -all")
    assert await resolver.txt("flaky.example.test") == ["v=spf1 -all"]


# --- no records vs. failures ------------------------------------------------------


async def test_nxdomain_and_nodata_are_empty_but_distinguishable(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    assert await resolver.query("missing.example.test", "A") == Answer((), nxdomain=True)
    assert await resolver.query("host.example.test", "TXT") == Answer((), nxdomain=False)
    # An empty non-terminal exists: NODATA, not NXDOMAIN.
    assert (await resolver.query("example.test", "TXT")).nxdomain is False
    assert await resolver.txt("missing.example.test") == []


async def test_servfail_is_a_temporary_error(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.servfail("broken.example.test")
    with pytest.raises(DnsTempError):
        await resolver.txt("broken.example.test")
    with pytest.raises(DnsTempError):
        resolver.sync_txt("broken.example.test")


async def test_errors_do_not_name_the_domain(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.servfail("private.example.test")
    with pytest.raises(DnsTempError) as error:
        await resolver.txt("private.example.test")
    assert "private" not in str(error.value)


@pytest.mark.parametrize("name", ["a..example.test", "x" * 64 + ".test", "", ".", ("a" * 60 + ".") * 5])
async def test_malformed_names_are_permanent_errors(resolver: Resolver, name: str) -> None:
    with pytest.raises(DnsPermError):
        await resolver.txt(name)
    with pytest.raises(DnsPermError):
        resolver.sync_query(name, "TXT")


@pytest.mark.parametrize("rdtype", ["NS", "ANY", "BOGUS"])
async def test_unsupported_types_are_permanent_errors(resolver: Resolver, rdtype: str) -> None:
    with pytest.raises(DnsPermError):
        await resolver.query("example.test", rdtype)


@pytest.fixture
def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port that receives queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("port_fixture", ["closed_port", "silent_port"])
async def test_unreachable_nameserver_fails_within_the_timeout(
    request: pytest.FixtureRequest, port_fixture: str
) -> None:
    port = request.getfixturevalue(port_fixture)
    resolver = Resolver((f"127.0.0.1:{port}",), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        await resolver.txt("example.test")
    # dnspython sleeps a 0.1 s back-off before it notices the lifetime is over.
    assert time.monotonic() - started < 0.5 + 0.25
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        resolver.sync_txt("example.test")
    assert time.monotonic() - started < 0.5 + 0.25


# --- transport --------------------------------------------------------------------


async def test_truncated_answers_are_retried_over_tcp(dns_server: DnsServer, resolver: Resolver) -> None:
    long_record = "v=spf1 " + " ".join(f"ip4:192.0.2.{n}" for n in range(150)) + " -all"
    assert len(long_record) > 2000
    dns_server.add_txt("big.example.test", long_record)
    assert await resolver.txt("big.example.test") == [long_record]
    assert dns_server.resolver().sync_txt("big.example.test") == [long_record]
    assert [transport for transport, *_ in dns_server.queries] == ["udp", "tcp", "udp", "tcp"]


async def test_tcp_fallback_above_512_bytes_from_a_server_that_ignores_edns(
    dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.udp_limit = 512
    dns_server.add_txt("medium.example.test", "x" * 600)
    assert await resolver.txt("medium.example.test") == ["x" * 600]
    assert [transport for transport, *_ in dns_server.queries] == ["udp", "tcp"]


# --- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        (" 192.0.2.1:53 ", ("192.0.2.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("[2001:DB8::53]:8053", ("2001:db8::53", 8053)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize(
    "entry", ["dns.example.test", "dns.example.test:53", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x",
              "[::1", "[::1]x", "[::1]:", "::1:53x", ""],
)
def test_parse_nameserver_refuses(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(entry)


def test_resolver_accepts_ipv6_nameservers_and_refuses_bad_timeouts() -> None:
    Resolver(("[::1]:5353", "127.0.0.1"), timeout=1.0)
    with pytest.raises(ValueError):
        Resolver(timeout=0)


async def test_first_nameserver_down_second_answers(dns_server: DnsServer, closed_port: int) -> None:
    dns_server.add("host.example.test", "A", "192.0.2.1")
    resolver = Resolver((f"127.0.0.1:{closed_port}", dns_server.nameserver), timeout=1.0)
    assert await resolver.a("host.example.test") == ["192.0.2.1"]
