"""Workload-addressed traffic (``istio.io/waypoint-for: workload|all``), without sockets.

Three layers: which pods a waypoint serves (:func:`workload_index`), where ztunnel sends
service- and pod-addressed connections for each ``waypoint-for`` value
(:func:`ztunnel.decide.decide_outbound`), and what the waypoint's pipeline does with a
pod-addressed request (memory transport, the real HTTP/1.1 shell).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
import trio

from common.authz.model import GatewayRef
from common.kube.objects import Resource
from common.model import Snapshot, WaypointRef
from common.translate import translate
from tests.unit.mesh_objects import (
    authorization_policy,
    endpoint,
    endpoint_slice,
    namespace,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)
from tests.unit.waypoint_helpers import Answer, FakeBackend, Harness, MemoryTransport, Seen
from waypoint.direct import DirectClusters
from waypoint.h2_upstream import ProtocolTransport
from waypoint.proxy import PeerInfo
from waypoint.routing.workloads import EMPTY_WORKLOADS, ENCAP_CLUSTER, workload_index
from waypoint.upstream import EndpointInfo
from ztunnel.decide import Passthrough, ToWorkload, ViaWaypoint, decide_outbound

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
USE = "istio.io/use-waypoint"
WAYPOINT = WaypointRef("demo", "waypoint")
WEB_VIP = "10.96.0.10"
WEB_1, WEB_2 = "10.1.1.1", "10.1.1.2"


def mesh_objects(waypoint_for: str | None, *, ns_use: str | None = "waypoint",
                 pod_use: str | None = None) -> list[Resource]:
    ns_labels = {**AMBIENT, **({USE: ns_use} if ns_use else {})}
    pod_labels = {"app": "web", "version": "v3", **({USE: pod_use} if pod_use else {})}
    return [
        namespace("demo", **ns_labels),
        waypoint_gateway("waypoint", waypoint_for=waypoint_for),
        waypoint_pod("waypoint-1", ip="10.1.9.1"),
        pod("client", ip="10.1.0.1", labels={"app": "client"}),
        *(pod(f"web-{i}", ip=ip, labels=pod_labels, sa="web", ports={"http": 8080})
          for i, ip in ((1, WEB_1), (2, WEB_2))),
        service("web", vip=WEB_VIP, ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
        endpoint_slice("web", [endpoint(WEB_1, "web-1"), endpoint(WEB_2, "web-2")]),
    ]


def mesh(waypoint_for: str | None, *extra: Resource, **kwargs: Any) -> Snapshot:
    return translate([*mesh_objects(waypoint_for, **kwargs), *extra])


def outbound(snap: Snapshot, dst: str, port: int, source: str = "10.1.0.1") -> Any:
    return decide_outbound(snap, snap.workloads_by_ip[source], dst, port, random.Random(0))


# --- which pods a waypoint serves ----------------------------------------------------------


@pytest.mark.parametrize(("waypoint_for", "served"), [
    ("workload", True), ("all", True), ("service", False), (None, False), ("none", False)])
def test_pods_are_served_only_when_the_waypoint_accepts_workload_traffic(
        waypoint_for: str | None, served: bool) -> None:
    index = workload_index(mesh(waypoint_for), WAYPOINT)
    # The namespace label enrols every pod of it, the client included.
    assert index.served == (["10.1.0.1", WEB_1, WEB_2] if served else [])
    assert index.by_ip[WEB_1].served is served
    # The waypoint's own pod is never a workload destination.
    assert "10.1.9.1" not in index.by_ip


def test_pod_label_overrides_the_namespace_and_other_waypoints_pods_are_not_served() -> None:
    snap = mesh("workload", ns_use=None, pod_use="waypoint")
    index = workload_index(snap, WAYPOINT)
    assert index.served == [WEB_1, WEB_2]  # the client pod names no waypoint
    target = index.by_ip[WEB_1]
    assert (target.namespace, target.name, target.workload, target.version) == \
        ("demo", "web-1", "web", "v3")
    assert target.hbone and target.identity is not None and target.identity.service_account == "web"
    assert not index.by_ip["10.1.0.1"].served
    opted_out = mesh("workload", ns_use="waypoint", pod_use="none")
    assert workload_index(opted_out, WAYPOINT).served == ["10.1.0.1"]
    # Another waypoint's view of the same snapshot serves none of them.
    assert workload_index(snap, WaypointRef("demo", "other")).served == []


def test_the_default_route_to_a_pod_has_no_retries_and_no_timeout() -> None:
    target = workload_index(mesh("workload"), WAYPOINT).by_ip[WEB_2]
    cluster = target.cluster(8080)
    decision = target.decision(cluster)
    assert cluster.name == ENCAP_CLUSTER and (cluster.host, cluster.port) == (WEB_2, 8080)
    assert decision.resilience is not None and decision.resilience.retries.attempts == 0
    assert decision.resilience.timeouts.request is None
    assert decision.rule is None and not decision.mirrors


# --- ztunnel: which traffic goes through the waypoint ---------------------------------------


@pytest.mark.parametrize(("waypoint_for", "service_via", "pod_via"), [
    ("service", True, False), ("workload", False, True), ("all", True, True),
    ("none", False, False)])
def test_waypoint_for_decides_which_traffic_takes_the_waypoint(
        waypoint_for: str, service_via: bool, pod_via: bool) -> None:
    snap = mesh(waypoint_for, service("web", vip=WEB_VIP, labels={USE: "waypoint"},
                                      ports=[{"name": "http", "port": 80,
                                              "targetPort": 8080}]))
    to_service = outbound(snap, WEB_VIP, 80)
    to_pod = outbound(snap, WEB_2, 8080)
    assert isinstance(to_service, ViaWaypoint) is service_via
    assert isinstance(to_pod, ViaWaypoint) is pod_via
    if service_via:
        assert to_service.authority == f"{WEB_VIP}:80"
    else:  # service-addressed never takes the pod's waypoint: straight to an endpoint
        assert isinstance(to_service, ToWorkload) and to_service.authority.endswith(":8080")
    if pod_via:
        assert to_pod.authority == f"{WEB_2}:8080" and to_pod.workload.name == "web-2"
        assert to_pod.expected == frozenset({to_pod.waypoint.identity})
    else:
        assert isinstance(to_pod, ToWorkload) and to_pod.hbone_addr == (WEB_2, 15008)


def test_the_waypoints_own_connection_to_the_pod_is_not_sent_back_to_it() -> None:
    snap = mesh("workload")
    assert isinstance(outbound(snap, WEB_2, 8080), ViaWaypoint)
    from_waypoint = outbound(snap, WEB_2, 8080, source="10.1.9.1")
    assert isinstance(from_waypoint, ToWorkload) and from_waypoint.authority == f"{WEB_2}:8080"


def test_a_pod_outside_the_mesh_with_a_workload_waypoint_still_goes_through_it() -> None:
    # The pods' namespace names the waypoint but is not enrolled: they are not captured,
    # yet a meshed client's ztunnel sends pod-addressed traffic to their waypoint, which
    # then reaches them over plain TCP.
    snap = translate([*(o for o in mesh_objects("workload") if o.kind != "Namespace"),
                      namespace("demo", **{USE: "waypoint"}), namespace("other", **AMBIENT),
                      pod("meshed-client", ns="other", ip="10.1.0.9")])
    assert not snap.workloads_by_ip[WEB_1].captured
    result = outbound(snap, WEB_1, 8080, source="10.1.0.9")
    assert isinstance(result, ViaWaypoint) and result.authority == f"{WEB_1}:8080"
    target = workload_index(snap, WAYPOINT).by_ip[WEB_1]
    assert target.served and not target.hbone
    # Without the label: plain TCP to the pod.
    plain = translate([*(o for o in mesh_objects("workload") if o.kind != "Namespace"),
                       namespace("demo"), namespace("other", **AMBIENT),
                       pod("meshed-client", ns="other", ip="10.1.0.9")])
    assert isinstance(outbound(plain, WEB_1, 8080, source="10.1.0.9"), Passthrough)


# --- the waypoint's pipeline for pod-addressed requests --------------------------------------


class CountingTransport(MemoryTransport):
    """Counts connection attempts per address, refused ones included."""

    def __init__(self, nursery: trio.Nursery, backends: dict[str, FakeBackend]) -> None:
        super().__init__(nursery, backends)
        self.attempts: dict[str, int] = {}

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        key = f"{endpoint.ip}:{endpoint.port}"
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return await super().connect(endpoint, timeout)


DENY_ADMIN = {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                              "name": "waypoint"}],
              "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}
DENY_ALL_ON_SERVICE = {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                       "action": "DENY", "rules": [{}]}

# A bench table where Host "web" routes elsewhere: a pod-addressed request must ignore it.
BENCH = {"services": [{"name": "web", "ports": [8080], "vips": [WEB_VIP],
                       "endpoints": [{"address": "10.7.7.7:8080"}]}]}


async def pod_harness(nursery: trio.Nursery, snap: Snapshot, backends: dict[str, FakeBackend]
                      ) -> tuple[Harness, CountingTransport]:
    harness = Harness(nursery, BENCH, backends)
    transport = CountingTransport(nursery, backends)
    assert isinstance(harness.waypoint.transport, ProtocolTransport)
    harness.waypoint.transport.inner = transport
    await harness.start()
    proxy = harness.waypoint.proxy
    proxy.state = replace(proxy.state, gateway=GatewayRef("demo", "waypoint"),
                          policies=snap.waypoint_policies,
                          workloads=workload_index(snap, WAYPOINT))
    return harness, transport


def to_pod(ip: str, port: int = 8080) -> PeerInfo:
    return PeerInfo(source_ip="10.1.0.1", destination=ip, port=port, destination_ip=ip,
                    source_workload="client", source_namespace="demo")


def echo_path(seen: Seen) -> Answer:
    return Answer(body=seen.head.target)


async def test_pod_addressed_request_goes_to_that_pod_whatever_the_host_header(
        nursery: trio.Nursery) -> None:
    pod2 = FakeBackend("web-2", echo_path)
    elsewhere = FakeBackend("elsewhere")
    harness, transport = await pod_harness(nursery, mesh("workload"),
                                           {f"{WEB_2}:8080": pod2, "10.7.7.7:8080": elsewhere})
    client = harness.client(to_pod(WEB_2))
    first = await client.request("/hello?x=1", host="web")
    second = await client.request("/again", host=f"{WEB_2}:8080")
    assert (first.status, first.body, first.headers["x-backend"]) == (200, b"/hello?x=1", "web-2")
    assert second.status == 200 and second.body == b"/again"
    assert "x-envoy-upstream-service-time" in first.headers
    assert not elsewhere.seen
    assert [s.header("host") for s in pod2.seen] == ["web", f"{WEB_2}:8080"]
    assert pod2.seen[0].header("x-envoy-attempt-count") == "1"
    # One keep-alive upstream connection served both.
    assert transport.attempts == {f"{WEB_2}:8080": 1}
    metrics = harness.waypoint.metrics
    assert metrics.total(destination_workload="web", destination_version="v3",
                         destination_service="unknown", response_code="200") == 2


async def test_pod_not_using_this_waypoint_is_answered_404_without_host_routing(
        nursery: trio.Nursery) -> None:
    snap = mesh("workload", ns_use=None, pod_use="waypoint")
    elsewhere = FakeBackend("elsewhere")
    harness, transport = await pod_harness(nursery, snap, {"10.7.7.7:8080": elsewhere})
    reply = await harness.client(to_pod("10.1.0.1")).request("/", host="web")
    assert reply.status == 404
    assert not elsewhere.seen and not transport.attempts


async def test_tcp_pass_through_to_a_pod_follows_its_waypoint_and_the_waypoints_policy(
        nursery: trio.Nursery) -> None:
    snap = mesh("workload", ns_use=None, pod_use="waypoint")
    harness, _ = await pod_harness(nursery, snap, {})
    proxy = harness.waypoint.proxy
    assert proxy.tcp_refusal(WEB_1, 5432) is None
    refusal = proxy.tcp_refusal("10.1.0.1", 5432)
    assert refusal is not None and "demo/client does not use this waypoint" in refusal
    guarded = mesh("workload", authorization_policy("deny-admin", "demo", DENY_ADMIN),
                   ns_use=None, pod_use="waypoint")
    proxy.state = replace(proxy.state, policies=guarded.waypoint_policies,
                          workloads=workload_index(guarded, WAYPOINT))
    refusal = proxy.tcp_refusal(WEB_1, 5432)
    assert refusal is not None and "HTTP authorization" in refusal


async def test_waypoint_policy_applies_to_pod_addressed_requests_service_policy_does_not(
        nursery: trio.Nursery) -> None:
    snap = mesh("workload", authorization_policy("deny-admin", "demo", DENY_ADMIN),
                authorization_policy("deny-web-service", "demo", DENY_ALL_ON_SERVICE))
    pod1 = FakeBackend("web-1", echo_path)
    harness, _ = await pod_harness(nursery, snap, {f"{WEB_1}:8080": pod1})
    client = harness.client(to_pod(WEB_1))
    denied = await client.request("/admin/x", host="web")
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    allowed = await client.request("/public", host="web")
    assert allowed.status == 200 and allowed.body == b"/public"
    assert [s.head.target for s in pod1.seen] == [b"/public"]


async def test_a_failed_connect_to_the_pod_is_not_retried(nursery: trio.Nursery) -> None:
    down = FakeBackend("web-2")
    down.refuse = True
    harness, transport = await pod_harness(nursery, mesh("workload"), {f"{WEB_2}:8080": down})
    reply = await harness.client(to_pod(WEB_2)).request("/")
    assert reply.status == 503 and b"connection failure" in reply.body
    assert transport.attempts == {f"{WEB_2}:8080": 1}


async def test_direct_clusters_follow_the_snapshot_and_stay_bounded(
        nursery: trio.Nursery) -> None:
    backends = {f"{WEB_1}:{p}": FakeBackend(f"p{p}") for p in (8080, 8081, 8082)}
    transport = MemoryTransport(nursery, backends)
    direct = DirectClusters(max_entries=2)
    index = workload_index(mesh("workload"), WAYPOINT)
    target = index.by_ip[WEB_1]
    state, decision = await direct.get(index, target, 8080, transport)
    again, _ = await direct.get(index, target, 8080, transport)
    assert again is state and decision.cluster is not None
    assert list(state.endpoints) == [f"{WEB_1}:8080"]
    await direct.get(index, target, 8081, transport)
    await direct.get(index, target, 8082, transport)
    assert len(direct) == 2  # the oldest (8080) was dropped
    fresh, _ = await direct.get(index, target, 8080, transport)
    assert fresh is not state
    # A new snapshot where the pod no longer uses the waypoint drops its entries.
    gone = workload_index(mesh("service"), WAYPOINT)
    other = workload_index(mesh("workload"), WAYPOINT).by_ip[WEB_2]
    await direct.get(gone, other, 9000, transport)
    assert len(direct) == 1
    # An unchanged pod in a newer snapshot keeps its state (and its pooled connections).
    newer = workload_index(mesh("workload"), WAYPOINT)
    kept, _ = await direct.get(newer, newer.by_ip[WEB_2], 9000, transport)
    latest = workload_index(mesh("workload"), WAYPOINT)
    assert (await direct.get(latest, latest.by_ip[WEB_2], 9000, transport))[0] is kept
    assert EMPTY_WORKLOADS.served == [] and not EMPTY_WORKLOADS
