"""Cluster DNS for pods outside the mesh: the part of CoreDNS the local cluster needs.

Pure core: :func:`parse_query` and :func:`build_response` speak just enough of the DNS
wire format (RFC 1035) for A/AAAA questions; :func:`service_records` maps
``<svc>.<ns>.svc.cluster.local`` to the Service's clusterIP (headless Services: the
ready endpoint addresses).  Shorter names (``echo``, ``echo.ns``, ``echo.ns.svc``) reach
the server already completed by the resolver, through the search path every pod's
``resolv.conf`` carries.  A name in the cluster domain that does not exist is NXDOMAIN;
an existing name asked for AAAA is an empty NOERROR (so resolvers do not retry); names
outside the cluster domain are NXDOMAIN too, since pods have no route off the machine.

Shell: :class:`DnsServer` answers on UDP and TCP (length-prefixed) sockets handed to it,
which the supervisor opens inside the fabric namespace behind the ``kube-dns`` VIP.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from common.kube import EndpointSlice, Service
from common.logging import get_logger
from deploy.local.endpoints import SERVICE_NAME_LABEL
from deploy.local.informer import Cache
from deploy.local.network import CLUSTER_DOMAIN

log = get_logger("local.dns")

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
TTL = 5  # CoreDNS' kubernetes plugin default: changes show up within seconds
MAX_UDP = 512
_HEADER = struct.Struct("!HHHHHH")


class DnsFormatError(ValueError):
    """A message that is not a DNS query we can parse."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as received, echoed back


def parse_query(data: bytes) -> Query:
    if len(data) < _HEADER.size:
        raise DnsFormatError("shorter than a DNS header")
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(data)
    if flags & 0x8000 or qdcount != 1:
        raise DnsFormatError("not a query with exactly one question")
    labels = []
    pos = _HEADER.size
    while True:
        if pos >= len(data):
            raise DnsFormatError("question name runs past the message")
        length = data[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DnsFormatError("compressed name in a question")
        labels.append(data[pos:pos + length].decode("ascii", errors="replace").lower())
        pos += length
    if pos + 4 > len(data):
        raise DnsFormatError("question has no type and class")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    return Query(qid, flags, ".".join(labels), qtype, qclass, data[_HEADER.size:pos + 4])


def build_response(query: Query, rcode: int, addresses: Iterable[str] = ()) -> bytes:
    """A response to ``query`` with A records for ``addresses`` (name by pointer)."""
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + bytes(
            int(octet) for octet in addr.split("."))
        for addr in addresses)
    count = len(answers) // 16
    # QR, opcode copied, AA, RD copied, RA (we answer everything we are asked about).
    flags = 0x8000 | (query.flags & 0x7800) | 0x0400 | (query.flags & 0x0100) | 0x0080 | rcode
    return _HEADER.pack(query.id, flags, 1, count, 0, 0) + query.question + answers


def formerr(data: bytes) -> bytes | None:
    """FORMERR for an unparseable message that at least has an id; None if not even that."""
    if len(data) < 2:
        return None
    return _HEADER.pack(struct.unpack_from("!H", data)[0], 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)


def service_records(services: Iterable[Service], slices: Iterable[EndpointSlice],
                    domain: str = CLUSTER_DOMAIN) -> dict[str, list[str]]:
    """FQDN (no trailing dot) -> IPv4 addresses, for every Service."""
    ready: dict[tuple[str, str], list[str]] = {}
    for sl in slices:
        name = sl.metadata.labels.get(SERVICE_NAME_LABEL)
        if name:
            ready.setdefault((sl.metadata.namespace or "", name), []).extend(
                a for ep in sl.endpoints if ep.conditions.ready is not False
                for a in ep.addresses)
    records: dict[str, list[str]] = {}
    for svc in services:
        ns = svc.metadata.namespace or ""
        fqdn = f"{svc.metadata.name}.{ns}.svc.{domain}"
        ip = svc.spec.cluster_ip
        if ip and ip != "None":
            records[fqdn] = [ip]
        elif ip == "None":
            records[fqdn] = sorted(set(ready.get((ns, svc.metadata.name), [])))
    return records


def answer(data: bytes, records: dict[str, list[str]], max_size: int = 65535) -> bytes | None:
    """The whole server: response bytes for request bytes (None: drop silently).

    A response over ``max_size`` goes out without answers and with TC set, so the
    resolver asks again over TCP.
    """
    try:
        query = parse_query(data)
    except DnsFormatError:
        return formerr(data)
    if (query.flags >> 11) & 0xF != 0 or query.qclass != CLASS_IN:
        return build_response(query, RCODE_NOTIMP)
    addresses = records.get(query.name)
    if addresses is None:
        return build_response(query, RCODE_NXDOMAIN)
    reply = build_response(query, RCODE_OK, addresses if query.qtype == TYPE_A else ())
    if len(reply) > max_size:
        reply = build_response(query, RCODE_OK)
        reply = reply[:2] + bytes([reply[2] | 0x02]) + reply[3:]
    return reply


class DnsServer:
    """Answers from the current Services; records are rebuilt when the caches change."""

    def __init__(self, services: Cache[Service], slices: Cache[EndpointSlice]) -> None:
        self.services = services
        self.slices = slices
        self.records: dict[str, list[str]] = {}
        self.synced = trio.Event()  # set once records were built from synced caches

    async def reconcile(self) -> None:
        await self.services.synced.wait()
        await self.slices.synced.wait()
        self.records = service_records(self.services.values(), self.slices.values())
        self.synced.set()

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, peer = await sock.recvfrom(4096)
            reply = answer(data, self.records, MAX_UDP)
            if reply is not None:
                await sock.sendto(reply, peer)

    async def serve_tcp(self, listener: trio.SocketListener) -> None:
        await trio.serve_listeners(self._tcp_connection, [listener])

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            with trio.move_on_after(10):
                while True:
                    while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            return
                        buf += chunk
                    size = struct.unpack_from("!H", buf)[0]
                    message, buf = buf[2:2 + size], buf[2 + size:]
                    reply = answer(message, self.records)
                    if reply is None:
                        return
                    await stream.send_all(struct.pack("!H", len(reply)) + reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()
