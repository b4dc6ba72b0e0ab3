"""The waypoint on the shared local cluster: bookinfo-style routing on echo backends,
L7 authorization, and a service without a waypoint staying at L4.

Traffic goes client pod -> its node's ztunnel -> (HBONE) the waypoint pod -> (HBONE) the
chosen echo pod's ztunnel -> echo, exactly the ambient path; the waypoint is deployed by
``ambientctl waypoint apply --enroll-namespace`` and gets its identity from its node's
ztunnel.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

import pytest
import trio

from common.errors import KubeApiError
from common.kube import (
    AuthorizationPolicy,
    DestinationRule,
    KubeClient,
    Pod,
    VirtualService,
)
from deploy.local.netns import NETNS_DIR
from deploy.local.network import Names
from tests.integration.conftest import (
    LocalCluster,
    echo_deployment,
    echo_service,
    is_ready,
    ready_pods,
    service_ip,
    wait_for,
)
from tests.integration.ztunnel_support import (
    AMBIENT,
    fabric_get,
    label_namespace,
    netns_of,
    open_from,
)
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 8080
WAYPOINT_PODS = "gateway.networking.k8s.io/gateway-name=waypoint"


async def _sh(cluster: LocalCluster, *args: str) -> str:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=60))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr or done.stdout}"
    return done.stdout


class Mesh:
    """One namespace with a waypoint, reviews v1/v2, and a client pod."""

    def __init__(self, cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
        self.cluster = cluster
        self.kube = kube
        self.ns = namespace
        self.client_pod: Pod | None = None
        self.vip = ""

    async def up(self) -> Mesh:
        ns = self.ns
        await label_namespace(self.kube, ns, AMBIENT)
        await _sh(self.cluster, "waypoint", "apply", "-n", ns, "--enroll-namespace")
        for version in ("v1", "v2"):
            await self.kube.create(echo_deployment(
                f"reviews-{version}", ns, labels={"app": "reviews", "version": version},
                env={"VERSION": version}))
        await self.kube.create(echo_service("reviews", ns, {"app": "reviews"}))
        await self.kube.create(Pod.model_validate({
            "metadata": {"name": "client", "namespace": ns, "labels": {"app": "client"}},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c",
                                                           "image": "ambient/echo"}]}}))
        pods = await ready_pods(self.cluster, ns, 4, within=180)
        self.client_pod = next(p for p in pods if p.metadata.name == "client")
        self.vip = await service_ip(self.kube, ns, "reviews")
        return self

    async def connect(self, ip: str | None = None, port: int = PORT) -> Client:
        assert self.client_pod is not None
        return Client(await open_from(netns_of(self.client_pod), ip or self.vip, port))

    async def apply(self, *objects: Any) -> None:
        for obj in objects:
            model = {"VirtualService": VirtualService, "DestinationRule": DestinationRule,
                     "AuthorizationPolicy": AuthorizationPolicy}[obj["kind"]]
            obj["metadata"]["namespace"] = self.ns
            existing = None
            try:
                existing = await self.kube.get(model, obj["metadata"]["name"], self.ns)
            except KubeApiError as exc:
                if exc.code != 404:
                    raise
            if existing is None:
                done = await self.kube.create(model.model_validate(obj))
            else:
                obj["metadata"]["resourceVersion"] = existing.metadata.resource_version
                done = await self.kube.update(model.model_validate(obj))
            if obj["kind"] != "AuthorizationPolicy":  # routes: wait until served
                await self.served(f"{obj['kind']}/{self.ns}/{obj['metadata']['name']}",
                                  done.metadata.resource_version or "")

    async def served(self, key: str, resource_version: str, within: float = 60.0) -> None:
        """Wait until every Ready waypoint pod serves this version of the object (its
        /config_dump lists it): a reply that merely fits the new route may still come
        from the old one."""
        async def everywhere() -> bool:
            pods = (await self.kube.list(Pod, self.ns, label_selector=WAYPOINT_PODS)).items
            ready = [p for p in pods if is_ready(p) and not p.metadata.deletion_timestamp]
            for pod in ready:
                try:
                    dump = json.loads(await fabric_get(self.cluster, str(pod.status.pod_ip),
                                                       15000, "/config_dump"))
                except (OSError, ValueError, trio.TooSlowError):
                    return False
                if dump.get("objects", {}).get(key) != resource_version:
                    return False
            return bool(ready)
        await wait_for(everywhere, within, interval=0.2, what=f"{key}@{resource_version} served")

    async def get(self, path: str = "/", headers: dict[str, str] | None = None,
                  client: Client | None = None, method: str = "GET") -> Reply:
        own = client is None
        c = client or await self.connect()
        try:
            with trio.fail_after(10):
                return await c.request(path, host=f"reviews:{PORT}", headers=headers,
                                       method=method)
        finally:
            if own:
                await c.stream.aclose()

    async def until(self, predicate: Any, within: float = 60.0, what: str = "",
                    **kwargs: Any) -> Reply:
        async def probe() -> Reply | None:
            try:
                reply = await self.get(**kwargs)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError):
                return None
            return reply if predicate(reply) else None
        return await wait_for(probe, within, interval=0.3, what=what)


def version(reply: Reply) -> str | None:
    if reply.status != 200:
        return None
    doc: dict[str, Any] = json.loads(reply.body)
    return doc.get("version")


DR = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
      "metadata": {"name": "reviews"},
      "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                              {"name": "v2", "labels": {"version": "v2"}}]}}


def vs(http: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews"}, "spec": {"hosts": ["reviews"], "http": http}}


def to(subset: str, weight: int | None = None) -> dict[str, Any]:
    dest: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset}}
    if weight is not None:
        dest["weight"] = weight
    return dest


async def test_bookinfo_routing_through_the_waypoint(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    # all-v1
    await mesh.apply(DR, vs([{"route": [to("v1")]}]))
    await mesh.until(lambda r: version(r) == "v1", what="all traffic to v1")
    client = await mesh.connect()
    assert {version(await mesh.get(client=client)) for _ in range(50)} == {"v1"}
    # header end-user: jason to v2, everyone else to v1
    await mesh.apply(vs([{"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                          "route": [to("v2")]}, {"route": [to("v1")]}]))
    await mesh.until(lambda r: version(r) == "v2", headers={"end-user": "jason"},
                     what="jason to v2")
    client = await mesh.connect()
    assert {version(await mesh.get(client=client, headers={"end-user": "jason"}))
            for _ in range(20)} == {"v2"}
    assert {version(await mesh.get(client=client)) for _ in range(20)} == {"v1"}
    # 90/10 split, observed over 1,000 requests on keep-alive connections
    await mesh.apply(vs([{"route": [to("v1", 90), to("v2", 10)]}]))
    await mesh.until(lambda r: version(r) == "v2", what="the split in force", within=60)
    counts: Counter[str | None] = Counter()
    client = await mesh.connect()
    for _ in range(1000):
        counts[version(await mesh.get(client=client))] += 1
    assert abs(counts["v2"] / 1000 - 0.10) <= 0.05, counts
    assert counts["v1"] + counts["v2"] == 1000, counts
    # mirror to v2: the client sees only v1, the v2 pods get the copies
    await mesh.apply(vs([{"route": [to("v1")], "mirror": {"host": "reviews", "subset": "v2"},
                          "mirrorPercentage": {"value": 100}}]))
    marker = "/mirror-marker"
    await mesh.until(lambda r: version(r) == "v1", what="mirror route in force", path=marker)
    client = await mesh.connect()
    assert {version(await mesh.get(marker, client=client)) for _ in range(20)} == {"v1"}

    async def mirrored() -> bool:
        pods = (await kube.list(Pod, namespace, label_selector="version=v2")).items
        logs = ""
        for pod in pods:
            logs += await _sh(cluster, "logs", "-n", namespace, pod.metadata.name)
        return marker in logs
    await wait_for(mirrored, 20, interval=0.5, what="mirrored requests in the v2 pods' logs")
    # Istio's metrics on the waypoint's 15020, with the source workload known.
    pods = (await kube.list(Pod, namespace)).items
    waypoint = next(p.metadata.name for p in pods if p.metadata.name.startswith("waypoint-"))
    metrics = await _sh(cluster, "exec", "-n", namespace, waypoint, "--",
                        "curl", "-s", "localhost:15020/metrics")
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("istio_requests_total{") and 'destination_version="v2"' in ln
                and 'response_code="200"' in ln)
    assert 'reporter="waypoint"' in line and 'destination_service_name="reviews"' in line
    assert 'source_workload="client"' in line
    assert float(line.rsplit(" ", 1)[1]) >= 20
    # Plaintext at the waypoint's HBONE port is refused and counted.
    waypoint_ip = str(next(p.status.pod_ip for p in pods if p.metadata.name == waypoint))
    await plaintext_at_hbone_port(cluster, waypoint_ip)

    async def refusal_counted() -> bool:
        text = await fabric_get(cluster, waypoint_ip, 15020, "/metrics")
        return 'pyambient_hbone_refused_total{reason="not_tls"} 1.0' in text
    await wait_for(refusal_counted, 20, interval=0.3, what="the waypoint's refusal counted")


async def plaintext_at_hbone_port(cluster: LocalCluster, ip: str) -> None:
    """Speak plain HTTP at ``ip``:15008 from the fabric; the server must close on us."""
    fabric = str(NETNS_DIR / Names(cluster.name).fabric)
    stream = await open_from(fabric, ip, 15008)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(10):
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(4096):
                    pass


async def test_l7_deny_by_path_and_method_and_l4_service_without_waypoint(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    await mesh.until(lambda r: r.status == 200, what="service answering through the waypoint")
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-admin-writes"},
              "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                       "name": "waypoint"}],
                       "action": "DENY",
                       "rules": [{"to": [{"operation": {"paths": ["/admin*"],
                                                        "methods": ["POST"]}}]}]}}
    await mesh.apply(policy)
    denied = await mesh.until(lambda r: r.status == 403, what="L7 deny in force",
                              path="/admin/x", method="POST")
    assert denied.body == b"RBAC: access denied"
    assert (await mesh.get("/admin/x")).status == 200
    assert (await mesh.get("/public", method="POST")).status == 200
    # A service opted out of the waypoint: L4 only (no L7 policy, no x-envoy headers).
    await kube.create(echo_deployment("plain", namespace))
    svc = echo_service("plain", namespace, {"app": "plain"})
    svc.metadata.labels = {"istio.io/use-waypoint": "none"}
    await kube.create(svc)
    await ready_pods(cluster, namespace, 5, within=180)
    plain_vip = await service_ip(kube, namespace, "plain")

    async def l4() -> Reply | None:
        try:
            c = await mesh.connect(plain_vip)
            with trio.fail_after(10):
                reply = await c.request("/admin/x", method="POST", host=f"plain:{PORT}")
            await c.stream.aclose()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return None
        return reply if reply.status == 200 else None
    reply = await wait_for(l4, 60, interval=0.3, what="the L4-only service answering")
    assert "x-envoy-upstream-service-time" not in reply.headers
