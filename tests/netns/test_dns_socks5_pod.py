"""The DNS proxy and SOCKS5 listener as per-pod hooks of a real in-process ztunnel, in netns pods.

Pods (network namespaces on one bridge): ``client`` is captured (its DNS to port 53 is
redirected to 15053 by the capture rules), ``dns`` runs a tiny upstream DNS server on :53
(the stand-in for the cluster DNS) and ``server`` runs the echo app; neither is in the mesh.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing

from common.authz.model import ServiceRef
from common.ca import CertificateAuthority
from common.discovery import SnapshotHolder
from common.model import Endpoint, Service, ServicePort, Snapshot, Workload
from common.netns import call_in_netns
from tests.netns.ztunnel_support import EchoApp, PodNs, pod_network, snapshot, workload
from tests.unit.dns_helpers import FakeUpstream, query_bytes
from ztunnel.certs import NodeIssuer
from ztunnel.dns.resolver import DnsConfig
from ztunnel.dns.server import DnsService
from ztunnel.dns.upstream import receive_exactly
from ztunnel.dns.wire import RCODE_NXDOMAIN, TYPE_A, Message, parse
from ztunnel.inpod.agent import InpodAgent
from ztunnel.proxy.state import ProxyConfig, ProxyState
from ztunnel.socks5 import socks5_pod_hook

pytestmark = pytest.mark.netns

VIP = "10.96.5.5"


@pytest.fixture
def pods() -> Iterator[dict[str, PodNs]]:
    with pod_network(["client", "dns", "server"]) as pods:
        yield pods


def web_service(server: Workload) -> Service:
    port = ServicePort(80, 8080)
    endpoint = Endpoint(server.ips[0], True, server.uid, server.node, target_ports={80: 8080})
    return Service(
        namespace="default", name="web", hostname="web.default.svc.cluster.local",
        vips=(VIP,), ports=(port,), endpoints=(endpoint,), waypoint=None, labels={},
        waypoint_of=None, ref=ServiceRef("default", "web"), ports_by_number={80: port},
        ready_endpoints=(endpoint,), ready_by_zone={}, ready_by_region={})


def mesh_snapshot(pods: dict[str, PodNs]) -> Snapshot:
    client = workload(pods["client"], name="client", namespace="default")
    dns = workload(pods["dns"], name="coredns", namespace="kube-system", captured=False)
    server = workload(pods["server"], name="web", namespace="default", captured=False)
    base = snapshot(1, [client, dns, server])
    web = web_service(server)
    by_host = {web.hostname: web, "web.default": web, "web.default.svc": web}
    return Snapshot(
        version=1, workloads_by_ip=base.workloads_by_ip, workloads_by_uid=base.workloads_by_uid,
        workloads_by_node=base.workloads_by_node, services_by_vip={VIP: web},
        services_by_host=by_host, services_by_key={web.key: web},
        namespaces={"default": {}, "kube-system": {}})


def _bound_in(pod: PodNs, kind: socket.SocketKind, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        sock.setblocking(False)
        return sock
    return call_in_netns(pod.path, make)


def _socket_in(pod: PodNs, kind: socket.SocketKind) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(
        call_in_netns(pod.path, partial(socket.socket, socket.AF_INET, kind)))


async def udp_query(pod: PodNs, server: tuple[str, int], data: bytes) -> Message:
    sock = _socket_in(pod, socket.SOCK_DGRAM)
    with sock:
        await sock.connect(server)
        for _ in range(20):  # UDP: a lost datagram is retried, as a stub resolver does
            await sock.send(data)
            with trio.move_on_after(0.5):
                return parse(await sock.recv(65535))
    raise AssertionError("no DNS answer")


async def tcp_query(pod: PodNs, server: tuple[str, int], data: bytes) -> Message:
    sock = _socket_in(pod, socket.SOCK_STREAM)
    await sock.connect(server)
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(struct.pack("!H", len(data)) + data)
        (length,) = struct.unpack("!H", await receive_exactly(stream, 2))
        return parse(await receive_exactly(stream, length))


def ips(msg: Message) -> list[str]:
    return [socket.inet_ntoa(r.rdata) for r in msg.answers]


async def test_captured_dns_is_answered_by_the_proxy_and_socks5_reaches_a_service(
        pods: dict[str, PodNs]) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    snap = mesh_snapshot(pods)
    holder = SnapshotHolder()
    issuer = NodeIssuer(ca, "node1", lambda: holder.current)
    state = ProxyState("node1", holder, issuer.store(), config=ProxyConfig(connect_timeout=2.0))
    dns_addr = (pods["dns"].ip, 53)
    dns = DnsService(DnsConfig(upstreams=(dns_addr,), query_timeout=1.0))
    agent = InpodAgent(state, hooks=[dns.serve_pod, socks5_pod_hook(dns.resolver_for)])
    upstream = FakeUpstream(
        trio.socket.from_stdlib_socket(_bound_in(pods["dns"], socket.SOCK_DGRAM, 53)),
        trio.socket.from_stdlib_socket(_bound_in(pods["dns"], socket.SOCK_STREAM, 53)))
    app = EchoApp(pods["server"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.serve)
            await nursery.start(app.serve)
            await nursery.start(agent.run)
            async with trio.open_nursery() as publishing:  # until the capture is installed
                publishing.start_soon(agent.wait_reconciled)
                await trio.lowlevel.checkpoint()
                holder.publish(snap)
            await trio.testing.wait_all_tasks_blocked()  # the hooks opened their listeners
            assert {"dns", "socks5"} <= agent.pods()[0].listen_ports.keys()

            # A cluster name, asked of "the cluster DNS" (port 53): the capture rules hand it
            # to the proxy, which answers without asking upstream.
            local = await udp_query(pods["client"], dns_addr, query_bytes("web", TYPE_A))
            assert ips(local) == [VIP]
            junk = await udp_query(pods["client"], dns_addr, query_bytes(
                "web.default.svc.cluster.local.default.svc.cluster.local", TYPE_A))
            assert junk.rcode == RCODE_NXDOMAIN
            assert upstream.asked == []
            # Anything else is forwarded from the pod's own address, marked so that it is
            # not captured again, and cached.
            forwarded = await udp_query(pods["client"], dns_addr,
                                        query_bytes("example.com", TYPE_A))
            assert ips(forwarded) == ["192.0.2.1"]
            over_tcp = await tcp_query(pods["client"], dns_addr,
                                       query_bytes("example.com", TYPE_A))
            assert ips(over_tcp) == ["192.0.2.1"]
            assert upstream.asked == [("example.com", "udp")]
            assert upstream.sources == [pods["client"].ip]

            # SOCKS5 on the pod's loopback: CONNECT web:80 by name reaches the echo app
            # (outside the mesh: plain TCP from the pod, so it sees the pod's address).
            sock = _socket_in(pods["client"], socket.SOCK_STREAM)
            await sock.connect(("127.0.0.1", 15080))
            stream = trio.SocketStream(sock)
            async with stream:
                await stream.send_all(b"\x05\x01\x00")
                assert await receive_exactly(stream, 2) == b"\x05\x00"
                await stream.send_all(b"\x05\x01\x00\x03\x03web" + struct.pack("!H", 80))
                assert (await receive_exactly(stream, 10))[1] == 0
                greeting = f"from {pods['client'].ip}\n".encode()
                assert await receive_exactly(stream, len(greeting)) == greeting
                await stream.send_all(b"hello")
                assert await receive_exactly(stream, 5) == b"hello"
            nursery.cancel_scope.cancel()
    metrics = state.metrics.registry
    assert metrics.get_sample_value("ztunnel_dns_requests_total",
                                    {"protocol": "udp", "outcome": "local"}) == 2
    assert metrics.get_sample_value("ztunnel_dns_requests_total",
                                    {"protocol": "tcp", "outcome": "cached"}) == 1
    assert metrics.get_sample_value("istio_tcp_connections_opened_total", {
        "reporter": "source", "source_workload": "client", "destination_workload": "web",
        "source_workload_namespace": "default", "destination_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/default",
        "destination_service": "web.default.svc.cluster.local",
        "destination_principal": "unknown", "security_policy": "unknown",
        "response_flags": "-"}) == 1


async def socks5_connect(pod: PodNs, dst: tuple[str, int]) -> tuple[trio.SocketStream, int]:
    """A SOCKS5 CONNECT by IPv4 from inside ``pod``; the stream and the reply code."""
    sock = _socket_in(pod, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", 15080))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"\x05\x01\x00")
    assert await receive_exactly(stream, 2) == b"\x05\x00"
    await stream.send_all(b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) +
                          struct.pack("!H", dst[1]))
    head = await receive_exactly(stream, 10)
    return stream, head[1]


async def test_socks5_to_a_meshed_pod_goes_over_hbone_and_policy_denial_is_reply_2(
        pods: dict[str, PodNs]) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    client = workload(pods["client"], name="sleep", namespace="client", sa="sleep",
                      node="node1")
    server = workload(pods["server"], name="echo", namespace="server", sa="echo", node="node2")
    holder = SnapshotHolder()
    agents = {}
    states = {}
    for node in ("node1", "node2"):
        issuer = NodeIssuer(ca, node, lambda: holder.current)
        states[node] = ProxyState(node, holder, issuer.store(),
                                  config=ProxyConfig(connect_timeout=2.0))
        dns = DnsService(DnsConfig(upstreams=()))
        agents[node] = InpodAgent(states[node], hooks=[socks5_pod_hook(dns.resolver_for)])
    app = EchoApp(pods["server"])
    deny = ("server", "deny-client", {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["client"]}}]}]})

    async def publish(snap: Snapshot) -> None:
        async with trio.open_nursery() as publishing:  # until every node reconciled it
            for agent in agents.values():
                publishing.start_soon(agent.wait_reconciled)
            await trio.lowlevel.checkpoint()
            holder.publish(snap)
        await trio.testing.wait_all_tasks_blocked()  # the hooks opened their listeners

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            for agent in agents.values():
                await nursery.start(agent.run)
            await publish(snapshot(1, [client, server]))
            stream, code = await socks5_connect(pods["client"], (pods["server"].ip, 8080))
            async with stream:
                assert code == 0
                greeting = f"from {pods['client'].ip}\n".encode()
                assert await receive_exactly(stream, len(greeting)) == greeting
                await stream.send_all(b"over hbone")
                assert await receive_exactly(stream, 10) == b"over hbone"
            await publish(snapshot(2, [client, server], authz=[deny]))
            stream, code = await socks5_connect(pods["client"], (pods["server"].ip, 8080))
            async with stream:
                assert code == 2  # connection not allowed by ruleset
            nursery.cancel_scope.cancel()
    assert app.peers == [pods["client"].ip]
    opened = states["node1"].metrics.registry.get_sample_value(
        "istio_tcp_connections_opened_total", {
            "reporter": "source", "source_workload": "sleep", "destination_workload": "echo",
            "source_workload_namespace": "client", "destination_workload_namespace": "server",
            "source_principal": "spiffe://cluster.local/ns/client/sa/sleep",
            "destination_service": "unknown",
            "destination_principal": "spiffe://cluster.local/ns/server/sa/echo",
            "security_policy": "mutual_tls", "response_flags": "-"})
    assert opened == 1
