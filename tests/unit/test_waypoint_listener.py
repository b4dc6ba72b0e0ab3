"""Protocol detection and the inbound shells (memory streams, no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from common.authz.compile import PolicyObject, compile_authorization_policies
from tests.unit.waypoint_helpers import FakeBackend, Harness, service
from waypoint import listener
from waypoint.listener import Detected, classify, serve_stream
from waypoint.proxy import PeerInfo, RouterState

A = "10.1.0.1:8080"


@pytest.mark.parametrize(("data", "kind"), [
    (b"GET / HTTP/1.1\r\n", Detected.HTTP1),
    (b"POST ", Detected.HTTP1),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Detected.HTTP2),
    (b"PRI * HTTP/2.0\r\n", None),
    (b"GE", None),
    (b"\x16\x03\x01\x02\x00", Detected.TCP),
    (b"SSH-2.0-OpenSSH_9.2\r\n", Detected.TCP),
    (b"a" * 30, Detected.TCP),
])
def test_classify_by_first_bytes(data: bytes, kind: str | None) -> None:
    assert classify(data) == kind


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_http1_is_served_by_the_pipeline(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await Harness(nursery, {"services": [service("echo", A)]}, {A: backend}).start()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_stream, server, h.waypoint.proxy, PeerInfo(source_ip="10.0.0.9"),
                       None)
    await client.send_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
    data = b""
    with trio.fail_after(2):
        while b"ok" not in data:
            data += await client.receive_some(4096)
    assert data.startswith(b"HTTP/1.1 200")


async def test_http2_preface_goes_to_the_h2_hook(nursery: trio.Nursery,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    h = await Harness(nursery, {"services": [service("echo", A)]}, {A: FakeBackend("a")}).start()
    got: list[bytes] = []

    async def hook(stream: trio.abc.Stream, proxy: object, peer: PeerInfo,
                   initial: bytes) -> None:
        got.append(initial)

    monkeypatch.setattr(listener, "h2_handler", hook)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_stream, server, h.waypoint.proxy, PeerInfo(source_ip="10.0.0.9"),
                       None)
    await client.send_all(listener.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    with trio.fail_after(2):
        assert await client.receive_some(10) == b""  # served by the hook, then closed
    assert got and got[0].startswith(listener.H2_PREFACE)


async def test_other_protocols_pass_through_to_the_original_destination(
        nursery: trio.Nursery) -> None:
    h = await Harness(nursery, {"services": [service("echo", A)]}, {A: FakeBackend("a")}).start()
    upstream_client, upstream_server = trio.testing.memory_stream_pair()
    dialed: list[tuple[str, int]] = []

    async def passthrough(destination: str, port: int) -> trio.abc.Stream:
        dialed.append((destination, port))
        return upstream_client

    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination="10.96.0.5", port=5432)
    nursery.start_soon(serve_stream, server, h.waypoint.proxy, peer, passthrough)
    await client.send_all(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # a Postgres SSLRequest
    with trio.fail_after(2):
        got = b""
        while len(got) < 8:
            got += await upstream_server.receive_some(4096)
        await upstream_server.send_all(b"N")
        assert await client.receive_some(10) == b"N"
    assert got == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert dialed == [("10.96.0.5", 5432)]


async def test_non_http_is_refused_where_the_waypoint_enforces_http_policy(
        nursery: trio.Nursery) -> None:
    h = await Harness(nursery, {"services": [service("echo", A, vip="10.96.0.5")]},
                      {A: FakeBackend("a")}).start()
    policy = PolicyObject("default", "deny-admin", {
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                        "name": "waypoint"}],
        "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]})
    state = h.waypoint.proxy.state
    h.waypoint.proxy.state = RouterState(state.table, state.clusters, state.gateway,
                                         compile_authorization_policies([policy]).waypoint)
    dialed: list[tuple[str, int]] = []

    async def passthrough(destination: str, port: int) -> trio.abc.Stream:
        dialed.append((destination, port))
        raise AssertionError("must not dial")

    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination="10.96.0.5", port=80)
    nursery.start_soon(serve_stream, server, h.waypoint.proxy, peer, passthrough)
    await client.send_all(b"\x16\x03\x01\x02\x00")  # TLS, not HTTP: policy can't see it
    with trio.fail_after(2):
        assert await client.receive_some(10) == b""  # closed
    assert dialed == []


async def test_sniff_reports_a_silent_client_as_tcp_without_bytes_at_its_timeout() -> None:
    # serve_stream then closes it on an undeclared port, passes it through on a TCP one.
    async with trio.open_nursery() as nursery:
        clock_start = trio.current_time()
        kind, data = await listener.sniff(trio.testing.memory_stream_pair()[1], timeout=0.05)
        assert (kind, data) == (Detected.TCP, b"")
        assert trio.current_time() - clock_start >= 0.05
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("forwarded", "source"), [
    ('for="10.0.0.7:41000"', "10.0.0.7"),
    ('for="[fd00::7]:41000"', "fd00::7"),
    ("for=10.0.0.8", "10.0.0.8"),
])
def test_hbone_peer_takes_the_client_from_forwarded(forwarded: str, source: str) -> None:
    from common.hbone.request import parse_request
    from common.identity import SpiffeId
    from common.model import empty_snapshot
    from waypoint.listener import HboneInbound

    identity = SpiffeId("cluster.local", "default", "sleep")
    request = parse_request(1, [(b":method", b"CONNECT"), (b":authority", b"10.96.0.3:9080"),
                                (b"forwarded", forwarded.encode())],
                            peer_identity=identity, peer_address=("10.244.1.1", 50000))
    inbound = HboneInbound(None, empty_snapshot, None)  # type: ignore[arg-type]
    peer = inbound.peer_for(request)
    assert peer.source_ip == source
    assert (peer.destination, peer.port, peer.identity) == ("10.96.0.3", 9080, identity)
    assert peer.source_namespace == "default"
