"""RouteTableStore's last good version per object (sans-I/O: translation only).

An update that makes a route object invalid must not drop the route: Istio's API server
would have refused the update, so the previous version stays in force.
"""

from __future__ import annotations

import random
from typing import Any

from tests.unit.routing_helpers import SERVICES, backend, backend_of, httproute, obj, send
from waypoint.routing.catalog import ApiObject
from waypoint.routing.model import ObjectRef, RouteTable
from waypoint.routing.translate import RouteTableStore


def to(service: str, name: str = "r", path: str = "/p") -> ApiObject:
    return httproute(name, [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                             "backendRefs": [backend(service)]}])


def broken(name: str = "r") -> ApiObject:
    """The same object with a regex the waypoint refuses (catastrophic backtracking)."""
    return httproute(name, [{"matches": [{"path": {"type": "RegularExpression",
                                                   "value": "/(a+)+$"}}],
                             "backendRefs": [backend("v3")]}])


def vs(service: str, **extra: Any) -> ApiObject:
    return obj("VirtualService", "vs", {"hosts": ["echo"], "http": [
        {"route": [{"destination": {"host": service}}]}], **extra})


def update(store: RouteTableStore, *objects: ApiObject) -> RouteTable:
    return store.update(SERVICES, list(objects), home_namespace="default")


def routed(table: RouteTable, path: str = "/p") -> str | None:
    return backend_of(send(table, path, rng=random.Random(0)))


def held_note(table: RouteTable, name: str = "r", kind: str = "HTTPRoute") -> list[str]:
    return [i.message for i in table.issues
            if i.ref == ObjectRef(kind, "default", name) and "stays in force" in i.message]


def test_good_then_bad_keeps_the_good_version_and_reports_the_bad_one() -> None:
    store = RouteTableStore()
    assert routed(update(store, to("v1"))) == "v1"
    table = update(store, broken())
    assert routed(table) == "v1"
    assert held_note(table), table.issues
    problems = [i for i in table.issues if i.ref.name == "r" and "stays in force" not in i.message]
    assert problems and problems[0].field.startswith("spec.rules[0].matches[0]")
    assert ObjectRef("HTTPRoute", "default", "r") in table.rejected


def test_good_bad_good_applies_the_new_good_version() -> None:
    store = RouteTableStore()
    update(store, to("v1"))
    update(store, broken())
    table = update(store, to("v2"))
    assert routed(table) == "v2"
    assert not held_note(table) and not table.issues
    assert not table.rejected


def test_a_bad_version_that_stays_keeps_being_reported_and_held() -> None:
    store = RouteTableStore()
    update(store, to("v1"))
    first = update(store, broken())
    again = update(store, broken(), to("v3", name="other", path="/q"))
    assert routed(again) == "v1" and routed(again, "/q") == "v3"
    assert held_note(again)
    assert {str(i) for i in first.issues} <= {str(i) for i in again.issues}


def test_a_second_bad_version_is_reported_and_the_good_one_still_holds() -> None:
    store = RouteTableStore()
    update(store, to("v1"))
    update(store, broken())
    worse = obj("HTTPRoute", "r", {"parentRefs": [{"group": "", "kind": "Service",
                                                   "name": "echo"}], "rules": "x"})
    table = update(store, worse)
    assert routed(table) == "v1"
    fields = {i.field for i in table.issues if i.ref.name == "r"}
    assert "spec.rules" in fields and not any("matches" in f for f in fields)


def test_a_bad_first_version_is_left_out_and_reported() -> None:
    store = RouteTableStore()
    table = update(store, broken())
    assert routed(table) == "echo"  # the service's default route
    assert [i for i in table.issues if i.ref.name == "r"]
    assert not held_note(table)
    # ... and later a good version applies.
    assert routed(update(store, to("v2"))) == "v2"


def test_delete_drops_the_object_and_its_cache_entry() -> None:
    store = RouteTableStore()
    update(store, to("v1"))
    update(store, broken())
    gone = update(store)
    assert routed(gone) == "echo" and not gone.issues
    # Re-created with a bad first version: nothing old comes back.
    again = update(store, broken())
    assert routed(again) == "echo"
    assert not held_note(again)


def test_cache_holds_only_live_objects() -> None:
    store = RouteTableStore()
    for i in range(50):
        update(store, to("v1", name=f"r{i}"))
    update(store, to("v1", name="r0"))
    assert len(store._good) == 1 and not store._refused


def test_destination_rule_keeps_its_last_good_version() -> None:
    subsets = [{"name": "a", "labels": {"version": "a"}}]
    rule = obj("DestinationRule", "dr", {"host": "v1", "subsets": subsets})
    bad_rule = obj("DestinationRule", "dr", {"host": "v1", "subsets": subsets,
                                             "trafficPolicy": {"bogus": 1}})
    split = obj("VirtualService", "vs", {"hosts": ["echo"], "http": [
        {"route": [{"destination": {"host": "v1", "subset": "a"}}]}]})
    store = RouteTableStore()
    update(store, rule, split)
    table = update(store, bad_rule, split)
    decision = send(table, "/")
    # Without the good version the subset would be unknown (503 "cluster not found").
    assert decision.cluster is not None and decision.cluster.subset == "a"
    assert held_note(table, "dr", "DestinationRule")


def test_virtual_service_keeps_its_last_good_version() -> None:
    store = RouteTableStore()
    assert routed(update(store, vs("v1")), "/") == "v1"
    table = update(store, vs("v2", htp=[{}]))  # unknown field
    assert routed(table, "/") == "v1"
    assert held_note(table, "vs", "VirtualService")


def test_an_unchanged_bad_version_costs_one_translation(monkeypatch: Any) -> None:
    from waypoint.routing import translate as module

    calls: list[int] = []
    real = module.translate

    def counting(*args: Any, **kwargs: Any) -> RouteTable:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "translate", counting)
    store = RouteTableStore()
    update(store, to("v1"))
    update(store, broken())
    assert len(calls) == 3  # good; bad, then again with the good version swapped in
    table = update(store, broken())
    assert len(calls) == 4 and routed(table) == "v1"
