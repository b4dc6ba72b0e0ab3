"""ztunnel counts what its pods' HBONE ports refuse, on the metrics it serves on /metrics."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from common import tls
from common.ca import CertificateAuthority
from common.errors import MeshError
from common.identity import SpiffeId
from common.netns import call_in_netns
from tests.integration.hbone_support import wait_until
from tests.netns.ztunnel_support import (
    Mesh,
    PodNs,
    pod_network,
    snapshot,
    tcp_socket_in,
    workload,
)

pytestmark = pytest.mark.netns

HBONE_PORT = 15008


@pytest.fixture
def pods() -> Iterator[dict[str, PodNs]]:
    with pod_network(["outside", "server"]) as pods:
        yield pods


def _series(mesh: Mesh, node: str, reason: str) -> str | None:
    """The exposition line of one reason, as ztunnel's /metrics serves it."""
    body = mesh.nodes[node].state.metrics.render().decode()
    prefix = f'pyambient_hbone_refused_total{{reason="{reason}"}} '
    return next((line for line in body.splitlines() if line.startswith(prefix)), None)


def _line(reason: str, value: float) -> str:
    return f'pyambient_hbone_refused_total{{reason="{reason}"}} {value}'


async def test_refusals_on_a_pods_hbone_port_show_on_ztunnels_metrics(
        pods: dict[str, PodNs], ca: CertificateAuthority) -> None:
    server = workload(pods["server"], name="echo", namespace="server", sa="echo", node="node2")
    outsider = workload(pods["outside"], name="legacy", namespace="legacy", node="node1",
                        captured=False)
    stranger = CertificateAuthority.generate("cluster.local")
    foreign = tls.client_context(stranger.issue(SpiffeId("cluster.local", "legacy", "x")))
    foreign.load_verify_locations(cadata=ca.roots_pem.decode())
    mesh = Mesh(ca)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery, "node2")
            await mesh.publish(snapshot(1, [server, outsider]))
            assert _series(mesh, "node2", "not_tls") == _line("not_tls", 0.0)
            # 1. Plaintext HTTP at the pod's 15008, from a pod outside the mesh.
            sock = tcp_socket_in(pods["outside"])
            await sock.connect((pods["server"].ip, HBONE_PORT))
            plain = trio.SocketStream(sock)
            await plain.send_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            with trio.fail_after(10):
                try:
                    while await plain.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass  # reset rather than closed: refused all the same
            await plain.aclose()
            # 2. mTLS with a certificate from another CA (same trust domain name); in
            # TLS 1.3 the client learns of the refusal on its first read.
            raw = call_in_netns(pods["outside"].path, socket.socket)
            try:
                stream = await tls.connect_tls(pods["server"].ip, HBONE_PORT, foreign,
                                               expected={server.identity}, sock=raw)
                async with stream:
                    data = await stream.receive_some(1)
            except MeshError:
                data = b""
            assert data == b""
            # Counted once each, under their reasons, on node2's ztunnel (polled).
            await wait_until(lambda: (_series(mesh, "node2", "not_tls"),
                                      _series(mesh, "node2", "unknown_ca")) == (
                _line("not_tls", 1.0), _line("unknown_ca", 1.0)))
            nursery.cancel_scope.cancel()
