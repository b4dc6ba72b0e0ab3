"""The DNS proxy over real sockets on 127.0.0.1: UDP and TCP clients, a tiny fake upstream
(UDP and TCP), local answers, forwarding, caching, TCP fallback, SERVFAIL, FORMERR, limits."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from common.model import Workload
from ztunnel.dns.resolver import DnsConfig, Resolver
from ztunnel.dns.server import DnsMetrics, default_upstreams, parse_upstream, serve_dns
from ztunnel.dns.upstream import receive_exactly
from ztunnel.dns.wire import (
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    Message,
    parse,
)

from .dns_helpers import FakeUpstream, query_bytes, service, snapshot
from .ztunnel_helpers import workload

SNAP = snapshot([service("echo", "default", ["10.96.1.1"])])
CLIENT: Workload = workload("client", namespace="default", ip="10.9.9.9")


@dataclass
class Proxy:
    address: tuple[str, int]
    upstream: FakeUpstream
    metrics: DnsMetrics
    registry: CollectorRegistry

    def count(self, protocol: str, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "ztunnel_dns_requests_total", {"protocol": protocol, "outcome": outcome})
        return value or 0.0


def _udp_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a listening TCP socket on the same free port of 127.0.0.1."""
    for _ in range(50):  # a free UDP port may be taken for TCP; try another
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP")


@asynccontextmanager
async def running_proxy(**config: float) -> AsyncIterator[Proxy]:
    up_udp_raw, up_tcp_raw = _udp_tcp_pair()
    up_udp = trio.socket.from_stdlib_socket(up_udp_raw)
    up_tcp = trio.socket.from_stdlib_socket(up_tcp_raw)
    upstream = FakeUpstream(up_udp, up_tcp)
    cfg = DnsConfig(upstreams=(upstream.address,), query_timeout=0.5,
                    **config)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    metrics = DnsMetrics(registry)
    udp, tcp = _udp_tcp_pair()
    with udp, tcp, up_udp, up_tcp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.serve)
            resolver = Resolver(lambda: SNAP, cfg)
            await nursery.start(lambda task_status: serve_dns(
                udp, tcp, resolver, CLIENT, metrics=metrics, task_status=task_status))
            yield Proxy(("127.0.0.1", udp.getsockname()[1]), upstream, metrics, registry)
            nursery.cancel_scope.cancel()


async def udp_ask(address: tuple[str, int], data: bytes) -> Message:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, trio.fail_after(5):
        await sock.connect(address)
        await sock.send(data)
        return parse(await sock.recv(65535))


async def tcp_ask(address: tuple[str, int], *queries: bytes) -> list[Message]:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(b"".join(struct.pack("!H", len(q)) + q for q in queries))
            replies = []
            for _ in queries:
                (length,) = struct.unpack("!H", await receive_exactly(stream, 2))
                replies.append(parse(await receive_exactly(stream, length)))
            return replies


def ips(msg: Message) -> list[str]:
    return [socket.inet_ntoa(r.rdata) for r in msg.answers]


async def test_udp_local_answer_forward_and_cache() -> None:
    async with running_proxy() as proxy:
        local = await udp_ask(proxy.address, query_bytes("echo", TYPE_A, msg_id=11))
        assert local.id == 11 and ips(local) == ["10.96.1.1"]
        junk = await udp_ask(proxy.address, query_bytes(
            "echo.default.svc.cluster.local.default.svc.cluster.local", TYPE_A))
        assert junk.rcode == RCODE_NXDOMAIN
        assert proxy.upstream.asked == []
        first = await udp_ask(proxy.address, query_bytes("example.com", TYPE_A))
        second = await udp_ask(proxy.address, query_bytes("example.com", TYPE_A))
        assert ips(first) == ips(second) == ["192.0.2.1"]
        assert proxy.upstream.asked == [("example.com", "udp")]
        assert proxy.count("udp", "local") == 2
        assert proxy.count("udp", "forwarded") == 1
        assert proxy.count("udp", "cached") == 1


async def test_truncated_upstream_answer_is_fetched_over_tcp_and_client_falls_back() -> None:
    async with running_proxy() as proxy:
        small = await udp_ask(proxy.address, query_bytes("big.example", TYPE_A))
        assert small.flags & FLAG_TC and small.answers == ()
        assert proxy.upstream.asked == [("big.example", "udp"), ("big.example", "tcp")]
        (full,) = await tcp_ask(proxy.address, query_bytes("big.example", TYPE_A))
        assert len(full.answers) == 60 and not full.flags & FLAG_TC
        assert len(proxy.upstream.asked) == 2  # the TCP retry came from the cache


async def test_tcp_pipelined_queries_on_one_connection() -> None:
    async with running_proxy() as proxy:
        replies = await tcp_ask(proxy.address, query_bytes("echo", TYPE_A, msg_id=1),
                                query_bytes("nx.example", TYPE_A, msg_id=2),
                                query_bytes("a.example", TYPE_A, msg_id=3))
        by_id = {r.id: r for r in replies}
        assert ips(by_id[1]) == ["10.96.1.1"]
        assert by_id[2].rcode == RCODE_NXDOMAIN
        assert ips(by_id[3]) == ["192.0.2.1"]
        assert proxy.count("tcp", "local") == 1 and proxy.count("tcp", "forwarded") == 2


async def test_upstream_silence_is_servfail_after_one_retry() -> None:
    async with running_proxy() as proxy:
        start = trio.current_time()
        reply = await udp_ask(proxy.address, query_bytes("slow.example", TYPE_A))
        assert reply.rcode == RCODE_SERVFAIL
        assert 0.9 < trio.current_time() - start < 3
        assert proxy.upstream.asked == [("slow.example", "udp")] * 2
        assert proxy.count("udp", "failed") == 1


async def test_malformed_queries_get_formerr_and_the_server_keeps_serving() -> None:
    async with running_proxy() as proxy:
        garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
        reply = await udp_ask(proxy.address, garbage)
        assert reply.id == 0xABCD and reply.rcode == RCODE_FORMERR
        (tcp_reply,) = await tcp_ask(proxy.address, b"\x00\x01\x01")
        assert tcp_reply.rcode == RCODE_FORMERR
        ok = await udp_ask(proxy.address, query_bytes("echo", TYPE_A))
        assert ok.rcode == RCODE_NOERROR and ips(ok) == ["10.96.1.1"]
        assert proxy.count("udp", "malformed") == 1


async def test_idle_tcp_connections_are_closed() -> None:
    async with running_proxy(tcp_idle_timeout=0.3) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""


async def test_tcp_connections_over_the_limit_are_closed_at_once() -> None:
    async with running_proxy(tcp_max_connections=1) as proxy:
        first = await trio.open_tcp_stream(*proxy.address)
        async with first:
            # The first connection is being served (prove it with a query on it).
            echo = query_bytes("echo", TYPE_A)
            await first.send_all(struct.pack("!H", len(echo)) + echo)
            with trio.fail_after(5):
                await receive_exactly(first, 2)
            second = await trio.open_tcp_stream(*proxy.address)
            async with second:
                with trio.fail_after(5):
                    assert await second.receive_some(10) == b""
        assert proxy.count("tcp", "dropped") == 1


def test_upstream_addresses_from_flags_and_resolv_conf(tmp_path: Path) -> None:
    assert parse_upstream("10.96.0.10") == ("10.96.0.10", 53)
    assert parse_upstream("10.96.0.10:5353") == ("10.96.0.10", 5353)
    assert parse_upstream("[fd00::a]:54") == ("fd00::a", 54)
    assert parse_upstream("fd00::a") == ("fd00::a", 53)
    conf = tmp_path / "resolv.conf"
    conf.write_text("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\noptions ndots:5\n")
    assert default_upstreams(conf) == (("10.96.0.10", 53), ("fe80::1", 53))
    assert default_upstreams(conf.parent / "missing") == ()
