"""Bad API objects: reported invalid, and the config that worked keeps working.

Route objects go through the waypoint's translation (issues on the route table), then
over the wire through a bench waypoint that had a good config first.  Policies go
through the snapshot translation, where an invalid policy is enforced fail-safe (an
ALLOW that allows nothing, a DENY that denies its whole scope) rather than dropped:
a typo must never open a door.  Random objects (hypothesis) are in
``tests/unit/test_routing_robustness.py``; the regex safety table in
``tests/unit/test_routing_regex.py``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import trio

from tests.reliability.support import http_get
from tests.security.conftest import BenchWaypoint
from tests.unit.mesh_objects import authorization_policy
from tests.unit.routing_helpers import SERVICES, backend, httproute, obj, send
from tests.unit.test_decide import inbound, mesh
from waypoint.app import bench_config_from
from waypoint.routing.catalog import ApiObject
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import RouteTableStore, translate
from ztunnel.decide import Allow, Deny

GOOD = httproute("good", [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                           "backendRefs": [backend("v1")]}])
BAD: dict[str, ApiObject] = {
    "rules-not-a-list": obj("HTTPRoute", "bad", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": "x"}),
    "matches-not-a-list": obj("HTTPRoute", "bad", {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"matches": "x", "backendRefs": [backend("v2")]}]}),
    "catastrophic-regex": httproute("bad", [{
        "matches": [{"path": {"type": "RegularExpression", "value": "/(a+)+$"}}],
        "backendRefs": [backend("v2")]}]),
    "nested-quantifier-header-regex": httproute("bad", [{
        "matches": [{"headers": [{"type": "RegularExpression", "name": "x",
                                  "value": "(x*)*y"}]}],
        "backendRefs": [backend("v2")]}]),
    "vs-weights-sum-to-0": obj("VirtualService", "bad", {"hosts": ["echo"], "http": [{
        "route": [{"destination": {"host": "v2"}, "weight": 0},
                  {"destination": {"host": "v3"}, "weight": 0}]}]}),
    "vs-unknown-field": obj("VirtualService", "bad", {"hosts": ["echo"], "htp": [{}]}),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_route_object_is_an_issue_and_the_good_route_still_routes(bad: ApiObject) -> None:
    table = translate(SERVICES, [GOOD, bad], home_namespace="default")
    assert [i for i in table.issues if "default/bad" in str(i)], table.issues
    decision = send(table, "/v1", rng=random.Random(0))
    assert decision.cluster is not None and decision.cluster.service_name == "v1"
    # An adversarial path against whatever was kept answers at once.
    started = time.perf_counter()
    send(table, "/" + "a" * 5000 + "!", rng=random.Random(0))
    assert time.perf_counter() - started < 0.1


def test_httproute_weights_summing_to_0_answer_500_as_gateway_api_says() -> None:
    """Not invalid in Gateway API (weight 0 on every backend is allowed): the rule answers
    500, and only that rule."""
    zero = httproute("zero", [{"matches": [{"path": {"type": "PathPrefix", "value": "/w"}}],
                               "backendRefs": [backend("v2", weight=0),
                                               backend("v3", weight=0)]}])
    table = translate(SERVICES, [GOOD, zero], home_namespace="default")
    assert send(table, "/w", rng=random.Random(0)).status == 500
    decision = send(table, "/v1", rng=random.Random(0))
    assert decision.cluster is not None and decision.cluster.service_name == "v1"


def test_an_update_that_breaks_a_route_keeps_its_last_good_version() -> None:
    """Istio's API server refuses such an update, so the old version stays in force; the
    waypoint's store does the same per object, and says so."""
    store = RouteTableStore()
    good = httproute("good", [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                               "backendRefs": [backend("v2")]}])
    assert _service_of(store.update(SERVICES, [good], home_namespace="default")) == "v2"
    broken = httproute("good", "not-a-list")  # type: ignore[arg-type]
    table = store.update(SERVICES, [broken], home_namespace="default")
    assert any("default/good" in str(i) and "stays in force" in i.message
               for i in table.issues), table.issues
    assert any(i.field == "spec.rules" for i in table.issues), table.issues
    assert _service_of(table) == "v2"
    fixed = httproute("good", [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                                "backendRefs": [backend("v3")]}])
    assert _service_of(store.update(SERVICES, [fixed], home_namespace="default")) == "v3"


def _service_of(table: RouteTable) -> str | None:
    decision = send(table, "/v1", rng=random.Random(0))
    return decision.cluster.service_name if decision.cluster is not None else None


POLICIES: dict[str, tuple[dict[str, Any], type]] = {
    "allow-with-unknown-rule-field": ({"action": "ALLOW", "rules": [{"bogus": 1}]}, Deny),
    "allow-with-unknown-top-field": ({"action": "ALLOW", "rules": [{}], "unknownTop": 1},
                                     Deny),
    "deny-with-unknown-field": ({"action": "DENY", "rules": [{"bogus": 1}]}, Deny),
}


@pytest.mark.parametrize(("spec", "outcome"), POLICIES.values(), ids=POLICIES.keys())
def test_policy_with_unknown_fields_is_an_issue_and_enforced_fail_safe(
        spec: dict[str, Any], outcome: type) -> None:
    assert isinstance(inbound(mesh()), Allow)  # before: no policy, allowed
    snap = mesh(authorization_policy("typo", "demo", spec))
    [issue] = [i for i in snap.issues if i.name == "typo"]
    assert "unknown field" in issue.message and "fail-safe" in issue.message
    assert isinstance(inbound(snap), outcome)


GOOD_WIRE = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "good", "namespace": "bench"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend"}],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                                 "filters": [{"type": "ResponseHeaderModifier",
                                              "responseHeaderModifier": {
                                                  "add": [{"name": "x-route",
                                                           "value": "good"}]}}],
                                 "backendRefs": [{"name": "backend", "port": 80}]}]}}
BAD_WIRE = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "bad", "namespace": "bench"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend"}],
                     "rules": [{"matches": [{"path": {"type": "RegularExpression",
                                                      "value": "/(a|aa)+$"}}],
                                "backendRefs": [{"name": "backend", "port": 80}]}]}}


async def test_a_live_waypoint_keeps_serving_the_good_route_when_a_bad_one_arrives(
        bench: BenchWaypoint) -> None:
    endpoints = bench.endpoints
    good = bench_config_from({**endpoints, "objects": [GOOD_WIRE]})
    await bench.waypoint.apply_bench(good)
    before = await http_get(bench.port, "/v1/x")
    assert before.status == 200 and before.headers.get("x-route") == "good"
    both = bench_config_from({**endpoints, "objects": [GOOD_WIRE, BAD_WIRE]})
    assert any("bench/bad" in issue for issue in both.issues), both.issues
    await bench.waypoint.apply_bench(both)
    with trio.fail_after(5):
        after = await http_get(bench.port, "/v1/x")
        attack = await http_get(bench.port, "/" + "a" * 3000 + "!")
    assert after.status == 200 and after.headers.get("x-route") == "good"
    assert attack.status in (200, 404)
