"""The ingress gateway on the shared local cluster, reached from the host.

A namespace in ambient with a waypoint (``Mesh`` of test_waypoint_mesh: reviews v1/v2),
a certificate generated here stored as a ``kubernetes.io/tls`` Secret, ``ambientctl
gateway apply`` (HTTP and HTTPS listeners), an HTTPRoute on the Gateway for
``reviews.example.com``.  From the host: HTTPS with that SNI through the forwarder that
``gateway status`` prints, into the mesh over HBONE; the service is labelled
``istio.io/ingress-use-waypoint=true``, so the waypoint's L7 DENY applies to the edge.
"""

from __future__ import annotations

import base64
import re
import ssl

import pytest
import trio

from common.kube import HTTPRoute, KubeClient, Secret, Service
from tests.integration.conftest import LocalCluster, wait_for
from tests.integration.test_waypoint_mesh import PORT, Mesh, _sh
from tests.unit.test_ingress import _cert
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HOST = "reviews.example.com"


async def _https(address: str, ca: bytes, path: str, method: str = "GET") -> Reply:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cadata=ca.decode())
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        tls = trio.SSLStream(stream, ctx, server_hostname=HOST)
        await tls.do_handshake()
        try:
            return await Client(tls).request(path, host=HOST, method=method)
        finally:
            await tls.aclose()


async def test_https_from_the_host_reaches_the_mesh_and_waypoint_policy_applies(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    cert, key = _cert([HOST])
    await kube.create(Secret.model_validate({
        "metadata": {"name": "reviews-cert", "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": base64.b64encode(cert).decode(),
                 "tls.key": base64.b64encode(key).decode()}}))
    svc = await kube.get(Service, "reviews", namespace)
    await kube.patch(Service, "reviews", {"metadata": {
        "labels": {**svc.metadata.labels, "istio.io/ingress-use-waypoint": "true"}}}, namespace)
    await kube.create(HTTPRoute.model_validate({
        "metadata": {"name": "reviews-edge", "namespace": namespace},
        "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [HOST],
                 "rules": [{"backendRefs": [{"name": "reviews", "port": PORT}]}]}}))
    await _sh(cluster, "gateway", "apply", "-n", namespace, "--name", "edge",
              "--tls-secret", "reviews-cert")
    status = await _sh(cluster, "gateway", "status", "-n", namespace, "--name", "edge",
                       "--wait-timeout", "120s")
    found = re.search(r"listener port 443 reachable from this host at (\S+)", status)
    assert found is not None, status
    address = found.group(1)
    assert address.startswith("127.0.0.1:")

    async def answer(path: str, want: int, method: str = "GET") -> Reply | None:
        try:
            reply = await _https(address, cert, path, method)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return None
        return reply if reply.status == want else None

    ok = await wait_for(lambda: answer("/hello", 200), 90, interval=0.5,
                        what="HTTPS through the ingress gateway")
    assert b'"reviews' in ok.body  # the echo pod answered (its pod name)
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-admin"},
              "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                       "name": "waypoint"}],
                       "action": "DENY",
                       "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}}
    await mesh.apply(policy)
    denied = await wait_for(lambda: answer("/admin/x", 403), 60, interval=0.5,
                            what="the waypoint's DENY applied to ingress traffic")
    assert denied.body == b"RBAC: access denied"
    assert (await _https(address, cert, "/public", "GET")).status == 200
    # The HTTP listener (port 80) serves the same route, through its own host port.
    plain = re.search(r"listener port 80 reachable from this host at 127\.0\.0\.1:(\d+)",
                      status)
    assert plain is not None, status
    stream = await trio.open_tcp_stream("127.0.0.1", int(plain.group(1)))
    async with stream:
        with trio.fail_after(10):
            reply = await Client(stream).request("/plain", host=HOST)
    assert reply.status == 200, reply
