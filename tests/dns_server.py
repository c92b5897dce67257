"""A real DNS responder for tests (our rule: no mock of the resolver).

`DnsServer` answers UDP and TCP on 127.0.0.1, one port for both, from records
a test adds and may change at any time. It runs in its own threads, so async
tests and sync code (pyspf and dkimpy in worker threads) can both use it.

- Unknown names get NXDOMAIN; a name that exists (or has descendants) but
  lacks the asked type gets an empty NOERROR answer (NODATA).
- `servfail(name)` answers SERVFAIL for that name (until `heal(name)`).
- Resolvers cache answers for their TTL (300 s here): a test that changes a
  record after asking for it asks again through a fresh `resolver()`.
- `set_ad(True, zone)` sets the AD bit on answers at and below `zone`.
- UDP answers larger than the client's EDNS size (512 without EDNS, or
  `udp_limit` if set) come back truncated (TC), so clients retry over TCP.
- CNAMEs are followed within the served records.
- `queries` lists (transport, name, type) of every question, in order.

In a test module (tests/conftest.py stays as it is):

    from tests.dns_server import DnsServer, dns_server  # noqa: F401  (pytest fixture)

    async def test_lookup(dns_server: DnsServer) -> None:
        dns_server.add_txt("example.test", "v=spf1 -all")
        assert await dns_server.resolver().txt("example.test") == ["v=spf1 -all"]
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from runbox_mta.dns import Resolver

TTL = 300
_NO_EDNS_UDP_LIMIT = 512  # RFC 1035 §4.2.1
_MAX_CNAME_CHAIN = 8
_POLL_INTERVAL = 0.01  # socketserver's shutdown() waits up to this long


def txt_rdata(value: str | bytes) -> str:
    """Zone-file text of one TXT record: quoted, escaped, split into 255-octet strings."""
    raw = value.encode() if isinstance(value, str) else value
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + "".join(map(_escape, chunk)) + '"' for chunk in chunks)


def _escape(octet: int) -> str:
    if 0x20 <= octet < 0x7F and octet not in b'"\\':
        return chr(octet)
    return f"\\{octet:03d}"


class DnsServer:
    """An authoritative-looking responder for whatever names a test adds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, list[tuple[str, str]]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._ad: dict[dns.name.Name, bool] = {}
        self.udp_limit: int | None = None
        self.queries: list[tuple[str, str, str]] = []
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0

    # --- what a test calls ---------------------------------------------

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolver(self, timeout: float = 2.0) -> Resolver:
        return Resolver((self.nameserver,), timeout=timeout)

    def add(self, name: str, rdtype: str, text: str) -> None:
        """Serve one record, e.g. add("example.test", "MX", "10 mx.example.test.")."""
        dns.rrset.from_text(name, TTL, "IN", rdtype, text)  # fail in the test, not in the server
        with self._lock:
            self._records.setdefault(_name(name), []).append((rdtype.upper(), text))

    def add_txt(self, name: str, value: str | bytes) -> None:
        self.add(name, "TXT", txt_rdata(value))

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(_name(name), None)

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_name(name))

    def heal(self, name: str) -> None:
        """Answer `name` again after `servfail`."""
        with self._lock:
            self._servfail.discard(_name(name))

    def set_ad(self, value: bool, zone: str = ".") -> None:
        with self._lock:
            self._ad[_name(zone)] = value

    # --- lifecycle -----------------------------------------------------

    def start(self) -> None:
        for _ in range(20):  # the UDP port may be taken for TCP: pick again
            udp = _UdpServer(("127.0.0.1", 0), _UdpHandler, self)
            try:
                tcp = _TcpServer(("127.0.0.1", udp.server_address[1]), _TcpHandler, self)
            except OSError:
                udp.server_close()
                continue
            self.port = udp.server_address[1]
            self._servers = [udp, tcp]
            for server in self._servers:
                threading.Thread(
                    target=server.serve_forever, args=(_POLL_INTERVAL,), daemon=True
                ).start()
            return
        raise RuntimeError("no free port for both UDP and TCP")

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- answering -----------------------------------------------------

    def respond(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((transport, question.name.to_text(), rdtype))
            self._fill(response, question.name, rdtype)
        return _wire(query, response, self._udp_limit(query) if transport == "udp" else None)

    def _fill(self, response: dns.message.Message, name: dns.name.Name, rdtype: str) -> None:
        if self._ad_for(name):
            response.flags |= dns.flags.AD
        for _ in range(_MAX_CNAME_CHAIN):
            if name in self._servfail:
                response.answer.clear()
                response.set_rcode(dns.rcode.SERVFAIL)
                return
            records = self._records.get(name, [])
            wanted = [text for kind, text in records if kind == rdtype]
            if wanted:
                response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", rdtype, wanted))
                return
            cname = [text for kind, text in records if kind == "CNAME"]
            if not cname:
                break
            response.answer.append(dns.rrset.from_text_list(name, TTL, "IN", "CNAME", cname))
            name = dns.name.from_text(cname[0])
        if not any(known.is_subdomain(name) for known in self._records):
            response.set_rcode(dns.rcode.NXDOMAIN)

    def _ad_for(self, name: dns.name.Name) -> bool:
        zones = [zone for zone in self._ad if name.is_subdomain(zone)]
        return self._ad[max(zones, key=len)] if zones else False

    def _udp_limit(self, query: dns.message.Message) -> int:
        limit = query.payload if query.edns >= 0 else _NO_EDNS_UDP_LIMIT
        return min(limit, self.udp_limit) if self.udp_limit else limit


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def _wire(query: dns.message.Message, response: dns.message.Message, limit: int | None) -> bytes:
    try:
        return response.to_wire(max_size=limit or 65535)
    except dns.exception.TooBig:
        # RFC 1035 §4.1.1 / RFC 7766 §5: set TC and let the client ask over TCP.
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.AA | dns.flags.TC | (response.flags & dns.flags.AD)
        return truncated.to_wire()


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, dns_server: DnsServer) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, dns_server: DnsServer) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        wire, sock = self.request
        answer = self.server.dns_server.respond(wire, "udp")  # type: ignore[attr-defined]
        if answer is not None:
            sock.sendto(answer, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    # RFC 1035 §4.2.2: each message is preceded by a two-octet length.
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(5)
        try:
            while header := _read_exactly(conn, 2):
                wire = _read_exactly(conn, struct.unpack("!H", header)[0])
                answer = self.server.dns_server.respond(wire, "tcp")  # type: ignore[attr-defined]
                if answer is None:
                    return
                conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A running DnsServer with no records (every name is NXDOMAIN)."""
    with DnsServer() as server:
        yield server
