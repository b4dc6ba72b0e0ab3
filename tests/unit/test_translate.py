"""API objects -> Snapshot: enrolment, waypoint use, ports, endpoints, locality, issues."""

from __future__ import annotations

from typing import Any

import pytest

from common.identity import SpiffeId
from common.kube.objects import Resource
from common.model import Locality, Severity, Snapshot, TrafficType, WaypointRef
from common.translate import MeshTranslator, translate
from tests.unit.mesh_objects import (
    authorization_policy,
    endpoint,
    endpoint_slice,
    http_route,
    namespace,
    node,
    peer_authentication,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)

MODE = "istio.io/dataplane-mode"
USE = "istio.io/use-waypoint"
WP = WaypointRef("demo", "waypoint")



def build(*objects: Resource, **kwargs: Any) -> Snapshot:
    return translate(objects, **kwargs)


# --- enrolment ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ns_mode", "pod_mode", "captured"), [
    ("ambient", None, True),
    ("ambient", "none", False),
    (None, "ambient", True),
    (None, None, False),
    ("none", "ambient", True),
    ("ambient", "sidecar", True),  # only "none" opts a pod out of an ambient namespace
    (None, "none", False),
])
def test_enrolment_by_namespace_or_pod_label(ns_mode: str | None, pod_mode: str | None,
                                             captured: bool) -> None:
    ns = namespace("demo", **({MODE: ns_mode} if ns_mode else {}))
    snap = build(ns, pod("a", labels={MODE: pod_mode} if pod_mode else {}))
    assert snap.workloads_by_ip["10.1.0.1"].captured is captured


def test_waypoint_and_host_network_pods_are_never_captured() -> None:
    snap = build(namespace("demo", **{MODE: "ambient"}), waypoint_pod("wp", ip="10.1.9.1"),
                 pod("host", ip="192.168.0.2", host_network=True),
                 pod("labelled", ip="10.1.0.3", labels={MODE: "ambient"}, host_network=True))
    wp = snap.workloads_by_ip["10.1.9.1"]
    assert not wp.captured and wp.is_waypoint and wp.gateway == WP
    host = snap.workloads_by_uid["uid-demo-host"]
    assert not host.captured
    # A host-network pod's IP is its node's: it must not shadow anything in the IP index.
    assert "192.168.0.2" not in snap.workloads_by_ip
    assert not snap.workloads_by_uid["uid-demo-labelled"].captured


def test_relabelling_the_namespace_releases_and_enrols_its_pods() -> None:
    tr = MeshTranslator()
    tr.upsert("Namespace", namespace("demo", **{MODE: "ambient"}))
    tr.upsert("Namespace", namespace("other"))
    tr.upsert("Pod", pod("a"))
    tr.upsert("Pod", pod("b", ns="other", ip="10.1.0.2"))
    first = tr.snapshot()
    assert first.workloads_by_ip["10.1.0.1"].captured
    tr.upsert("Namespace", namespace("demo"))
    second = tr.snapshot()
    assert not second.workloads_by_ip["10.1.0.1"].captured
    assert second.workloads_by_ip["10.1.0.2"] is first.workloads_by_ip["10.1.0.2"]
    assert first.workloads_by_ip["10.1.0.1"].captured  # the old snapshot is untouched


# --- workload fields ---------------------------------------------------------------------


def test_workload_fields_from_pod_node_and_config() -> None:
    snap = build(
        namespace("demo"), node("node-1", "eu", "eu-a", "rack1"),
        pod("a", sa="reviews", labels={"app": "a"}, ports={"http": 8080, "grpc": 9090},
            annotations={"pyambient.io/netns": "/run/netns/pod-a"}),
        trust_domain="example.org")
    wl = snap.workloads_by_ip["10.1.0.1"]
    assert wl.identity == SpiffeId("example.org", "demo", "reviews")
    assert wl.locality == Locality("eu", "eu-a", "rack1")
    assert wl.netns == "/run/netns/pod-a"
    assert wl.named_ports == {"http": 8080, "grpc": 9090}
    assert wl.ready and wl.node == "node-1" and wl.ips == ("10.1.0.1",)
    assert wl.authz_ref.namespace == "demo" and dict(wl.authz_ref.labels) == {"app": "a"}
    assert snap.workloads_by_node == {"node-1": ("uid-demo-a",)}
    assert snap.node_workloads("node-1") == (wl,)
    assert snap.workloads_by_uid["uid-demo-a"] is wl


def test_default_service_account_and_unknown_node_locality() -> None:
    wl = build(pod("a", node_name="ghost")).workloads_by_ip["10.1.0.1"]
    assert wl.service_account == "default" and wl.locality == Locality()


@pytest.mark.parametrize(("phase", "ip", "ready_condition", "ready"), [
    ("Running", "10.1.0.1", None, True),
    ("Running", "10.1.0.1", True, True),
    ("Running", "10.1.0.1", False, False),
    ("Pending", "10.1.0.1", None, False),
    ("Running", None, None, False),
])
def test_readiness(phase: str, ip: str | None, ready_condition: bool | None,
                   ready: bool) -> None:
    snap = build(pod("a", ip=ip, phase=phase, ready=ready_condition))
    assert snap.workloads_by_uid["uid-demo-a"].ready is ready


def test_terminal_pods_do_not_hold_their_ip() -> None:
    snap = build(pod("old", phase="Succeeded"), pod("new", phase="Running"))
    assert snap.workloads_by_ip["10.1.0.1"].name == "new"
    assert "uid-demo-old" not in snap.workloads_by_uid


def test_a_ready_pod_wins_an_ip_over_a_pending_one() -> None:
    snap = build(pod("a-pending", phase="Pending"), pod("b-running"))
    assert snap.workloads_by_ip["10.1.0.1"].name == "b-running"


def test_invalid_service_account_is_an_issue_and_the_pod_is_left_out() -> None:
    snap = build(pod("a", sa="Bad_Name"), pod("b", ip="10.1.0.2"))
    assert "10.1.0.1" not in snap.workloads_by_ip and "10.1.0.2" in snap.workloads_by_ip
    [issue] = snap.issues
    assert (issue.kind, issue.name, issue.severity) == ("Pod", "a", Severity.ERROR)
    assert "Bad_Name" in issue.message


# --- waypoints ---------------------------------------------------------------------------


def test_waypoint_from_gateway_and_its_ready_pods() -> None:
    snap = build(namespace("demo"), node("node-2", "eu", "eu-b"),
                 waypoint_gateway(waypoint_for="all"),
                 waypoint_pod("wp-1", ip="10.1.9.1", node_name="node-2", sa="wp-sa"),
                 pod("wp-2", ip="10.1.9.2", phase="Pending",
                     labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}),
                 service("waypoint", vip="10.96.9.9",
                         ports=[{"name": "mesh", "port": 15008}]))
    wp = snap.waypoints_by_ref[WP]
    assert wp.traffic_type is TrafficType.ALL
    assert [e.ip for e in wp.endpoints] == ["10.1.9.1"]
    assert wp.endpoints[0].locality == Locality("eu", "eu-b")
    assert wp.identity == SpiffeId("cluster.local", "demo", "wp-sa")
    assert wp.vips == ("10.96.9.9",)
    own = snap.services_by_vip["10.96.9.9"]
    assert own.waypoint_of == WP and own.waypoint is None


def test_waypoint_identity_before_any_pod_is_named_after_the_gateway() -> None:
    wp = build(waypoint_gateway("east")).waypoints_by_ref[WaypointRef("demo", "east")]
    assert wp.identity == SpiffeId("cluster.local", "demo", "east") and wp.endpoints == ()
    assert wp.traffic_type is TrafficType.SERVICE


@pytest.mark.parametrize(("gateway", "reason"), [
    (waypoint_gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]),
     "port 15008 and protocol HBONE"),
    (waypoint_gateway(listeners=[]), "listeners"),
])
def test_invalid_waypoint_gateways_are_issues(gateway: Resource, reason: str) -> None:
    snap = build(gateway)
    assert snap.waypoints_by_ref == {}
    [issue] = snap.issues
    assert issue.kind == "Gateway" and issue.severity is Severity.ERROR and reason in issue.message


def test_other_gateway_classes_are_ignored_silently() -> None:
    snap = build(waypoint_gateway(class_name="istio"))
    assert snap.waypoints_by_ref == {} and snap.issues == ()


def test_unknown_waypoint_for_value_warns_and_defaults_to_service() -> None:
    snap = build(waypoint_gateway(waypoint_for="everything"))
    assert snap.waypoints_by_ref[WP].traffic_type is TrafficType.SERVICE
    assert [i.reason for i in snap.issues] == ["UnsupportedValue"]


SERVICE_CASES = [
    # ns label, service label, waypoint-for, service's waypoint
    ("waypoint", None, None, WP),
    (None, "waypoint", "service", WP),
    ("waypoint", "none", None, None),              # the Service opts out
    ("other", "waypoint", None, WP),               # the Service overrides the namespace
    ("waypoint", "other", None, None),             # ... even naming a missing waypoint
    ("waypoint", None, "workload", None),
    ("waypoint", None, "all", WP),
    ("waypoint", None, "none", None),
    (None, None, "all", None),
]


@pytest.mark.parametrize(("ns_use", "svc_use", "waypoint_for", "expected"), SERVICE_CASES)
def test_service_waypoint_use(ns_use: str | None, svc_use: str | None,
                              waypoint_for: str | None, expected: WaypointRef | None) -> None:
    snap = build(namespace("demo", **({USE: ns_use} if ns_use else {})),
                 waypoint_gateway(waypoint_for=waypoint_for),
                 service("web", labels={USE: svc_use} if svc_use else {}))
    assert snap.services_by_key[("demo", "web")].waypoint == expected


WORKLOAD_CASES = [
    ("waypoint", None, None, None),                # default: service traffic only
    ("waypoint", None, "workload", WP),
    (None, "waypoint", "all", WP),
    ("waypoint", "none", "all", None),
    ("other", "waypoint", "workload", WP),
    (None, "waypoint", "service", None),
]


@pytest.mark.parametrize(("ns_use", "pod_use", "waypoint_for", "expected"), WORKLOAD_CASES)
def test_workload_waypoint_use(ns_use: str | None, pod_use: str | None,
                               waypoint_for: str | None, expected: WaypointRef | None) -> None:
    snap = build(namespace("demo", **({USE: ns_use} if ns_use else {})),
                 waypoint_gateway(waypoint_for=waypoint_for),
                 pod("a", labels={USE: pod_use} if pod_use else {}))
    assert snap.workloads_by_ip["10.1.0.1"].waypoint == expected


def test_use_waypoint_namespace_label_names_a_waypoint_elsewhere() -> None:
    snap = build(namespace("demo"), namespace("infra"),
                 waypoint_gateway("shared", ns="infra"),
                 service("web", labels={USE: "shared",
                                        "istio.io/use-waypoint-namespace": "infra"}))
    assert snap.services_by_key[("demo", "web")].waypoint == WaypointRef("infra", "shared")


def test_naming_a_missing_or_mismatched_waypoint_warns_on_the_object() -> None:
    snap = build(namespace("demo", **{USE: "ghost"}), waypoint_gateway(),
                 service("web", labels={USE: "nope"}),
                 pod("a", labels={USE: "waypoint"}))
    reasons = {(i.kind, i.name, i.reason) for i in snap.issues}
    assert reasons == {("Namespace", "demo", "WaypointNotFound"),
                       ("Service", "web", "WaypointNotFound"),
                       ("Pod", "a", "WaypointTypeMismatch")}
    assert all(i.severity is Severity.WARNING for i in snap.issues)


# --- services ----------------------------------------------------------------------------


def test_service_ports_vips_hosts_and_endpoint_target_ports() -> None:
    svc = service("web", ports=[{"name": "http", "port": 80, "targetPort": "web"},
                                {"name": "metrics", "port": 9000, "targetPort": "9100"},
                                {"port": 7000, "name": "raw"}])
    snap = build(namespace("demo"), svc, endpoint_slice(
        "web", [endpoint("10.1.0.1", "a")], ports={"http": 8080, "metrics": 9100}))
    s = snap.services_by_key[("demo", "web")]
    assert [(p.port, p.target_port) for p in s.ports] == [(80, "web"), (9000, 9100),
                                                          (7000, 7000)]
    assert s.endpoints[0].target_ports == {80: 8080, 9000: 9100}
    assert s.hostname == "web.demo.svc.cluster.local"
    for host in ("web.demo.svc.cluster.local", "web.demo.svc", "web.demo"):
        assert snap.services_by_host[host] is s
    assert snap.service_for_name("web", "demo") is s
    assert snap.service_for_name("WEB.demo.svc.cluster.local.", "other") is s
    assert snap.service_for_name("web", "other") is None
    assert snap.services_by_vip["10.96.0.10"] is s


def test_headless_service_has_no_vip() -> None:
    snap = build(service("db", vip="None"))
    assert snap.services_by_key[("demo", "db")].vips == () and snap.services_by_vip == {}


@pytest.mark.parametrize(("ready", "terminating", "expected"), [
    (True, None, True), (None, None, True), (False, None, False), (True, True, False),
])
def test_endpoint_readiness_from_slice_conditions(ready: bool | None, terminating: bool | None,
                                                  expected: bool) -> None:
    snap = build(service("web"), endpoint_slice(
        "web", [endpoint("10.1.0.1", ready=ready, terminating=terminating)]))
    s = snap.services_by_key[("demo", "web")]
    assert s.endpoints[0].ready is expected
    assert (s.ready_endpoints != ()) is expected


def test_endpoints_merge_slices_and_take_locality_from_nodes() -> None:
    snap = build(node("node-1", "eu", "eu-a"), node("node-2", "eu", "eu-b"), service("web"),
                 endpoint_slice("web", [endpoint("10.1.0.1", node_name="node-1")], name="s1"),
                 endpoint_slice("web", [endpoint("10.1.0.2", node_name="node-2"),
                                        endpoint("10.1.0.3", node_name=None, zone="us-x")],
                                name="s2"),
                 endpoint_slice("other", [endpoint("10.1.0.4")], name="s3"))
    s = snap.services_by_key[("demo", "web")]
    assert [e.ip for e in s.endpoints] == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    assert s.endpoints[0].locality == Locality("eu", "eu-a")
    assert s.endpoints[2].locality == Locality(zone="us-x")
    assert [e.ip for e in s.ready_by_zone[("eu", "eu-b")]] == ["10.1.0.2"]
    assert [e.ip for e in s.ready_by_region["eu"]] == ["10.1.0.1", "10.1.0.2"]


def test_endpoint_workload_uid_from_target_ref() -> None:
    snap = build(service("web"), endpoint_slice("web", [endpoint("10.1.0.1", "a")]))
    assert snap.services_by_key[("demo", "web")].endpoints[0].workload_uid == "uid-demo-a"


# --- policies, routes, namespaces ----------------------------------------------------------


def test_policies_are_compiled_and_their_issues_reported() -> None:
    snap = build(
        namespace("demo"), pod("a"),
        authorization_policy("deny-all", "demo", {"action": "DENY", "rules": [{}]}),
        authorization_policy("broken", "demo", {"action": "ALLOW", "rules": [{"bogus": 1}]}),
        peer_authentication("strict", "demo", "STRICT"))
    wl = snap.workloads_by_ip["10.1.0.1"]
    assert len(snap.ztunnel_policies.for_workload(wl.authz_ref)) == 2
    assert not snap.peer_authentication.mode_for(wl.authz_ref, 80).accepts_plaintext
    [issue] = snap.issues
    assert (issue.kind, issue.name, issue.severity) == ("AuthorizationPolicy", "broken",
                                                         Severity.ERROR)


def test_routes_are_kept_raw_and_namespaces_by_labels() -> None:
    snap = build(namespace("demo", **{MODE: "ambient"}), http_route("r2", "demo", "web"),
                 http_route("r1", "demo", "web"))
    assert [r.name for r in snap.http_routes] == ["r1", "r2"]
    assert snap.namespaces == {"demo": {MODE: "ambient"}}


def test_an_unexpected_failure_costs_one_object_not_the_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = MeshTranslator._workload

    def flaky(self: MeshTranslator, key: tuple[str, str], pod_obj: Any, issues: Any) -> Any:
        if key[1] == "bad":
            raise RuntimeError("boom")
        return real(self, key, pod_obj, issues)

    monkeypatch.setattr(MeshTranslator, "_workload", flaky)
    snap = build(pod("bad"), pod("good", ip="10.1.0.2"))
    assert set(snap.workloads_by_ip) == {"10.1.0.2"}
    [issue] = snap.issues
    assert (issue.name, issue.reason) == ("bad", "InternalError") and "boom" in issue.message


def test_unscheduled_pods_are_workloads_on_no_node() -> None:
    snap = build(pod("pending", ip=None, phase="Pending", node_name=""))
    assert "uid-demo-pending" in snap.workloads_by_uid and snap.workloads_by_node == {}
