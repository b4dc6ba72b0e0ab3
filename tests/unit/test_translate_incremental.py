"""The incremental translator agrees with a translation from scratch, whatever the event order.

Hypothesis draws sequences of upserts, deletes, re-lists and snapshots over a small
universe of objects chosen to collide (shared IPs and VIPs, waypoints appearing and
disappearing under the pods and services that name them, nodes changing zones); after
every sequence, the snapshot built step by step must equal the one built from the final
objects in one go.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common.kube.objects import Resource
from common.model import Snapshot, WaypointRef
from common.translate import MeshTranslator, translate
from tests.unit.mesh_objects import (
    authorization_policy,
    endpoint,
    endpoint_slice,
    namespace,
    node,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)

NAMESPACES = ("demo", "demo", "demo", "other")
NODES = ("node-1", "node-2")
POD_IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3")
VIPS = ("10.96.0.1", "10.96.0.2", None)
WAYPOINT_NAMES = ("waypoint", "east")



def labels(draw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    mode = draw(st.sampled_from((None, "ambient", "none")))
    if mode:
        out["istio.io/dataplane-mode"] = mode
    use = draw(st.sampled_from((None, "none", *WAYPOINT_NAMES)))
    if use:
        out["istio.io/use-waypoint"] = use
    return out


@st.composite
def objects(draw: st.DrawFn) -> Resource:
    kind = draw(st.sampled_from(("Namespace", "Node", "Pod", "WaypointPod", "Service",
                                 "EndpointSlice", "Gateway", "AuthorizationPolicy")))
    ns = draw(st.sampled_from(NAMESPACES))
    if kind == "Namespace":
        return namespace(ns, **labels(draw))
    if kind == "Node":
        return node(draw(st.sampled_from(NODES)), "eu", draw(st.sampled_from(("a", "b", ""))))
    if kind == "Pod":
        return pod(f"p{draw(st.integers(0, 3))}", ns, draw(st.sampled_from((*POD_IPS, None))),
                   draw(st.sampled_from(NODES)), labels=labels(draw),
                   phase=draw(st.sampled_from(("Running", "Pending", "Succeeded"))),
                   ports={"http": draw(st.sampled_from((8080, 9090)))})
    if kind == "WaypointPod":
        return waypoint_pod(f"w{draw(st.integers(0, 1))}", draw(st.sampled_from(WAYPOINT_NAMES)),
                            ns, draw(st.sampled_from(POD_IPS)), draw(st.sampled_from(NODES)))
    if kind == "Service":
        name = draw(st.sampled_from(("web", "db", *WAYPOINT_NAMES)))
        return service(name, ns, draw(st.sampled_from(VIPS)), labels=labels(draw))
    if kind == "EndpointSlice":
        eps = [endpoint(ip, ns=ns, ready=draw(st.booleans()), node_name=draw(
            st.sampled_from(NODES))) for ip in draw(st.lists(st.sampled_from(POD_IPS),
                                                             max_size=2))]
        return endpoint_slice(draw(st.sampled_from(("web", "db"))), eps, ns,
                              name=f"slice-{draw(st.integers(0, 2))}")
    if kind == "Gateway":
        return waypoint_gateway(draw(st.sampled_from(WAYPOINT_NAMES)), ns,
                                draw(st.sampled_from((None, "service", "workload", "all",
                                                      "bad"))))
    return authorization_policy("p", ns, draw(st.sampled_from((
        {"action": "DENY", "rules": [{}]}, {"action": "ALLOW", "rules": [{"x": 1}]}))))



step = st.one_of(
    st.tuples(st.just("upsert"), objects()),
    st.tuples(st.just("delete"), objects()),
    st.tuples(st.just("snapshot"), st.none()),
    st.tuples(st.just("relist"), st.sampled_from(("Pod", "Service", "Gateway", "Namespace"))),
)


def comparable(snap: Snapshot) -> dict[str, Any]:
    return {
        "by_ip": snap.workloads_by_ip, "by_uid": snap.workloads_by_uid,
        "by_node": snap.workloads_by_node, "by_vip": snap.services_by_vip,
        "by_host": snap.services_by_host, "services": snap.services_by_key,
        "waypoints": snap.waypoints_by_ref, "namespaces": snap.namespaces,
        "issues": snap.issues,
    }


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=40))
def test_incremental_snapshot_equals_translation_from_scratch(
        steps: list[tuple[str, Any]]) -> None:
    tr = MeshTranslator()
    current: dict[tuple[str, str, str], Resource] = {}
    for op, arg in steps:
        if op == "snapshot":
            tr.snapshot()
            continue
        if op == "relist":
            # A re-list hands back every object of the kind, some of them unchanged.
            tr.replace(arg, [o for (k, _, _), o in current.items() if k == arg])
            continue
        key = (arg.kind, arg.metadata.namespace or "", arg.metadata.name)
        if op == "upsert":
            current[key] = arg
            tr.upsert(arg.kind, arg)
        else:
            current.pop(key, None)
            tr.delete(arg.kind, arg)
    assert comparable(tr.snapshot()) == comparable(translate(current.values()))


def test_unchanged_relist_leaves_nothing_to_do() -> None:
    tr = MeshTranslator()
    pods = [pod("a"), pod("b", ip="10.1.0.2")]
    tr.replace("Pod", pods)
    first = tr.snapshot()
    tr.replace("Pod", pods)
    assert not tr.pending
    second = tr.snapshot()
    assert second.workloads_by_ip == first.workloads_by_ip
    assert second.version == first.version + 1


# --- each dependency edge, one change after a snapshot ----------------------------------------

WP = WaypointRef("demo", "waypoint")
USE = "istio.io/use-waypoint"


def settled(*objs: Resource) -> MeshTranslator:
    tr = MeshTranslator()
    for obj in objs:
        tr.upsert(obj.kind, obj)
    tr.snapshot()
    return tr


def test_waypoint_appearing_changing_and_going_updates_its_users() -> None:
    tr = settled(namespace("demo"), pod("a", labels={USE: "waypoint"}),
                 service("web", labels={USE: "waypoint"}))
    gw = waypoint_gateway(waypoint_for="all")
    tr.upsert("Gateway", gw)
    snap = tr.snapshot()
    assert snap.workloads_by_ip["10.1.0.1"].waypoint == WP
    assert snap.services_by_key[("demo", "web")].waypoint == WP
    tr.upsert("Gateway", waypoint_gateway(waypoint_for="service"))
    snap = tr.snapshot()
    assert snap.workloads_by_ip["10.1.0.1"].waypoint is None
    assert snap.services_by_key[("demo", "web")].waypoint == WP
    tr.delete("Gateway", gw)
    snap = tr.snapshot()
    assert snap.services_by_key[("demo", "web")].waypoint is None


def test_namespace_label_moves_its_services_to_a_waypoint() -> None:
    tr = settled(namespace("demo"), waypoint_gateway(), service("web"))
    tr.upsert("Namespace", namespace("demo", **{USE: "waypoint"}))
    assert tr.snapshot().services_by_key[("demo", "web")].waypoint == WP


def test_waypoint_service_is_marked_when_its_gateway_appears_and_its_vip_follows() -> None:
    tr = settled(service("waypoint", vip="10.96.9.9"))
    tr.upsert("Gateway", waypoint_gateway())
    snap = tr.snapshot()
    assert snap.services_by_key[("demo", "waypoint")].waypoint_of == WP
    assert snap.waypoints_by_ref[WP].vips == ("10.96.9.9",)
    tr.upsert("Service", service("waypoint", vip="10.96.9.8"))
    assert tr.snapshot().waypoints_by_ref[WP].vips == ("10.96.9.8",)


def test_waypoint_pods_becoming_ready_or_moving_to_another_gateway() -> None:
    tr = settled(waypoint_gateway(), waypoint_gateway("east"),
                 pod("w", ip="10.1.9.1", phase="Pending",
                     labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}))
    tr.upsert("Pod", waypoint_pod("w", ip="10.1.9.1"))
    assert [e.ip for e in tr.snapshot().waypoints_by_ref[WP].endpoints] == ["10.1.9.1"]
    tr.upsert("Pod", waypoint_pod("w", "east", ip="10.1.9.1"))
    snap = tr.snapshot()
    assert snap.waypoints_by_ref[WP].endpoints == ()
    assert [e.ip for e in snap.waypoints_by_ref[WaypointRef("demo", "east")].endpoints] == \
        ["10.1.9.1"]


def test_node_zone_change_reaches_workloads_endpoints_and_waypoints() -> None:
    tr = settled(node("node-1", "eu", "a"), pod("a"), waypoint_gateway(),
                 waypoint_pod("w", ip="10.1.9.1"), service("web"),
                 endpoint_slice("web", [endpoint("10.1.0.1", "a")]))
    tr.upsert("Node", node("node-1", "eu", "b"))
    snap = tr.snapshot()
    assert snap.workloads_by_ip["10.1.0.1"].locality.zone == "b"
    assert snap.services_by_key[("demo", "web")].endpoints[0].locality.zone == "b"
    assert snap.waypoints_by_ref[WP].endpoints[0].locality.zone == "b"


def test_slice_changes_and_pod_ip_changes_reindex() -> None:
    tr = settled(service("web"), endpoint_slice("web", [endpoint("10.1.0.1")]), pod("a"))
    tr.upsert("EndpointSlice", endpoint_slice("web", [endpoint("10.1.0.2", ready=False)]))
    tr.upsert("Pod", pod("a", ip="10.1.0.2"))
    snap = tr.snapshot()
    web = snap.services_by_key[("demo", "web")]
    assert [(e.ip, e.ready) for e in web.endpoints] == [("10.1.0.2", False)]
    assert web.ready_endpoints == ()
    assert set(snap.workloads_by_ip) == {"10.1.0.2"}
    tr.delete("Pod", pod("a"))
    assert tr.snapshot().workloads_by_ip == {}
