"""ztunnel's connection decisions on a small mesh: outbound branches, locality, inbound checks."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from common.identity import SpiffeId
from common.kube.objects import Resource, Service
from common.model import HBONE_PORT, Snapshot, WaypointRef, Workload
from common.translate import translate
from tests.unit.mesh_objects import (
    authorization_policy,
    endpoint,
    endpoint_slice,
    namespace,
    node,
    peer_authentication,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)
from ztunnel.decide import (
    Allow,
    Deny,
    Passthrough,
    Refused,
    ToWorkload,
    ViaWaypoint,
    decide_inbound,
    decide_outbound,
    format_authority,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
USE = "istio.io/use-waypoint"
WEB_VIP = "10.96.0.10"
TD = "cluster.local"


def base_objects() -> list[Resource]:
    return [
        namespace("demo", **AMBIENT), namespace("plain"),
        node("n1", "eu", "a"), node("n2", "eu", "b"), node("n3", "us", "c"),
        pod("client", ip="10.1.0.1", node_name="n1", sa="client"),
        pod("far-client", ip="10.1.0.2", node_name="n3"),
        pod("nowhere-client", ip="10.1.0.3", node_name="unlabelled"),
        *(pod(f"web-{i}", ip=f"10.1.1.{i}", node_name=f"n{i}", sa="web",
              labels={"app": "web"}, ports={"http": 8080}) for i in (1, 2, 3)),
        service("web", vip=WEB_VIP, ports=[{"name": "http", "port": 80, "targetPort": "http"}]),
        endpoint_slice("web", [endpoint(f"10.1.1.{i}", f"web-{i}", node_name=f"n{i}")
                               for i in (1, 2, 3)]),
        pod("legacy", ns="plain", ip="10.2.0.1", node_name="n2"),
        service("legacy", ns="plain", vip="10.96.0.20"),
        endpoint_slice("legacy", [endpoint("10.2.0.1", "legacy", ns="plain", node_name="n2")],
                       ns="plain"),
    ]


def mesh(*extra: Resource, drop: tuple[str, ...] = ()) -> Snapshot:
    objs = [o for o in base_objects() if o.metadata.name not in drop]
    return translate([*objs, *extra])


def src(snap: Snapshot, ip: str = "10.1.0.1") -> Workload:
    return snap.workloads_by_ip[ip]


def out(snap: Snapshot, dst: str, port: int, source: str = "10.1.0.1", seed: int = 0) -> Any:
    return decide_outbound(snap, src(snap, source), dst, port, random.Random(seed))


def with_waypoint(waypoint_for: str = "service", name: str = "waypoint") -> list[Resource]:
    return [waypoint_gateway(name, waypoint_for=waypoint_for),
            waypoint_pod(f"{name}-1", name, ip="10.1.9.1" if name == "waypoint" else "10.1.9.2",
                         node_name="n2")]


# --- outbound ----------------------------------------------------------------------------


def test_service_vip_to_captured_endpoint_goes_over_hbone_to_the_pod() -> None:
    result = out(mesh(web_service(PREFER_CLOSE)), WEB_VIP, 80)  # the client's zone: web-1
    assert isinstance(result, ToWorkload)
    assert result.hbone_addr == ("10.1.1.1", HBONE_PORT)
    assert result.authority == "10.1.1.1:8080"  # named targetPort resolved by the slice
    assert result.expected == frozenset({SpiffeId(TD, "demo", "web")})
    assert result.workload.name == "web-1" and result.service is not None


def test_service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() -> None:
    snap = mesh(*with_waypoint(), service("web", vip=WEB_VIP, labels={USE: "waypoint"},
                                          ports=[{"name": "http", "port": 80,
                                                  "targetPort": "http"}]))
    result = out(snap, WEB_VIP, 80)
    assert isinstance(result, ViaWaypoint)
    assert result.hbone_addr == ("10.1.9.1", HBONE_PORT)
    assert result.authority == f"{WEB_VIP}:80"
    assert result.expected == frozenset({SpiffeId(TD, "demo", "waypoint")})
    assert result.waypoint.ref == WaypointRef("demo", "waypoint") and result.workload is None
    # The waypoint's own connection to the VIP is not sent back to itself.
    again = out(snap, WEB_VIP, 80, source="10.1.9.1")
    assert isinstance(again, ToWorkload) and again.authority.endswith(":8080")


def test_pod_addressed_traffic_goes_to_the_pods_workload_waypoint_with_the_pod_as_authority(
        ) -> None:
    snap = mesh(*with_waypoint("workload"), namespace("demo", **AMBIENT, **{USE: "waypoint"}))
    direct = out(snap, "10.1.1.2", 8080)
    assert isinstance(direct, ViaWaypoint) and direct.authority == "10.1.1.2:8080"
    assert direct.workload is not None and direct.workload.name == "web-2"
    assert direct.service is None
    # From the waypoint itself: straight to the pod.
    from_waypoint = out(snap, "10.1.1.2", 8080, source="10.1.9.1")
    assert isinstance(from_waypoint, ToWorkload) and from_waypoint.authority == "10.1.1.2:8080"
    # Service-addressed traffic never takes a pod's waypoint (Istio's ztunnel).
    via_service = out(snap, WEB_VIP, 80)
    assert isinstance(via_service, ToWorkload) and via_service.authority.endswith(":8080")


def test_service_waypoint_then_straight_to_a_pod_that_has_its_own_workload_waypoint() -> None:
    snap = mesh(*with_waypoint("service"), *with_waypoint("workload", name="east"),
                service("web", vip=WEB_VIP, labels={USE: "waypoint"},
                        ports=[{"name": "http", "port": 80, "targetPort": "http"}]),
                *(pod(f"web-{i}", ip=f"10.1.1.{i}", node_name=f"n{i}", sa="web",
                      labels={"app": "web", USE: "east"}, ports={"http": 8080})
                  for i in (1, 2, 3)))
    first = out(snap, WEB_VIP, 80)
    assert isinstance(first, ViaWaypoint) and first.waypoint.name == "waypoint"
    second = out(snap, WEB_VIP, 80, source="10.1.9.1")
    assert isinstance(second, ToWorkload) and second.authority.endswith(":8080")
    # Dialled by its IP, the same pod goes through its own waypoint.
    third = out(snap, "10.1.1.3", 8080)
    assert isinstance(third, ViaWaypoint) and third.waypoint.name == "east"


def test_endpoint_outside_the_mesh_is_passthrough_to_its_target_port() -> None:
    result = out(mesh(), "10.96.0.20", 80)
    assert isinstance(result, Passthrough) and result.addr == ("10.2.0.1", 8080)
    assert "not in the mesh" in result.reason and result.service is not None


def test_pod_ip_destinations() -> None:
    snap = mesh()
    direct = out(snap, "10.1.1.3", 9000)
    assert isinstance(direct, ToWorkload)
    assert direct.hbone_addr == ("10.1.1.3", HBONE_PORT) and direct.authority == "10.1.1.3:9000"
    assert direct.service is None
    plain = out(snap, "10.2.0.1", 5432)
    assert isinstance(plain, Passthrough) and plain.addr == ("10.2.0.1", 5432)


def test_unknown_destination_is_passthrough_outside_the_mesh() -> None:
    result = out(mesh(), "93.184.216.34", 443)
    assert isinstance(result, Passthrough) and result.addr == ("93.184.216.34", 443)
    assert "outside the mesh" in result.reason


def test_service_without_ready_endpoints_is_refused_with_a_reason_saying_so() -> None:
    snap = mesh(endpoint_slice("web", [endpoint("10.1.1.1", "web-1", ready=False)]))
    result = out(snap, WEB_VIP, 80)
    assert isinstance(result, Refused) and "no ready endpoints" in result.reason
    assert "1 endpoints, none ready" in result.reason
    empty = out(mesh(endpoint_slice("web", [])), WEB_VIP, 80)
    assert isinstance(empty, Refused) and "no endpoints" in empty.reason


def test_unknown_service_port_is_refused() -> None:
    result = out(mesh(), WEB_VIP, 81)
    assert isinstance(result, Refused) and "no port 81" in result.reason and "80" in result.reason


def test_waypoint_without_ready_pods_is_refused() -> None:
    snap = mesh(waypoint_gateway(), namespace("demo", **AMBIENT, **{USE: "waypoint"}))
    result = out(snap, WEB_VIP, 80)
    assert isinstance(result, Refused) and "no ready pods" in result.reason


def test_named_target_port_missing_from_the_slice_comes_from_the_pod() -> None:
    snap = mesh(endpoint_slice("web", [endpoint("10.1.1.1", "web-1", node_name="n1")],
                               ports={}))
    result = out(snap, WEB_VIP, 80)
    assert isinstance(result, ToWorkload) and result.authority == "10.1.1.1:8080"


def test_unresolvable_named_target_port_is_refused() -> None:
    snap = mesh(service("web", vip=WEB_VIP, ports=[{"name": "http", "port": 80,
                                                    "targetPort": "grpc"}]),
                endpoint_slice("web", [endpoint("10.1.1.1", "web-1")], ports={}))
    result = out(snap, WEB_VIP, 80)
    assert isinstance(result, Refused) and "'grpc'" in result.reason


def picks(snap: Snapshot, source: str, n: int = 200) -> Counter[str]:
    seen: Counter[str] = Counter()
    rng = random.Random(7)
    for _ in range(n):
        result = decide_outbound(snap, src(snap, source), WEB_VIP, 80, rng)
        assert isinstance(result, ToWorkload)
        seen[result.workload.name] += 1
    return seen


def web_service(spec: dict[str, Any] | None = None,
                annotations: dict[str, str] | None = None) -> Service:
    """The base mesh's ``web`` Service with extra spec fields or annotations."""
    return Service.model_validate({
        "metadata": {"name": "web", "namespace": "demo", "annotations": annotations or {}},
        "spec": {"clusterIP": WEB_VIP, "clusterIPs": [WEB_VIP], "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                 **(spec or {})}})


PREFER_CLOSE = {"trafficDistribution": "PreferClose"}


def test_endpoint_choice_spreads_over_every_zone_by_default() -> None:
    for source in ("10.1.0.1", "10.1.0.2", "10.1.0.3"):
        spread = picks(mesh(), source)
        assert set(spread) == {"web-1", "web-2", "web-3"} and min(spread.values()) > 40


def test_prefer_close_endpoint_choice_prefers_zone_then_region_then_any() -> None:
    snap = mesh(web_service(PREFER_CLOSE))
    assert picks(snap, "10.1.0.1") == {"web-1": 200}        # eu/a: same zone
    assert picks(snap, "10.1.0.2") == {"web-3": 200}        # us/c
    spread = picks(snap, "10.1.0.3")                        # no locality: uniform
    assert set(spread) == {"web-1", "web-2", "web-3"} and min(spread.values()) > 40
    no_zone_a = mesh(web_service(PREFER_CLOSE), endpoint_slice("web", [
        endpoint("10.1.1.1", "web-1", node_name="n1", ready=False),
        endpoint("10.1.1.2", "web-2", node_name="n2"),
        endpoint("10.1.1.3", "web-3", node_name="n3")]))
    assert picks(no_zone_a, "10.1.0.1") == {"web-2": 200}   # eu/a down: eu/b next


@pytest.mark.parametrize(("spec", "annotations", "close"), [
    ({"trafficDistribution": "PreferSameZone"}, None, True),
    (None, {"networking.istio.io/traffic-distribution": "preferclose"}, True),
    # The spec field, when set, wins over the annotation (as istiod reads them).
    ({"trafficDistribution": "PreferSameNode"},
     {"networking.istio.io/traffic-distribution": "PreferClose"}, False),
    (None, {"networking.istio.io/traffic-distribution": "Any"}, False),
])
def test_traffic_distribution_is_read_from_the_spec_then_the_annotation(
        spec: dict[str, Any] | None, annotations: dict[str, str] | None, close: bool) -> None:
    snap = mesh(web_service(spec, annotations))
    assert snap.services_by_vip[WEB_VIP].prefer_close is close
    assert (picks(snap, "10.1.0.1") == {"web-1": 200}) is close


def test_waypoint_pod_choice_prefers_the_sources_zone() -> None:
    snap = mesh(waypoint_gateway(), waypoint_pod("wp-a", ip="10.1.9.1", node_name="n1"),
                waypoint_pod("wp-c", ip="10.1.9.3", node_name="n3"),
                namespace("demo", **AMBIENT, **{USE: "waypoint"}))
    for seed in range(20):
        near = out(snap, WEB_VIP, 80, seed=seed)
        assert isinstance(near, ViaWaypoint) and near.hbone_addr[0] == "10.1.9.1"


def test_rng_decides_among_equals_reproducibly() -> None:
    snap = mesh()
    first = [out(snap, WEB_VIP, 80, source="10.1.0.3", seed=s).workload.name for s in range(10)]
    second = [out(snap, WEB_VIP, 80, source="10.1.0.3", seed=s).workload.name for s in range(10)]
    assert first == second and len(set(first)) > 1


def test_ipv6_authorities_are_bracketed() -> None:
    assert format_authority("fd00::1", 8080) == "[fd00::1]:8080"
    assert format_authority("10.0.0.1", 80) == "10.0.0.1:80"
    snap = translate([namespace("demo", **AMBIENT), pod("a", ip="fd00::1"),
                      pod("b", ip="fd00::2")])
    result = decide_outbound(snap, snap.workloads_by_ip["fd00::1"], "fd00::2", 80,
                             random.Random(0))
    assert isinstance(result, ToWorkload) and result.authority == "[fd00::2]:80"


# --- inbound -----------------------------------------------------------------------------

PEER_DEMO = SpiffeId(TD, "demo", "client")
PEER_OTHER = SpiffeId(TD, "other", "client")


def inbound(snap: Snapshot, authority: str = "10.1.1.1", port: int = 8080,
            peer: SpiffeId | None = PEER_DEMO, source: str = "10.1.0.1",
            plaintext: bool = False) -> Any:
    return decide_inbound(snap, snap.workloads_by_ip["10.1.1.1"], authority, port, peer,
                          source, plaintext)


def test_inbound_allows_without_policy() -> None:
    result = inbound(mesh())
    assert isinstance(result, Allow) and result.port == 8080 and result.workload.name == "web-1"


def test_inbound_authority_must_be_the_pods_ip() -> None:
    result = inbound(mesh(), authority="10.1.1.2")
    assert isinstance(result, Deny) and result.status == 400
    assert "10.1.1.2:8080" in result.reason and "demo/web-1" in result.reason


def test_inbound_bad_source_address_is_a_bad_request() -> None:
    result = inbound(mesh(), source="not-an-ip")
    assert isinstance(result, Deny) and result.status == 400


@pytest.mark.parametrize(("mode", "plaintext", "allowed"), [
    ("STRICT", True, False), ("STRICT", False, True), ("PERMISSIVE", True, True),
    ("DISABLE", True, True),
])
def test_inbound_peer_authentication(mode: str, plaintext: bool, allowed: bool) -> None:
    snap = mesh(peer_authentication("default", "demo", mode))
    result = inbound(snap, plaintext=plaintext, peer=None if plaintext else PEER_DEMO)
    assert isinstance(result, Allow) is allowed
    if not allowed:
        assert result.status == 401 and "STRICT" in result.reason


@pytest.mark.parametrize(("peer", "allowed"), [(PEER_DEMO, False), (PEER_OTHER, True),
                                               (None, True)])
def test_inbound_deny_policy_by_principal(peer: SpiffeId | None, allowed: bool) -> None:
    snap = mesh(authorization_policy("deny-client", "demo", {
        "action": "DENY", "rules": [{"from": [{"source": {
            "principals": ["cluster.local/ns/demo/sa/client"]}}]}]}))
    result = inbound(snap, peer=peer, plaintext=peer is None)
    assert isinstance(result, Allow) is allowed
    if not allowed:
        assert result.status == 401 and result.policy == "demo/deny-client"
        assert "denied" in result.reason


@pytest.mark.parametrize(("peer", "allowed"), [(PEER_DEMO, False), (PEER_OTHER, True),
                                               (None, False)])
def test_inbound_allow_policy_by_namespace(peer: SpiffeId | None, allowed: bool) -> None:
    snap = mesh(authorization_policy("from-other", "demo", {
        "selector": {"matchLabels": {"app": "web"}},
        "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}))
    result = inbound(snap, peer=peer, plaintext=peer is None)
    assert isinstance(result, Allow) is allowed
    if not allowed:
        assert result.status == 401 and result.policy is None
