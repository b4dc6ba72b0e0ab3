"""ztunnel's data path between hand-built netns pods on two in-process "nodes"."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio

from common.ca import CertificateAuthority
from tests.netns.ztunnel_support import (
    EchoApp,
    Mesh,
    PodNs,
    converse,
    pod_network,
    refused,
    sh,
    snapshot,
    tcp_socket_in,
    workload,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def pods() -> Iterator[dict[str, PodNs]]:
    with pod_network(["a", "b", "c"]) as pods:
        yield pods


def metric(mesh: Mesh, node: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in mesh.nodes[node].state.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


async def test_outbound_crosses_nodes_over_hbone_with_bytes_intact_and_real_source_ip(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    mesh = Mesh(ca)
    app = EchoApp(pods["b"])
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node1", "node2")
            await mesh.publish(snapshot(1, [a, b]))
            greeting, echoed = await converse(pods["a"], (pods["b"].ip, 8080), payload)
            assert greeting == f"from {pods['a'].ip}"
            assert echoed == payload
            # A second connection reuses the pooled HBONE connection.
            greeting, echoed = await converse(pods["a"], (pods["b"].ip, 8080), b"again")
            assert echoed == b"again"
            pool = mesh.nodes["node1"].agent.pods()[0].pool
            assert len(pool.connections()) == 1
            nursery.cancel_scope.cancel()
    assert app.peers == [pods["a"].ip, pods["a"].ip]
    labels = {"reporter": "destination", "security_policy": "mutual_tls",
              "source_principal": "spiffe://cluster.local/ns/client/sa/sleep",
              "destination_workload": "echo"}
    assert metric(mesh, "node2", "istio_tcp_connections_opened_total", **labels) == 2
    assert metric(mesh, "node2", "istio_tcp_received_bytes_total",
                  reporter="destination") >= len(payload)
    assert metric(mesh, "node1", "istio_tcp_connections_opened_total", reporter="source",
                  destination_principal="spiffe://cluster.local/ns/server/sa/echo") == 2


async def test_plaintext_inbound_allowed_when_permissive_refused_when_strict(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    outsider = workload(pods["c"], name="legacy", namespace="legacy", node="node1",
                        captured=False)
    mesh = Mesh(ca)
    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node2")
            await mesh.publish(snapshot(1, [b, outsider]))
            greeting, echoed = await converse(pods["c"], (pods["b"].ip, 8080), b"hello")
            assert (greeting, echoed) == (f"from {pods['c'].ip}", b"hello")
            await mesh.publish(snapshot(2, [b, outsider], peer_auth=[
                ("server", "strict", {"mtls": {"mode": "STRICT"}})]))
            assert await refused(pods["c"], (pods["b"].ip, 8080))
            nursery.cancel_scope.cancel()
    assert app.peers == [pods["c"].ip]
    assert metric(mesh, "node2", "ztunnel_connections_refused_total",
                  reason="plaintext_strict") == 1


async def test_policy_deny_resets_the_client_and_nothing_reaches_the_app(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    deny = ("server", "deny-client", {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["client"]}}]}]})
    mesh = Mesh(ca)
    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node1", "node2")
            await mesh.publish(snapshot(1, [a, b], authz=[deny]))
            assert await refused(pods["a"], (pods["b"].ip, 8080), b"secret")
            nursery.cancel_scope.cancel()
    assert app.peers == []
    assert metric(mesh, "node2", "ztunnel_connections_refused_total",
                  reason="policy_denied") == 1
    assert metric(mesh, "node1", "ztunnel_connections_refused_total",
                  reason="policy_denied") == 1


async def test_live_connection_closed_when_a_new_policy_denies_it(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    deny = ("server", "deny-sleep", {"action": "DENY", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/client/sa/sleep"]}}]}]})
    mesh = Mesh(ca)
    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node1", "node2")
            await mesh.publish(snapshot(1, [a, b]))
            sock = tcp_socket_in(pods["a"])
            await sock.connect((pods["b"].ip, 8080))
            stream = trio.SocketStream(sock)
            greeting = await stream.receive_some(100)
            assert greeting.startswith(b"from ")
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
            await mesh.publish(snapshot(2, [a, b], authz=[deny]))
            try:
                while await stream.receive_some(100):
                    pass
            except trio.BrokenResourceError:
                pass  # reset is as good as EOF: the connection is gone
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert metric(mesh, "node2", "ztunnel_connections_closed_by_policy_total") == 1


async def test_unenrol_closes_listeners_and_removes_rules(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    mesh = Mesh(ca)
    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node1", "node2")
            await mesh.publish(snapshot(1, [a, b]))
            assert "pyambient_inpod" in sh("ip", "netns", "exec", pods["b"].name, "nft",
                                          "list", "tables").stdout
            assert ":15008" in sh("ip", "netns", "exec", pods["b"].name, "ss", "-ltn").stdout
            released = workload(pods["b"], name="echo", namespace="server", sa="echo",
                                node="node2", captured=False)
            await mesh.publish(snapshot(2, [a, released]))
            assert mesh.nodes["node2"].agent.pods() == []
            assert "pyambient_inpod" not in sh("ip", "netns", "exec", pods["b"].name, "nft",
                                              "list", "tables").stdout
            assert ":15008" not in sh("ip", "netns", "exec", pods["b"].name, "ss",
                                      "-ltn").stdout
            # The released pod keeps working, now reached by plain TCP from A's ztunnel.
            greeting, echoed = await converse(pods["a"], (pods["b"].ip, 8080), b"plain")
            assert (greeting, echoed) == (f"from {pods['a'].ip}", b"plain")
            nursery.cancel_scope.cancel()


async def test_outbound_port_refuses_connections_from_outside_the_pod(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    mesh = Mesh(ca)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery, "node1")
            await mesh.publish(snapshot(1, [a]))
            # Pod C (not in the mesh) dials A's 15001 directly to borrow A's identity.
            assert await refused(pods["c"], (pods["a"].ip, 15001))
            nursery.cancel_scope.cancel()
    assert metric(mesh, "node1", "ztunnel_connections_refused_total",
                  reason="not_from_pod") == 1
