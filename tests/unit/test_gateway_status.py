"""The Gateway status a waypoint or ingress gateway computes for itself (sans-I/O core)."""

from __future__ import annotations

from typing import Any

from common.kube import Gateway, Service
from waypoint.gateway_status import attached_routes, gateway_status, status_patch
from waypoint.routing.catalog import ApiObject

NOW = "2026-11-25T10:00:00Z"
LATER = "2026-11-25T11:00:00Z"
MESH = {"name": "mesh", "port": 15008, "protocol": "HBONE"}


def waypoint_gw(status: dict[str, Any] | None = None, *, generation: int = 1,
                listeners: list[dict[str, Any]] | None = None,
                cls: str = "istio-waypoint") -> Gateway:
    return Gateway.model_validate({
        "metadata": {"name": "waypoint", "namespace": "shop", "generation": generation,
                     "resourceVersion": "42"},
        "spec": {"gatewayClassName": cls,
                 "listeners": [MESH] if listeners is None else listeners},
        "status": status or {}})


def svc(ip: str | None = "10.96.0.20", ips: list[str] | None = None) -> Service:
    spec: dict[str, Any] = {"ports": [{"port": 15008}]}
    if ip is not None:
        spec["clusterIP"] = ip
    if ips is not None:
        spec["clusterIPs"] = ips
    return Service.model_validate({"metadata": {"name": "waypoint", "namespace": "shop"},
                                   "spec": spec})


def conditions(items: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in items}


def computed(gw: Gateway, service: Service | None = None, ready: bool = True,
             now: str = NOW, **kw: Any) -> dict[str, Any]:
    status = gateway_status(gw, service, ready, now, **kw)
    assert status is not None
    return status


# -- waypoints ---------------------------------------------------------------------------


def test_ready_waypoint_is_accepted_and_programmed_with_the_service_ip() -> None:
    status = computed(waypoint_gw(generation=3), svc())
    assert conditions(status["conditions"]) == {"Accepted": ("True", "Accepted"),
                                                "Programmed": ("True", "Programmed")}
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == NOW
               for c in status["conditions"])
    assert status["conditions"][1]["message"] == (
        "Resource programmed, assigned to service(s) waypoint.shop.svc.cluster.local:15008")
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.20"}]
    (listener,) = status["listeners"]
    assert listener["name"] == "mesh" and listener["attachedRoutes"] == 0
    assert listener["supportedKinds"] == []
    assert conditions(listener["conditions"]) == {
        "Accepted": ("True", "Accepted"), "Conflicted": ("False", "NoConflicts"),
        "ResolvedRefs": ("True", "ResolvedRefs"), "Programmed": ("True", "Programmed")}


def test_a_replica_that_is_not_ready_says_nothing() -> None:
    assert gateway_status(waypoint_gw(), svc(), False, NOW) is None


def test_other_gateway_classes_are_not_ours() -> None:
    assert gateway_status(waypoint_gw(cls="gke-l7-global"), svc(), True, NOW) is None


def test_dual_stack_service_gives_both_addresses_once() -> None:
    status = computed(waypoint_gw(), svc("10.96.0.20", ["10.96.0.20", "fd00::20"]))
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.20"},
                                   {"type": "IPAddress", "value": "fd00::20"}]


def test_service_without_cluster_ip_is_addressed_by_its_dns_name() -> None:
    status = computed(waypoint_gw(), svc("None"), domain="mesh.test")
    assert status["addresses"] == [{"type": "Hostname",
                                    "value": "waypoint.shop.svc.mesh.test"}]
    assert conditions(status["conditions"])["Programmed"] == ("True", "Programmed")


def test_missing_service_is_not_programmed_and_has_no_address() -> None:
    status = computed(waypoint_gw(), None)
    assert conditions(status["conditions"]) == {
        "Accepted": ("True", "Accepted"), "Programmed": ("False", "AddressNotAssigned")}
    assert status["addresses"] is None  # merge-patch null: remove a stale address
    assert "Service shop/waypoint is missing" in status["conditions"][1]["message"]
    assert conditions(status["listeners"][0]["conditions"])["Programmed"] == \
        ("False", "Pending")


def test_waypoint_without_the_hbone_listener_is_not_accepted() -> None:
    gw = waypoint_gw(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}])
    status = computed(gw, svc())
    assert conditions(status["conditions"]) == {"Accepted": ("False", "ListenersNotValid"),
                                                "Programmed": ("False", "Invalid")}
    assert "port 15008 and protocol HBONE" in status["conditions"][0]["message"]
    (listener,) = status["listeners"]
    assert conditions(listener["conditions"])["Accepted"] == ("False", "UnsupportedProtocol")


def test_an_extra_listener_is_reported_but_the_waypoint_still_serves() -> None:
    gw = waypoint_gw(listeners=[MESH, {"name": "odd", "port": 15009, "protocol": "HBONE"}])
    status = computed(gw, svc())
    assert conditions(status["conditions"]) == {"Accepted": ("True", "ListenersNotValid"),
                                                "Programmed": ("True", "Programmed")}
    by_name = {x["name"]: conditions(x["conditions"]) for x in status["listeners"]}
    assert by_name["mesh"]["Programmed"] == ("True", "Programmed")
    assert by_name["odd"]["Accepted"] == ("False", "PortUnavailable")


def test_a_spec_the_api_would_refuse_is_invalid() -> None:
    gw = waypoint_gw(listeners=[{"name": "mesh", "port": 0, "protocol": "HBONE"}])
    status = computed(gw, svc())
    assert conditions(status["conditions"])["Accepted"] == ("False", "Invalid")
    assert status["conditions"][0]["message"].startswith("spec.listeners.0.port")


def test_transition_times_are_kept_while_the_status_holds() -> None:
    first = computed(waypoint_gw(), svc())
    again = computed(waypoint_gw(first), svc(), now=LATER)
    assert again == first
    assert status_patch(waypoint_gw(first), again) is None
    lost = computed(waypoint_gw(first), None, now=LATER)
    accepted, programmed = lost["conditions"]
    assert accepted["lastTransitionTime"] == NOW  # unchanged status: time kept
    assert programmed["lastTransitionTime"] == LATER


def test_a_new_generation_is_observed_and_written() -> None:
    first = computed(waypoint_gw(), svc())
    bumped = waypoint_gw(first, generation=2)
    second = computed(bumped, svc(), now=LATER)
    assert {c["observedGeneration"] for c in second["conditions"]} == {2}
    assert all(c["lastTransitionTime"] == NOW for c in second["conditions"])
    patch = status_patch(bumped, second)
    assert patch == {"metadata": {"resourceVersion": "42"}, "status": second}


def test_a_status_from_a_newer_generation_is_not_overwritten() -> None:
    newer = computed(waypoint_gw(generation=5), svc())
    assert gateway_status(waypoint_gw(newer, generation=4), svc(), True, NOW) is None


def test_conditions_of_other_writers_are_kept_in_place() -> None:
    foreign = {"type": "example.com/Audited", "status": "True", "reason": "Audited",
               "message": "", "lastTransitionTime": NOW}
    defaulted = {"type": "Accepted", "status": "Unknown", "reason": "Pending",
                 "message": "Waiting for controller", "lastTransitionTime": "1970-01-01T00:00:00Z"}
    status = computed(waypoint_gw({"conditions": [defaulted, foreign]}), svc())
    assert [c["type"] for c in status["conditions"]] == ["Accepted", "example.com/Audited",
                                                         "Programmed"]
    assert status["conditions"][1] == foreign
    assert status["conditions"][0]["status"] == "True"


# -- ingress gateways ----------------------------------------------------------------------


def ingress_gw(listeners: list[dict[str, Any]]) -> Gateway:
    return Gateway.model_validate({
        "metadata": {"name": "edge", "namespace": "shop", "generation": 1},
        "spec": {"gatewayClassName": "pyambient", "listeners": listeners}})


HTTP = {"name": "http", "port": 80, "protocol": "HTTP",
        "allowedRoutes": {"namespaces": {"from": "All"}}}
HTTPS = {"name": "https", "port": 443, "protocol": "HTTPS",
         "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert"}]}}


def route(name: str, namespace: str = "shop", **parent: Any) -> ApiObject:
    return ApiObject(kind="HTTPRoute", namespace=namespace, name=name,
                     spec={"parentRefs": [{"name": "edge", "namespace": "shop", **parent}],
                           "rules": [{"backendRefs": [{"name": "b", "port": 80}]}]})


def test_ingress_listeners_count_the_routes_attached_to_each() -> None:
    gw = ingress_gw([HTTP, HTTPS])
    routes = [route("both"), route("only-https", sectionName="https"),
              route("other-ns", namespace="else"),  # HTTPS allows the Gateway's namespace only
              ApiObject(kind="HTTPRoute", namespace="shop", name="elsewhere",
                        spec={"parentRefs": [{"name": "other-gateway"}]})]
    assert attached_routes(gw, routes) == {"http": 2, "https": 2}
    status = computed(gw, svc(), routes=routes, certificates={"https"})
    by_name = {x["name"]: x for x in status["listeners"]}
    assert by_name["http"]["attachedRoutes"] == 2 and by_name["https"]["attachedRoutes"] == 2
    assert by_name["http"]["supportedKinds"] == [{"group": "gateway.networking.k8s.io",
                                                  "kind": "HTTPRoute"}]
    assert status["conditions"][1]["message"].endswith(
        "edge.shop.svc.cluster.local:80, edge.shop.svc.cluster.local:443")


def test_https_listener_without_a_loaded_certificate_does_not_resolve() -> None:
    status = computed(ingress_gw([HTTP, HTTPS]), svc(), certificates=set())
    by_name = {x["name"]: conditions(x["conditions"]) for x in status["listeners"]}
    assert by_name["https"]["ResolvedRefs"] == ("False", "InvalidCertificateRef")
    assert by_name["https"]["Programmed"] == ("False", "Invalid")
    assert by_name["http"]["Programmed"] == ("True", "Programmed")
    assert conditions(status["conditions"])["Programmed"] == ("True", "Programmed")


def test_ingress_listener_conflicts_and_unsupported_kinds_are_reported() -> None:
    tcp = {"name": "tcp", "port": 80, "protocol": "TCP"}
    grpc = {**HTTPS, "name": "grpc", "port": 8443,
            "allowedRoutes": {"kinds": [{"kind": "GRPCRoute"}, {"kind": "HTTPRoute"}]}}
    status = computed(ingress_gw([HTTP, tcp, grpc]), svc(), certificates={"grpc"})
    by_name = {x["name"]: x for x in status["listeners"]}
    assert conditions(by_name["http"]["conditions"])["Conflicted"] == \
        ("True", "ProtocolConflict")
    assert conditions(by_name["tcp"]["conditions"])["Accepted"] == \
        ("False", "UnsupportedProtocol")
    assert conditions(by_name["grpc"]["conditions"])["ResolvedRefs"] == \
        ("False", "InvalidRouteKinds")
    assert by_name["grpc"]["supportedKinds"] == [{"group": "gateway.networking.k8s.io",
                                                  "kind": "HTTPRoute"}]
    assert conditions(status["conditions"])["Accepted"] == ("True", "ListenersNotValid")
