"""Node-authorized issuing and the waypoint's CSR listener (over loopback, no netns)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from common.ca import CertificateAuthority
from common.csr import request_certificate
from common.discovery import SnapshotHolder
from common.errors import CertificateError
from common.identity import SpiffeId
from tests.unit.ztunnel_helpers import snapshot_of, workload
from ztunnel.certs import NodeIssuer
from ztunnel.csr_server import csr_route

TD = "cluster.local"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def issuer_for(ca: CertificateAuthority, node: str) -> tuple[NodeIssuer, SnapshotHolder]:
    holder = SnapshotHolder()
    holder.publish(snapshot_of(1, [
        workload("web", namespace="shop", sa="web", node="node1"),
        workload("waypoint", namespace="shop", sa="waypoint", node="node1"),
        workload("db", namespace="data", sa="db", node="node2"),
    ]))
    return NodeIssuer(ca, node, lambda: holder.current), holder


async def test_issues_for_a_pod_on_its_own_node(ca: CertificateAuthority) -> None:
    issuer, _ = issuer_for(ca, "node1")
    cert = await issuer.issue(SpiffeId(TD, "shop", "web"))
    assert cert.identity == SpiffeId(TD, "shop", "web")


async def test_refuses_an_identity_of_another_node(ca: CertificateAuthority) -> None:
    issuer, _ = issuer_for(ca, "node1")
    with pytest.raises(CertificateError, match=r"ns/data/sa/db: no pod on node node1 runs as"):
        await issuer.issue(SpiffeId(TD, "data", "db"))


async def test_store_refuses_once_the_pod_left_the_node(ca: CertificateAuthority) -> None:
    issuer, holder = issuer_for(ca, "node1")
    holder.publish(snapshot_of(2, []))
    with pytest.raises(CertificateError, match="no pod on node node1"):
        await issuer.store().get(SpiffeId(TD, "shop", "web"))


async def test_csr_is_signed_for_the_pods_own_identity_only(
        ca: CertificateAuthority, listener: socket.socket) -> None:
    issuer, _ = issuer_for(ca, "node1")
    waypoint = workload("waypoint", namespace="shop", sa="waypoint", node="node1")
    server = csr_route(issuer, waypoint)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            cert = await request_certificate(url, SpiffeId(TD, "shop", "waypoint"))
            assert cert.identity == SpiffeId(TD, "shop", "waypoint")
            assert cert.roots_pem == ca.roots_pem
            # Asking for someone else's identity still gets the pod's own: refused here.
            with pytest.raises(CertificateError, match=r"runs as .*sa/waypoint"):
                await request_certificate(url, SpiffeId(TD, "shop", "web"))
            nursery.cancel_scope.cancel()


async def test_csr_listener_refuses_a_pod_no_longer_on_the_node(
        ca: CertificateAuthority, listener: socket.socket) -> None:
    issuer, holder = issuer_for(ca, "node1")
    waypoint = workload("waypoint", namespace="shop", sa="waypoint", node="node1")
    server = csr_route(issuer, waypoint)
    holder.publish(snapshot_of(2, []))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            with pytest.raises(CertificateError, match="403"):
                await request_certificate(url, SpiffeId(TD, "shop", "waypoint"))
            nursery.cancel_scope.cancel()


async def test_csr_client_waits_for_a_listener_that_opens_late(
        ca: CertificateAuthority) -> None:
    issuer, _ = issuer_for(ca, "node1")
    waypoint = workload("waypoint", namespace="shop", sa="waypoint", node="node1")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # reserved, not listening yet: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with sock, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def open_late() -> None:
                await trio.sleep(0.5)
                sock.listen(8)
                await nursery.start(csr_route(issuer, waypoint).serve, sock)
            nursery.start_soon(open_late)
            cert = await request_certificate(url, SpiffeId(TD, "shop", "waypoint"),
                                             connect_wait=5)
            assert cert.identity == SpiffeId(TD, "shop", "waypoint")
            nursery.cancel_scope.cancel()
