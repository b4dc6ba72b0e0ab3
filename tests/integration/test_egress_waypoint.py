"""Egress on the shared local cluster: a ServiceEntry that uses a waypoint, with TLS
origination, a retry and an L7 deny applied there; and STATIC endpoints that ztunnel
passes through without a waypoint.

The "external" servers run in this test's trio loop, listening in the cluster's fabric
namespace (10.240.0.1, reachable from every pod and outside every pod's capture), so the
test counts exactly what reached them.  The HTTPS one has a certificate for
``api.example.com`` from a CA made in ``tmp_path``; the waypoint process reads that CA
file through the DestinationRule's ``caCertificates``.

Path: client pod -> its ztunnel -> (HBONE, authority = the entry's VIP:80) the waypoint ->
(TCP + TLS originated, SNI api.example.com) 10.240.0.1:<port>.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from common.kube import (
    AuthorizationPolicy,
    DestinationRule,
    KubeClient,
    Pod,
    Secret,
    ServiceEntry,
    VirtualService,
)
from common.service_entries import allocate_addresses
from deploy.local import netns
from deploy.local.network import FABRIC_GATEWAY, Names
from tests.integration.conftest import LocalCluster, is_ready, ready_pods, wait_for
from tests.integration.ztunnel_support import (
    AMBIENT,
    fabric_get,
    label_namespace,
    netns_of,
    open_from,
)
from tests.unit.egress_helpers import ExternalServer, server_certs
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOST = "api.example.com"
WAYPOINT_PODS = "gateway.networking.k8s.io/gateway-name=waypoint"


async def _sh(cluster: LocalCluster, *args: str) -> str:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=60))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr or done.stdout}"
    return done.stdout


async def _fabric_listener(cluster: LocalCluster) -> trio.SocketListener:
    sock = await netns.trio_socket_in(Names(cluster.name).fabric)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((str(FABRIC_GATEWAY), 0))
    sock.listen(64)
    return trio.SocketListener(sock)


@pytest.fixture
async def fabric_servers(cluster: LocalCluster, nursery: trio.Nursery, tmp_path: Path
                         ) -> AsyncIterator[tuple[tuple[ExternalServer, int],
                                                  tuple[ExternalServer, int]]]:
    """An HTTPS server (CA in tmp_path) and a plain HTTP one, in the fabric namespace."""
    pair = []
    for server in (ExternalServer(server_certs(tmp_path / "pki", HOST)), ExternalServer()):
        listener = await _fabric_listener(cluster)
        await nursery.start(server.serve, listener)
        pair.append((server, listener.socket.getsockname()[1]))
    yield pair[0], pair[1]


async def _vip(kube: KubeClient, namespace: str, name: str) -> str:
    """The address the translator allocates (the same pure function over every entry)."""
    entries = tuple((await kube.list(ServiceEntry)).items)
    return next(str(o.spec["addresses"][0]) for o in allocate_addresses(entries)
                if o.metadata.namespace == namespace and o.metadata.name == name)


async def _waypoint_dumps(cluster: LocalCluster, kube: KubeClient, namespace: str
                          ) -> list[dict[str, Any]] | None:
    pods = (await kube.list(Pod, namespace, label_selector=WAYPOINT_PODS)).items
    ready = [p for p in pods if is_ready(p) and not p.metadata.deletion_timestamp]
    dumps = []
    for pod in ready:
        try:
            dumps.append(json.loads(await fabric_get(cluster, str(pod.status.pod_ip), 15000,
                                                     "/config_dump")))
        except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError):
            return None
    return dumps or None


async def _served(cluster: LocalCluster, kube: KubeClient, namespace: str,
                  objects: dict[str, str], route: str) -> None:
    """Until every ready waypoint pod routes ``route`` and serves these object versions."""
    async def probe() -> bool:
        dumps = await _waypoint_dumps(cluster, kube, namespace)
        return dumps is not None and all(
            route in d.get("routes", ()) and all(d.get("objects", {}).get(k) == v
                                                 for k, v in objects.items())
            for d in dumps)
    await wait_for(probe, 90, interval=0.3, what=f"{route} and {sorted(objects)} served")


async def _get(client_pod: Pod, vip: str, path: str) -> Reply | None:
    """GET through the mesh from the client pod; None when the connection fails."""
    try:
        with trio.fail_after(10):
            client = Client(await open_from(netns_of(client_pod), vip, 80))
            try:
                return await client.request(path, host=HOST)
            finally:
                await client.stream.aclose()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return None


async def test_egress_waypoint_originates_tls_retries_and_denies(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        fabric_servers: tuple[tuple[ExternalServer, int], tuple[ExternalServer, int]]) -> None:
    (https, https_port), _plain = fabric_servers
    assert https.certs is not None
    await label_namespace(kube, namespace, dict(AMBIENT))
    await _sh(cluster, "waypoint", "apply", "-n", namespace)
    await kube.create(ServiceEntry.model_validate({
        "metadata": {"name": "api", "namespace": namespace,
                     "labels": {"istio.io/use-waypoint": "waypoint"}},
        "spec": {"hosts": [HOST], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP",
                            "targetPort": https_port}],
                 "endpoints": [{"address": str(FABRIC_GATEWAY)}]}}))
    rule = await kube.create(DestinationRule.model_validate({
        "metadata": {"name": "api-tls", "namespace": namespace},
        "spec": {"host": HOST, "trafficPolicy": {"portLevelSettings": [{
            "port": {"number": 80},
            "tls": {"mode": "SIMPLE", "caCertificates": str(https.certs.ca_file)}}]}}}))
    routes = await kube.create(VirtualService.model_validate({
        "metadata": {"name": "api", "namespace": namespace},
        "spec": {"hosts": [HOST], "http": [{
            "route": [{"destination": {"host": HOST, "port": {"number": 80}}}],
            "retries": {"attempts": 2, "retryOn": "503"}}]}}))
    await kube.create(Pod.model_validate({
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "ambient/echo"}]}}))
    pods = await ready_pods(cluster, namespace, 2, within=180)
    client_pod = next(p for p in pods if p.metadata.name == "client")
    vip = await _vip(kube, namespace, "api")
    await _served(cluster, kube, namespace, {
        f"DestinationRule/{namespace}/api-tls": rule.metadata.resource_version or "",
        f"VirtualService/{namespace}/api": routes.metadata.resource_version or ""},
        f"{HOST}:80")

    # Plain HTTP from the pod, TLS from the waypoint, verified against the test's CA.  The
    # first answers may still fail while the client's ztunnel learns the entry.
    async def answered() -> Reply | None:
        reply = await _get(client_pod, vip, "/hello")
        return reply if reply is not None and reply.status == 200 else None
    reply = await wait_for(answered, 60, interval=0.5, what="the entry answering via the waypoint")
    assert reply.body == f"/hello {HOST} {HOST}".encode()  # path, Host, SNI
    assert "x-envoy-upstream-service-time" in reply.headers  # it went through the waypoint
    assert set(https.sni) == {HOST}

    # A 503 from the external server is retried at the waypoint.
    flaky = await _get(client_pod, vip, "/flaky/fail-1")
    assert flaky is not None and flaky.status == 200, flaky
    assert https.hits["/flaky/fail-1"] == 2

    # L7 policy at the waypoint applies to the entry's traffic.
    await kube.create(AuthorizationPolicy.model_validate({
        "metadata": {"name": "deny-admin", "namespace": namespace},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                 "name": "waypoint"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}}))

    async def denied() -> Reply | None:
        reply = await _get(client_pod, vip, "/admin/x")
        return reply if reply is not None and reply.status == 403 else None
    reply = await wait_for(denied, 60, interval=0.5, what="the L7 deny in force")
    assert reply.body == b"RBAC: access denied"
    after = await _get(client_pod, vip, "/after")
    assert after is not None and after.status == 200
    # Before the policy arrived, /admin/x may have been served; after it, never again.
    before = https.hits["/admin/x"]
    assert (await _get(client_pod, vip, "/admin/x")) is not None
    assert https.hits["/admin/x"] == before

    # The CA from a Secret (credentialName) instead of a file: with the file gone from the
    # rule, only the Secret's CA can verify the server (the system roots do not know it).
    await kube.create(Secret.model_validate({
        "metadata": {"name": "api-ca", "namespace": namespace},
        "data": {"cacert": base64.b64encode(https.certs.ca_file.read_bytes()).decode()}}))
    rule = await kube.patch(DestinationRule, "api-tls", {"spec": {"trafficPolicy": {
        "portLevelSettings": [{"port": {"number": 80},
                               "tls": {"mode": "SIMPLE", "credentialName": "api-ca"}}]}}},
        namespace)
    await _served(cluster, kube, namespace, {
        f"DestinationRule/{namespace}/api-tls": rule.metadata.resource_version or ""},
        f"{HOST}:80")
    handshakes = len(https.sni)
    secret_reply = await _get(client_pod, vip, "/from-secret")
    assert secret_reply is not None and secret_reply.status == 200, secret_reply
    assert https.hits["/from-secret"] == 1
    # A new TLS connection (pooled ones made under the old rule were closed), so it was
    # this verification that passed.
    assert len(https.sni) > handshakes


async def test_static_endpoints_are_dialled_by_ztunnel_without_a_waypoint(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        fabric_servers: tuple[tuple[ExternalServer, int], tuple[ExternalServer, int]]) -> None:
    _https, (plain, plain_port) = fabric_servers
    await label_namespace(kube, namespace, dict(AMBIENT))
    await kube.create(ServiceEntry.model_validate({
        "metadata": {"name": "static", "namespace": namespace},
        "spec": {"hosts": ["static.example.com"], "location": "MESH_EXTERNAL",
                 "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                 "endpoints": [{"address": str(FABRIC_GATEWAY),
                                "ports": {"http": plain_port}}]}}))
    await kube.create(Pod.model_validate({
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "ambient/echo"}]}}))
    (client_pod,) = await ready_pods(cluster, namespace, 1, within=120)
    vip = await _vip(kube, namespace, "static")

    async def answered() -> Reply | None:
        reply = await _get(client_pod, vip, "/static")
        return reply if reply is not None and reply.status == 200 else None
    reply = await wait_for(answered, 60, interval=0.5, what=f"{vip}:80 dialled at the endpoint")
    assert reply.body == b"/static api.example.com None"  # no TLS, Host as the client sent
    assert "x-envoy-upstream-service-time" not in reply.headers  # L4 only
    assert plain.hits["/static"] >= 1
