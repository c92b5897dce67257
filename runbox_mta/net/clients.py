"""Who a client is, for limits: one key per host, not per address."""

from __future__ import annotations

import ipaddress


def address_key(client_address: str) -> str:
    """An IPv4 address as is, an IPv6 address by its /64 prefix (one host usually owns a whole /64)."""
    try:
        ip = ipaddress.ip_address(client_address)
    except ValueError:
        return client_address  # not an IP (a Unix socket, a test peer): as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # "::ffff:192.0.2.1" from a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
