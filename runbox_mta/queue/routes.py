"""Where mail for a domain goes: configured routes first, then MX (RFC 5321 §5.1).

A `Route` is an ordered list of hops (host name for TLS and logs, address,
port) to try one after the other. Failures are typed like DNS answers:
`RouteTempError` keeps mail queued, `RoutePermError` bounces it.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TypeVar

from runbox_mta.dns import DnsPermError, DnsTempError, Resolver

T = TypeVar("T")


class RouteError(Exception):
    """No hop to try; the message says why without naming the domain."""


class RouteTempError(RouteError):
    """DNS trouble, or MX hosts without addresses: try again later."""


class RoutePermError(RouteError):
    """The domain does not exist or accepts no mail (null MX): bounce."""


@dataclass(frozen=True)
class Hop:
    host: str  # the MX (or route) host name: TLS server name, DANE base name
    address: str  # an IPv4 or IPv6 address
    port: int


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    via: str  # "route" (configured) or "mx"
    # The MX answer (or its denial) was DNSSEC-authenticated: DANE may apply (RFC 7672 §2.2.1).
    authenticated: bool = False


async def resolve_route(domain: str, routes: Mapping[str, str], port: int, resolver: Resolver,
                        rng: random.Random | None = None) -> Route:
    """The hops for `domain`: a configured route (the domain's own, else "*"), else its MX hosts."""
    target = routes.get(domain) or routes.get("*")
    if target:
        host, target_port = split_host_port(target)
        return Route(await _hops(host, target_port, resolver), via="route")
    return await _mx_route(domain, port, resolver, rng or random.Random())


def split_host_port(target: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port" (config.py validated the form)."""
    host, _, port = target.rpartition(":")
    return host.strip("[]").lower(), int(port)


async def _mx_route(domain: str, port: int, resolver: Resolver, rng: random.Random) -> Route:
    answer = await _lookup(resolver.query(domain, "MX"))
    records = [record for record in answer.records if isinstance(record, tuple)]
    if answer.nxdomain:
        raise RoutePermError("the recipient domain does not exist")
    if records == [(0, ".")] or (records and all(host == "." for _, host in records)):
        raise RoutePermError("the recipient domain accepts no mail (null MX, RFC 7505)")  # RFC 7505 §3
    if not records:
        # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX.
        return Route(await _hops(domain, port, resolver), "mx", answer.authenticated)
    hops: list[Hop] = []
    for host in order_mx(records, rng):
        try:
            hops += await _hops(host, port, resolver)
        except RouteError:
            continue  # an MX without addresses: the next one may do
    if not hops:
        raise RouteTempError("no MX host of the recipient domain has an address")
    return Route(tuple(hops), "mx", answer.authenticated)


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """MX hosts by preference, shuffled among equal preferences (RFC 5321 §5.1), without "."."""
    ordered: list[str] = []
    for _, group in groupby(sorted(records), key=lambda record: record[0]):
        hosts = sorted({host for _, host in group if host != "."})
        rng.shuffle(hosts)  # RFC 5321 §5.1: randomise among equal preferences to spread load
        ordered += [host for host in hosts if host not in ordered]
    return ordered


async def _hops(host: str, port: int, resolver: Resolver) -> tuple[Hop, ...]:
    """Hops for one host: an address literal as is, a name through AAAA and A (IPv6 first)."""
    try:
        return (Hop(host, str(ipaddress.ip_address(host)), port),)
    except ValueError:
        pass
    addresses = [*await _lookup(resolver.aaaa(host)), *await _lookup(resolver.a(host))]
    if not addresses:
        raise RouteTempError("a mail host has no address")
    return tuple(Hop(host, address, port) for address in addresses)


async def _lookup(pending: Awaitable[T]) -> T:
    """DNS trouble defers; a question DNS calls invalid (a malformed name) bounces."""
    try:
        return await pending
    except DnsTempError as error:
        raise RouteTempError(f"DNS: {error}") from None
    except DnsPermError as error:
        raise RoutePermError(f"DNS: {error}") from None
