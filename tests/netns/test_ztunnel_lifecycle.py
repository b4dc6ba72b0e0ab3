"""ztunnel lifecycle in hand-built netns pods: restart re-enrolment, waypoint CSR listener."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import pytest
import trio
from cryptography import x509

from common.ca import CertificateAuthority, make_csr
from common.identity import SpiffeId
from common.model import WaypointRef
from tests.netns.ztunnel_support import (
    EchoApp,
    Mesh,
    PodNs,
    converse,
    pod_network,
    sh,
    snapshot,
    tcp_socket_in,
    workload,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def pods() -> Iterator[dict[str, PodNs]]:
    with pod_network(["a", "b", "w"]) as pods:
        yield pods


async def test_a_restarted_ztunnel_enrols_pods_whose_rules_are_still_installed(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node1")
    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            async with trio.open_nursery() as first:
                mesh = Mesh(ca)
                await mesh.start(first, "node1")
                await mesh.publish(snapshot(1, [a, b]))
                first.cancel_scope.cancel()  # ztunnel dies: its rules stay in the pods
            assert "pyambient_inpod" in sh("ip", "netns", "exec", pods["a"].name, "nft",
                                          "list", "tables").stdout
            mesh = Mesh(ca)
            await mesh.start(nursery, "node1")
            await mesh.publish(snapshot(1, [a, b]))
            greeting, echoed = await converse(pods["a"], (pods["b"].ip, 8080), b"back")
            assert (greeting, echoed) == (f"from {pods['a'].ip}", b"back")
            nursery.cancel_scope.cancel()


async def test_waypoint_pod_gets_a_csr_listener_signing_its_own_identity(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    ref = WaypointRef("server", "waypoint")
    waypoint = workload(pods["w"], name="waypoint", namespace="server", sa="waypoint",
                        node="node1", captured=False, gateway=ref)
    mesh = Mesh(ca)
    identity = SpiffeId("cluster.local", "server", "waypoint")
    _, csr = make_csr(SpiffeId("cluster.local", "server", "someone-else"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery, "node1")
            await mesh.publish(snapshot(1, [waypoint]))
            assert mesh.nodes["node1"].agent.pods() == []  # a waypoint is never captured
            answer = b""
            while not answer:  # the listener opens right after the reconcile
                sock = tcp_socket_in(pods["w"])
                try:
                    await sock.connect(("127.0.0.1", 15012))
                except OSError:
                    sock.close()
                    await trio.sleep(0.05)
                    continue
                stream = trio.SocketStream(sock)
                async with stream:
                    await stream.send_all(
                        b"POST /csr HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + str(len(csr)).encode() + b"\r\n\r\n" + csr)
                    while data := await stream.receive_some(65536):
                        answer += data
            nursery.cancel_scope.cancel()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    leaf = x509.load_pem_x509_certificates(body)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(identity)]


async def test_drain_lets_live_connections_work_until_the_deadline_then_closes_them(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    a = workload(pods["a"], name="sleep", namespace="client", sa="sleep", node="node1")
    b = workload(pods["b"], name="echo", namespace="server", sa="echo", node="node2")
    app = EchoApp(pods["b"])
    mesh = Mesh(ca)
    grace = 1.0
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            await mesh.start(nursery, "node1", "node2")
            await mesh.publish(snapshot(1, [a, b]))
            sock = tcp_socket_in(pods["a"])
            await sock.connect((pods["b"].ip, 8080))
            stream = trio.SocketStream(sock)
            assert (await stream.receive_some(100)).startswith(b"from ")
            started = trio.current_time()
            nursery.start_soon(mesh.nodes["node2"].agent.drain, grace)
            await trio.lowlevel.checkpoint()
            await stream.send_all(b"still-open")
            assert await stream.receive_some(100) == b"still-open"
            try:
                while await stream.receive_some(100):
                    pass
            except trio.BrokenResourceError:
                pass
            assert trio.current_time() - started >= grace * 0.9
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_pods_without_a_netns_annotation_are_found_by_ip_and_enrolled(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    # On Kubernetes nothing annotates the pod: the agent asks the finder, by pod IP.
    a = dataclasses.replace(workload(pods["a"], name="sleep", node="node1"), netns=None)
    b = dataclasses.replace(workload(pods["b"], name="echo", node="node1"), netns=None)
    by_ip = {pods["a"].ip: pods["a"].path, pods["b"].ip: pods["b"].path}
    asked: list[set[str]] = []

    async def find(wanted: Mapping[str, Sequence[str]]) -> dict[str, str]:
        asked.append(set(wanted))
        return {uid: by_ip[ips[0]] for uid, ips in wanted.items()}

    app = EchoApp(pods["b"])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.serve)
            mesh = Mesh(ca)
            await mesh.start(nursery, "node1", find_netns=find)
            await mesh.publish(snapshot(1, [a, b]))
            assert asked and asked[-1] == {a.uid, b.uid}
            assert "pyambient_inpod" in sh("ip", "netns", "exec", pods["a"].name, "nft",
                                          "list", "tables").stdout
            greeting, echoed = await converse(pods["a"], (pods["b"].ip, 8080), b"found")
            assert (greeting, echoed) == (f"from {pods['a'].ip}", b"found")
            nursery.cancel_scope.cancel()
