"""Protocol selection at the waypoint, as Istio's waypoint does it (memory streams, no sockets).

Declared service ports skip detection (TCP: pass-through at once, so server-first protocols
work; HTTP: HTTP, however slow the client); undeclared ones are sniffed for up to
``DETECT_TIMEOUT`` (Envoy's listener-filter default, 15 s), then closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from common.authz.compile import PolicyObject, compile_authorization_policies
from tests.unit.waypoint_helpers import FakeBackend, Harness, service
from waypoint.listener import (
    DETECT_TIMEOUT,
    Declared,
    HboneInbound,
    classify,
    declared_protocol,
    serve_stream,
)
from waypoint.proxy import PeerInfo, RouterState

A = "10.1.0.1:8080"
VIP = "10.96.0.5"


@pytest.mark.parametrize(("port", "name", "app_protocol", "transport", "expected"), [
    (80, "http", None, "TCP", Declared.HTTP),
    (80, "http-web", None, "TCP", Declared.HTTP),
    (80, "HTTP2-api", None, "TCP", Declared.HTTP),
    (9090, "grpc", None, "TCP", Declared.HTTP),
    (9090, "grpc-web-ui", None, "TCP", Declared.HTTP),
    (5432, "tcp-postgres", None, "TCP", Declared.TCP),
    (443, "https", None, "TCP", Declared.TCP),
    (6379, "redis", None, "TCP", Declared.TCP),
    (80, "tcp", "http", "TCP", Declared.HTTP),  # appProtocol wins over the name
    (80, "http", "custom", "TCP", None),  # ... also when it names nothing known
    (80, None, "kubernetes.io/h2c", "TCP", Declared.HTTP),
    (443, None, "kubernetes.io/wss", "TCP", Declared.TCP),
    (3306, None, None, "TCP", Declared.TCP),  # well-known server-first port
    (25, "smtp", None, "TCP", Declared.TCP),
    (8080, "web", None, "TCP", None),
    (8080, None, None, "TCP", None),
    (53, "dns", None, "UDP", None),
])
def test_declared_protocol_follows_istio_port_naming(
        port: int, name: str | None, app_protocol: str | None, transport: str,
        expected: str | None) -> None:
    assert declared_protocol(port, name, app_protocol, transport) == expected


def test_on_a_declared_http_port_only_the_h2_preface_needs_more_bytes() -> None:
    assert classify(b"", Declared.HTTP) is None
    assert classify(b"PRI * HT", Declared.HTTP) is None
    assert classify(b"\x16\x03\x01", Declared.HTTP) == "http/1.1"  # the parser answers 400
    assert classify(b"\x16\x03\x01") == "tcp"


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield await Harness(nursery, {"services": [service("echo", A, vip=VIP)]},
                            {A: FakeBackend("a")}).start()
        nursery.cancel_scope.cancel()


class Upstream:
    """A pass-through target on a memory stream that records who dialed it."""

    def __init__(self) -> None:
        self.client, self.server = trio.testing.memory_stream_pair()
        self.dialed: list[tuple[str, int]] = []
        self.called = trio.Event()

    async def __call__(self, destination: str, port: int) -> trio.abc.Stream:
        self.dialed.append((destination, port))
        self.called.set()
        return self.client


async def read_until(stream: trio.abc.Stream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        more = await stream.receive_some(4096)
        if not more:
            break
        data += more
    return data


async def test_a_slow_http_client_on_an_undeclared_port_is_served(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    harness.nursery.start_soon(serve_stream, server, harness.waypoint.proxy,
                               PeerInfo(source_ip="10.0.0.9"), None)
    await trio.sleep(DETECT_TIMEOUT - 1)  # the old 1 s window cut clients like this
    await client.send_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
    with trio.fail_after(5):
        assert (await read_until(client, b"ok")).startswith(b"HTTP/1.1 200")


async def test_a_silent_client_on_an_undeclared_port_is_closed_at_the_detection_timeout(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination=VIP, port=5432)
    started = trio.current_time()
    harness.nursery.start_soon(serve_stream, server, harness.waypoint.proxy, peer, upstream)
    with trio.fail_after(DETECT_TIMEOUT + 5):
        assert await client.receive_some(10) == b""
    assert trio.current_time() - started == pytest.approx(DETECT_TIMEOUT, abs=0.1)
    assert upstream.dialed == []  # neither passed through nor left open


async def test_a_server_first_protocol_on_a_declared_tcp_port_is_passed_through_at_once(
        harness: Harness) -> None:
    upstream = Upstream()
    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination=VIP, port=3306)
    harness.nursery.start_soon(lambda: serve_stream(server, harness.waypoint.proxy, peer,
                                                    upstream, declared=Declared.TCP))
    with trio.fail_after(1):
        await upstream.called.wait()  # dialed before the client said anything
        await upstream.server.send_all(b"\x4a\x00\x00\x00\x0a8.0.36")  # a MySQL greeting
        assert (await read_until(client, b"8.0.36")).endswith(b"8.0.36")
        await client.send_all(b"login")
        assert await upstream.server.receive_some(10) == b"login"
    assert upstream.dialed == [(VIP, 3306)]


async def test_a_declared_tcp_port_is_refused_where_http_policy_applies(
        harness: Harness) -> None:
    policy = PolicyObject("default", "deny-admin", {
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                        "name": "waypoint"}],
        "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]})
    proxy = harness.waypoint.proxy
    state = proxy.state
    proxy.state = RouterState(state.table, state.clusters, state.gateway,
                              compile_authorization_policies([policy]).waypoint)
    upstream = Upstream()
    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination=VIP, port=80)
    harness.nursery.start_soon(lambda: serve_stream(server, proxy, peer, upstream,
                                                    declared=Declared.TCP))
    with trio.fail_after(2):
        assert await client.receive_some(10) == b""
    assert upstream.dialed == []


async def test_a_declared_http_port_waits_for_an_idle_client_and_never_passes_through(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination=VIP, port=80)
    harness.nursery.start_soon(lambda: serve_stream(server, harness.waypoint.proxy, peer,
                                                    upstream, declared=Declared.HTTP))
    await trio.sleep(4 * DETECT_TIMEOUT)  # a pooled connection, idle before its first use
    await client.send_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
    with trio.fail_after(5):
        assert (await read_until(client, b"ok")).startswith(b"HTTP/1.1 200")
    assert upstream.dialed == []


async def test_non_http_on_a_declared_http_port_gets_400_not_pass_through(
        harness: Harness) -> None:
    upstream = Upstream()
    client, server = trio.testing.memory_stream_pair()
    peer = PeerInfo(source_ip="10.0.0.9", destination=VIP, port=80)
    harness.nursery.start_soon(lambda: serve_stream(server, harness.waypoint.proxy, peer,
                                                    upstream, declared=Declared.HTTP))
    await client.send_all(b"\x16\x03\x01\x02\x00\r\n\r\n")  # a TLS ClientHello's start
    with trio.fail_after(5):
        assert (await read_until(client, b"\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert upstream.dialed == []


async def test_a_stalled_h2_preface_on_a_declared_http_port_ends_at_the_header_timeout(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    started = trio.current_time()
    harness.nursery.start_soon(lambda: serve_stream(
        server, harness.waypoint.proxy, PeerInfo(source_ip="10.0.0.9"), None,
        declared=Declared.HTTP))
    await client.send_all(b"PRI * HT")
    with trio.fail_after(120):
        assert await client.receive_some(10) == b""
    assert trio.current_time() - started == pytest.approx(harness.waypoint.timeouts.header,
                                                          abs=0.1)


def test_the_hbone_inbound_reads_the_declared_protocol_of_the_service_port() -> None:
    ports = {80: SimpleNamespace(name="http", app_protocol=None, protocol="TCP"),
             3306: SimpleNamespace(name="db", app_protocol=None, protocol="TCP"),
             9000: SimpleNamespace(name="admin", app_protocol=None, protocol="TCP")}
    snapshot = SimpleNamespace(services_by_vip={VIP: SimpleNamespace(ports_by_number=ports)})
    inbound = HboneInbound(None, lambda: snapshot, None)  # type: ignore[arg-type,return-value]
    assert inbound.declared_for(VIP, 80) == Declared.HTTP
    assert inbound.declared_for(VIP, 3306) == Declared.TCP
    assert inbound.declared_for(VIP, 9000) is None
    assert inbound.declared_for(VIP, 81) is None  # not a port of the Service
    assert inbound.declared_for("10.244.0.7", 80) is None  # a pod IP: sniffed
