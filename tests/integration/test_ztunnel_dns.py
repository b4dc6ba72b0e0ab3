"""ztunnel's DNS proxy on the shared local cluster: a captured pod's DNS (to the kube-dns VIP)
is answered by its node's ztunnel: cluster names locally (TTL 30, authoritative; the
cluster DNS says TTL 5), search-path junk NXDOMAIN at once, everything else forwarded."""

from __future__ import annotations

import socket

import pytest
import trio

from common.kube import KubeClient, Pod
from common.netns import call_in_netns
from deploy.local import network
from tests.integration.conftest import LocalCluster, echo_service, ready_pods, service_ip
from tests.integration.ztunnel_support import (
    AMBIENT,
    label_namespace,
    netns_of,
    node_netns,
    open_from,
    wait_enrolled,
)
from tests.unit.dns_helpers import query_bytes
from ztunnel.dns.wire import FLAG_AA, RCODE_NXDOMAIN, TYPE_A, Message, parse

pytestmark = [pytest.mark.netns]


def echo_pod(name: str, namespace: str, node: str) -> Pod:
    return Pod.model_validate({"metadata": {"name": name, "namespace": namespace,
                                            "labels": {"app": name}},
                               "spec": {"nodeName": node, "containers": [{
                                   "name": "echo", "image": "ambient/echo",
                                   "ports": [{"containerPort": 8080}]}]}})


async def ask(netns: str, name: str) -> Message:
    """An A query from inside the pod to the kube-dns VIP, as its stub resolver sends it."""
    sock = trio.socket.from_stdlib_socket(
        call_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
    with sock, trio.fail_after(10):
        await sock.connect((network.DNS_VIP, 53))
        for _ in range(10):  # UDP: a lost datagram is retried, as a stub would
            await sock.send(query_bytes(name, TYPE_A))
            with trio.move_on_after(1):
                return parse(await sock.recv(65535))
    raise AssertionError(f"no DNS answer for {name}")


async def metrics_text(cluster: LocalCluster, node: str) -> str:
    stream = await open_from(node_netns(cluster, node), "127.0.0.1", 15020)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data.decode()


async def test_captured_pod_dns_is_answered_by_ztunnel(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    labels: dict[str, str | None] = {**AMBIENT}
    await label_namespace(kube, namespace, labels)
    await kube.create(echo_pod("client", namespace, "node-0"))
    await kube.create(echo_service("server", namespace, {"app": "server"}))
    vip = await service_ip(kube, namespace, "server")
    (client,) = await ready_pods(cluster, namespace, 1)
    await wait_enrolled(cluster, client)
    netns = netns_of(client)

    for name in ("server", f"server.{namespace}", f"server.{namespace}.svc.cluster.local"):
        answer = await ask(netns, name)
        assert [socket.inet_ntoa(r.rdata) for r in answer.answers] == [vip], name
        assert answer.flags & FLAG_AA and {r.ttl for r in answer.answers} == {30}
    junk = await ask(netns, f"server.{namespace}.svc.cluster.local.{namespace}.svc.cluster.local")
    assert junk.rcode == RCODE_NXDOMAIN
    # Outside the cluster domain: forwarded to the cluster DNS (which has no route off the
    # machine and says NXDOMAIN), not answered by ztunnel (no AA).
    outside = await ask(netns, "example.invalid")
    assert outside.rcode == RCODE_NXDOMAIN and not outside.flags & FLAG_AA

    text = await metrics_text(cluster, "node-0")
    local = [line for line in text.splitlines()
             if line.startswith("ztunnel_dns_requests_total") and 'outcome="local"' in line]
    assert local and sum(float(line.rsplit(" ", 1)[1]) for line in local) >= 4
