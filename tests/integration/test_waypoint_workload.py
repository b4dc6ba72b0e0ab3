"""Pod-addressed traffic and ``istio.io/waypoint-for`` on the shared local cluster.

A client pod dials the echo pod's IP directly (and, for contrast, its Service VIP).  With
``ambientctl waypoint apply --for workload`` the client's ztunnel sends the pod-addressed
connection to the waypoint, which applies its own L7 policy and forwards to the pod over
HBONE; the service-addressed one stays at L4.  With ``--for service`` it is the other way
round; ``--for all`` takes both.

Every wait observes state: the client node's ztunnel ``/config_dump`` (which waypoint a
pod or service uses) and the waypoint's ``/config_dump`` (``workloads``: the pod IPs it
forwards).  Which path a reply took is read from the reply itself: only the waypoint adds
``x-envoy-upstream-service-time`` to the response and ``x-envoy-attempt-count`` to the
request the echo app reflects; the waypoint's metrics count the requests per destination
workload.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from common.kube import AuthorizationPolicy, KubeClient, Pod
from tests.integration.conftest import (
    LocalCluster,
    echo_service,
    is_ready,
    ready_pods,
    service_ip,
    wait_for,
)
from tests.integration.test_waypoint_mesh import WAYPOINT_PODS
from tests.integration.ztunnel_support import (
    AMBIENT,
    config_dump,
    fabric_get,
    label_namespace,
    netns_of,
    open_from,
)
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 8080
VIA_WAYPOINT = "x-envoy-upstream-service-time"
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.TooSlowError)


async def _ambientctl(cluster: LocalCluster, *args: str) -> None:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=60))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr or done.stdout}"


class Scene:
    """One ambient namespace enrolled in its waypoint, an echo pod ``web`` behind a Service,
    and a client pod on another node."""

    def __init__(self, cluster: LocalCluster, kube: KubeClient, ns: str) -> None:
        self.cluster, self.kube, self.ns = cluster, kube, ns
        self.client: Pod | None = None
        self.pod_ip = ""
        self.vip = ""

    async def up(self, traffic: str) -> Scene:
        enrol: dict[str, str | None] = {**AMBIENT}
        await label_namespace(self.kube, self.ns, enrol)
        await self.waypoint_for(traffic)
        for name, node in (("web", "node-1"), ("client", "node-0")):
            await self.kube.create(Pod.model_validate({
                "metadata": {"name": name, "namespace": self.ns, "labels": {"app": name}},
                "spec": {"nodeName": node, "containers": [{
                    "name": "echo", "image": "ambient/echo",
                    "ports": [{"containerPort": PORT}]}]}}))
        await self.kube.create(echo_service("web", self.ns, {"app": "web"}))
        pods = await ready_pods(self.cluster, self.ns, 3, within=180)
        self.client = next(p for p in pods if p.metadata.name == "client")
        self.pod_ip = str(next(p for p in pods if p.metadata.name == "web").status.pod_ip)
        self.vip = await service_ip(self.kube, self.ns, "web")
        return self

    async def waypoint_for(self, traffic: str) -> None:
        await _ambientctl(self.cluster, "waypoint", "apply", "-n", self.ns, "--for", traffic,
                          "--enroll-namespace", "--overwrite")

    async def waypoint_ips(self) -> list[str]:
        pods = (await self.kube.list(Pod, self.ns, label_selector=WAYPOINT_PODS)).items
        return [str(p.status.pod_ip) for p in pods
                if is_ready(p) and not p.metadata.deletion_timestamp]

    async def settled(self, *, pod_via: bool, service_via: bool, within: float = 60.0) -> None:
        """Until the client's ztunnel routes the pod and the Service as asked, and every
        ready waypoint pod does (or does not) list the pod as a workload it forwards."""
        assert self.client is not None and self.client.spec.node_name
        node = self.client.spec.node_name
        want = f"{self.ns}/waypoint"

        async def probe() -> bool:
            try:
                dump = await config_dump(self.cluster, node)
            except (*TRANSPORT_ERRORS, ValueError):
                return False
            pod = next((w for w in dump["workloads"] if self.pod_ip in w["ips"]), None)
            svc = next((s for s in dump["services"]
                        if (s["namespace"], s["name"]) == (self.ns, "web")), None)
            if pod is None or svc is None:
                return False
            if (pod["waypoint"] == want) is not pod_via or \
                    (svc["waypoint"] == want) is not service_via:
                return False
            ips = await self.waypoint_ips()
            for ip in ips:
                try:
                    served = json.loads(await fabric_get(self.cluster, ip, 15000,
                                                         "/config_dump")).get("workloads", [])
                except (*TRANSPORT_ERRORS, ValueError):
                    return False
                if (self.pod_ip in served) is not pod_via:
                    return False
            return bool(ips)
        await wait_for(probe, within, interval=0.3,
                       what=f"pod via waypoint={pod_via}, service via waypoint={service_via}")

    async def get(self, ip: str, path: str = "/", method: str = "GET") -> Reply:
        assert self.client is not None
        stream = await open_from(netns_of(self.client), ip, PORT)
        try:
            with trio.fail_after(10):
                return await Client(stream).request(path, method=method, host=f"web:{PORT}")
        finally:
            await stream.aclose()

    async def answered(self, ip: str, path: str = "/", within: float = 30.0) -> Reply:
        """The first complete reply (the echo app listens a moment after its pod is Ready;
        connection errors until then are retried, never an answer)."""
        async def probe() -> Reply | None:
            try:
                return await self.get(ip, path)
            except TRANSPORT_ERRORS:
                return None
        return await wait_for(probe, within, interval=0.3, what=f"a reply from {ip}")

    async def metric(self, **labels: str) -> float:
        """``istio_requests_total`` summed over the waypoint pods' series matching ``labels``."""
        total = 0.0
        for ip in await self.waypoint_ips():
            text = await fabric_get(self.cluster, ip, 15020, "/metrics")
            for line in text.splitlines():
                if line.startswith("istio_requests_total{") and all(
                        f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def deny_admin() -> AuthorizationPolicy:
    return AuthorizationPolicy.model_validate({
        "metadata": {"name": "deny-admin"},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                 "name": "waypoint"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}})


def echoed(reply: Reply) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(reply.body)
    return doc


async def test_workload_waypoint_takes_pod_addressed_traffic_with_its_l7_policy(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    scene = await Scene(cluster, kube, namespace).up("workload")
    await scene.settled(pod_via=True, service_via=False)
    reply = await scene.answered(scene.pod_ip, "/through")
    assert reply.status == 200 and VIA_WAYPOINT in reply.headers, reply
    seen = echoed(reply)
    assert seen["path"] == "/through" and seen["pod"] == "web"
    assert seen["headers"].get("x-envoy-attempt-count") == "1"  # the waypoint forwarded it
    for _ in range(9):
        assert (await scene.get(scene.pod_ip, "/through")).status == 200
    assert await scene.metric(destination_workload="web", response_code="200",
                              reporter="waypoint") >= 10
    # Service-addressed traffic is not the workload waypoint's: L4 straight to the pod.
    direct = await scene.answered(scene.vip, "/by-service")
    assert direct.status == 200 and VIA_WAYPOINT not in direct.headers
    assert "x-envoy-attempt-count" not in echoed(direct)["headers"]
    # An L7 DENY targeting the waypoint applies to pod-addressed requests.
    policy = deny_admin()
    policy.metadata.namespace = namespace
    await kube.create(policy)

    async def denied() -> Reply | None:
        got = await scene.get(scene.pod_ip, "/admin/x")
        return got if got.status == 403 else None
    refused = await wait_for(denied, 60, interval=0.3, what="the L7 deny in force")
    assert refused.body == b"RBAC: access denied"
    assert (await scene.get(scene.pod_ip, "/public")).status == 200
    # ...and, at L4, not to service-addressed ones.
    assert (await scene.get(scene.vip, "/admin/x")).status == 200


async def test_service_waypoint_leaves_pod_addressed_traffic_at_l4_until_set_to_all(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    scene = await Scene(cluster, kube, namespace).up("service")
    await scene.settled(pod_via=False, service_via=True)
    policy = deny_admin()
    policy.metadata.namespace = namespace
    await kube.create(policy)

    async def denied() -> Reply | None:
        try:
            got = await scene.get(scene.vip, "/admin/x")
        except TRANSPORT_ERRORS:
            return None
        return got if got.status == 403 else None
    await wait_for(denied, 60, interval=0.3, what="the L7 deny in force for the service")
    # Pod-addressed: L4 only, so neither the waypoint's headers nor its policy.
    reply = await scene.answered(scene.pod_ip, "/admin/x")
    assert reply.status == 200 and VIA_WAYPOINT not in reply.headers, reply
    assert "x-envoy-attempt-count" not in echoed(reply)["headers"]
    # waypoint-for: all takes both.
    await scene.waypoint_for("all")
    await scene.settled(pod_via=True, service_via=True)
    by_pod = await scene.get(scene.pod_ip, "/admin/x")
    assert by_pod.status == 403 and by_pod.body == b"RBAC: access denied"
    ok = await scene.get(scene.pod_ip, "/fine")
    assert ok.status == 200 and VIA_WAYPOINT in ok.headers
