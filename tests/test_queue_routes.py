"""Route resolution (RFC 5321 §5.1, RFC 7505) against the real DNS responder, and back-off."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from runbox_mta.config import OutboundConfig
from runbox_mta.queue.routes import Hop, RoutePermError, RouteTempError, order_mx, resolve_route, split_host_port
from runbox_mta.queue.scheduler import JITTER_LOW, retry_delay
from tests.dns_server import DnsServer, dns_server  # noqa: F401  (fixture)

NO_ROUTES: MappingProxyType[str, str] = MappingProxyType({})


def test_mx_order_is_by_preference_and_random_among_equals() -> None:
    records = [(20, "c.test"), (10, "b.test"), (10, "a.test"), (30, "."), (20, "b.test")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(40)}
    assert orders == {("a.test", "b.test", "c.test"), ("b.test", "a.test", "c.test")}


async def test_mx_hosts_with_ipv6_first_then_ipv4(dns_server: DnsServer) -> None:
    dns_server.add("remote.test", "MX", "20 mx2.remote.test.")
    dns_server.add("remote.test", "MX", "10 mx1.remote.test.")
    dns_server.add("mx1.remote.test", "AAAA", "::1")
    dns_server.add("mx1.remote.test", "A", "127.0.0.1")
    dns_server.add("mx2.remote.test", "A", "127.0.0.2")
    route = await resolve_route("remote.test", NO_ROUTES, 2525, dns_server.resolver())
    assert route.via == "mx" and route.hops == (
        Hop("mx1.remote.test", "::1", 2525), Hop("mx1.remote.test", "127.0.0.1", 2525),
        Hop("mx2.remote.test", "127.0.0.2", 2525))


async def test_an_mx_without_addresses_is_skipped(dns_server: DnsServer) -> None:
    dns_server.add("remote.test", "MX", "10 gone.remote.test.")
    dns_server.add("remote.test", "MX", "20 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.0.0.1")
    route = await resolve_route("remote.test", NO_ROUTES, 25, dns_server.resolver())
    assert route.hops == (Hop("mx.remote.test", "127.0.0.1", 25),)


async def test_no_mx_falls_back_to_the_domains_own_addresses(dns_server: DnsServer) -> None:
    dns_server.add("remote.test", "A", "127.0.0.3")
    route = await resolve_route("remote.test", NO_ROUTES, 25, dns_server.resolver())
    assert route.hops == (Hop("remote.test", "127.0.0.3", 25),)


@pytest.mark.parametrize("setup, error, message", [
    (lambda d: d.add("remote.test", "MX", "0 ."), RoutePermError, "null MX"),
    (lambda d: None, RoutePermError, "does not exist"),
    (lambda d: d.servfail("remote.test"), RouteTempError, "DNS"),
    (lambda d: d.add("remote.test", "MX", "10 nowhere.remote.test."), RouteTempError, "no MX host"),
])
async def test_route_failures_are_typed(dns_server: DnsServer, setup, error, message) -> None:  # type: ignore[no-untyped-def]
    setup(dns_server)
    with pytest.raises(error, match=message):
        await resolve_route("remote.test", NO_ROUTES, 25, dns_server.resolver())


async def test_configured_routes_win_over_mx(dns_server: DnsServer) -> None:
    dns_server.add("relay.test", "A", "127.0.0.9")
    routes = MappingProxyType({"remote.test": "[::1]:2600", "*": "relay.test:587"})
    resolver = dns_server.resolver()
    assert (await resolve_route("remote.test", routes, 25, resolver)).hops == (Hop("::1", "::1", 2600),)
    other = await resolve_route("other.test", routes, 25, resolver)
    assert other.via == "route" and other.hops == (Hop("relay.test", "127.0.0.9", 587),)
    assert split_host_port("[2001:db8::1]:25") == ("2001:db8::1", 25)


def test_back_off_is_exponential_capped_and_jittered() -> None:
    outbound = OutboundConfig(retry_base=300.0, retry_max=3600.0)
    rng = random.Random(1)
    for attempts, full in [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (50, 3600)]:
        delays = {retry_delay(attempts, outbound, rng) for _ in range(20)}
        assert all(full * JITTER_LOW <= delay <= full for delay in delays) and len(delays) > 1
