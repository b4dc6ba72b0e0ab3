"""The discovery snapshot feeds the waypoint's route table (common.translate -> routing)."""

from __future__ import annotations

import random

from common.kube.objects import HTTPRoute
from common.model import WaypointRef
from common.translate import translate as mesh_translate
from tests.unit.mesh_objects import http_route, namespace, service, waypoint_gateway
from waypoint.routing.match import Request, route
from waypoint.routing.snapshot import served_by, update_from_snapshot
from waypoint.routing.translate import RouteTableStore

WP = WaypointRef("demo", "waypoint")
USE = "istio.io/use-waypoint"


def _split_route() -> HTTPRoute:
    return HTTPRoute.model_validate({
        "metadata": {"name": "split", "namespace": "demo", "resourceVersion": "7",
                     "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                 "rules": [{"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}],
                            "backendRefs": [{"name": "reviews-v2", "port": 80}]},
                           {"backendRefs": [{"name": "reviews-v1", "port": 80}]}]}})


def test_snapshot_routes_reach_the_table_of_the_waypoint_that_serves_them() -> None:
    snapshot = mesh_translate([
        namespace("demo", **{USE: "waypoint"}), namespace("other"),
        waypoint_gateway(),
        service("reviews", vip="10.96.0.10"), service("reviews-v1", vip="10.96.0.11"),
        service("reviews-v2", vip="10.96.0.12"),
        service("elsewhere", ns="other", vip="10.96.1.1"),
        _split_route(), http_route("theirs", "other", "elsewhere"),
    ])
    served = served_by(snapshot, WP)
    assert ("demo", "reviews") in served and ("other", "elsewhere") not in served
    store = RouteTableStore()
    table = update_from_snapshot(store, snapshot, WP)
    assert store.current is table
    rng = random.Random(0)
    jason = route(table, Request("GET", "10.96.0.10:80", "/", {"end-user": "jason"},
                                 destination="10.96.0.10"), rng)
    other = route(table, Request("GET", "reviews", "/"), rng)
    assert jason.cluster is not None and jason.cluster.service_name == "reviews-v2"
    assert other.cluster is not None and other.cluster.service_name == "reviews-v1"
    assert route(table, Request("GET", "elsewhere.other", "/"), rng).status == 404
    assert [i for i in table.issues if i.severity == "error"] == []
