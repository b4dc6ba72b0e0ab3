"""Hand-built services and snapshots for the DNS proxy's tests, a tiny query builder and a
tiny upstream DNS server."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from common.authz.model import ServiceRef
from common.kube.objects import KubeObject
from common.model import Endpoint, Service, Snapshot
from ztunnel.dns.upstream import receive_exactly
from ztunnel.dns.wire import (
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    RCODE_NXDOMAIN,
    Message,
    Question,
    address_record,
    build,
    name_from_text,
    name_text,
    opt_record,
    parse,
    soa_record,
)


def service(name: str, namespace: str, vips: Iterable[str] = (),
            ready_ips: Iterable[str] = ()) -> Service:
    endpoints = tuple(Endpoint(ip, True) for ip in ready_ips)
    return Service(
        namespace=namespace, name=name, hostname=f"{name}.{namespace}.svc.cluster.local",
        vips=tuple(vips), ports=(), endpoints=endpoints, waypoint=None, labels={},
        waypoint_of=None, ref=ServiceRef(namespace, name), ports_by_number={},
        ready_endpoints=endpoints, ready_by_zone={}, ready_by_region={})


def service_entry(name: str, namespace: str, spec: Mapping[str, Any]) -> KubeObject:
    return KubeObject.model_validate({"apiVersion": "networking.istio.io/v1",
                                      "kind": "ServiceEntry",
                                      "metadata": {"name": name, "namespace": namespace},
                                      "spec": dict(spec)})


def snapshot(services: Iterable[Service], namespaces: Iterable[str] = (), *,
             service_entries: Iterable[KubeObject] = (), version: int = 1) -> Snapshot:
    svcs = list(services)
    by_host: dict[str, Service] = {}
    for s in svcs:
        short = f"{s.name}.{s.namespace}"
        for host in (s.hostname, short, f"{short}.svc"):
            by_host[host] = s
    ns = set(namespaces) | {s.namespace for s in svcs}
    return Snapshot(
        version=version, services_by_key={s.key: s for s in svcs}, services_by_host=by_host,
        services_by_vip={v: s for s in svcs for v in s.vips},
        namespaces={n: {} for n in ns}, service_entries=tuple(service_entries))


def query(name: str, qtype: int, *, msg_id: int = 4242, edns: int | None = None) -> Message:
    additionals = (opt_record(edns),) if edns is not None else ()
    return Message(msg_id, FLAG_RD, (Question(name_from_text(name), qtype),),
                   additionals=additionals)


def query_bytes(name: str, qtype: int, **kw: Any) -> bytes:
    return build(query(name, qtype, **kw))


@dataclass
class FakeUpstream:
    """A tiny authoritative-for-everything server: ``big*`` has 60 A records (truncated over
    UDP), ``nx*`` is NXDOMAIN, ``slow*`` never answers; everything else one A record."""

    udp: trio.socket.SocketType
    tcp: trio.socket.SocketType
    asked: list[tuple[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.udp.getsockname()[:2]
        return (host, port)

    def respond(self, data: bytes, protocol: str) -> bytes | None:
        q = parse(data)
        question = q.questions[0]
        name = name_text(question.name)
        self.asked.append((name, protocol))
        if name.startswith("slow"):
            return None
        flags = FLAG_QR | FLAG_RA | (q.flags & 0x0100)
        if name.startswith("nx"):
            return build(Message(q.id, flags | RCODE_NXDOMAIN, q.questions,
                                 authorities=(soa_record(question.name[-1:], 60, 20),)))
        count = 60 if name.startswith("big") else 1
        answers = tuple(address_record(question.name, f"192.0.2.{i + 1}", 120)
                        for i in range(count))
        wire = build(Message(q.id, flags, q.questions, answers))
        if protocol == "udp" and len(wire) > 512:
            wire = build(Message(q.id, flags | FLAG_TC, q.questions))
        return wire

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_udp)
            while True:
                conn, _ = await self.tcp.accept()
                nursery.start_soon(self._serve_tcp, conn)

    async def _serve_udp(self) -> None:
        while True:
            data, peer = await self.udp.recvfrom(65535)
            self.sources.append(peer[0])
            reply = self.respond(data, "udp")
            if reply is not None:
                await self.udp.sendto(reply, peer)

    async def _serve_tcp(self, conn: trio.socket.SocketType) -> None:
        self.sources.append(conn.getpeername()[0])
        stream = trio.SocketStream(conn)
        async with stream:
            (length,) = struct.unpack("!H", await receive_exactly(stream, 2))
            reply = self.respond(await receive_exactly(stream, length), "tcp")
            if reply is not None:
                await stream.send_all(struct.pack("!H", len(reply)) + reply)
