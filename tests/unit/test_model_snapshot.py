"""The snapshot model: name resolution, node listing, immutability, small value types."""

from __future__ import annotations

import dataclasses

import pytest

from common.model import Locality, Snapshot, TrafficType, empty_snapshot
from common.translate import translate
from tests.unit.mesh_objects import namespace, pod, service


def small() -> Snapshot:
    return translate([namespace("demo"), namespace("prod"), service("web"),
                      service("web", ns="prod", vip="10.96.0.11"),
                      pod("a", node_name="n1"), pod("b", ip="10.1.0.2", node_name="n1"),
                      pod("c", ip="10.1.0.3", node_name="n2")])


@pytest.mark.parametrize(("name", "client_ns", "expected"), [
    ("web", "demo", ("demo", "web")),
    ("web", "prod", ("prod", "web")),
    ("web.prod", "demo", ("prod", "web")),
    ("web.prod.svc", "demo", ("prod", "web")),
    ("web.prod.svc.cluster.local", "demo", ("prod", "web")),
    ("web.prod.svc.cluster.local.", "demo", ("prod", "web")),
    ("Web.Demo", "prod", ("demo", "web")),
    ("web.demo:8080", "prod", ("demo", "web")),
    ("web", "other", None),
    ("web.other", "demo", None),
    ("example.com", "demo", None),
])
def test_service_for_name_resolves_like_a_pods_dns_search_path(
        name: str, client_ns: str, expected: tuple[str, str] | None) -> None:
    found = small().service_for_name(name, client_ns)
    assert (found.key if found is not None else None) == expected


def test_node_workloads_and_ip_lookup() -> None:
    snap = small()
    assert [w.name for w in snap.node_workloads("n1")] == ["a", "b"]
    assert snap.node_workloads("n3") == ()
    found = snap.workload_for_ip("10.1.0.3")
    assert found is not None and found.name == "c"
    assert snap.workload_for_ip("10.9.9.9") is None


def test_snapshot_and_its_parts_are_frozen() -> None:
    snap = small()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.workloads_by_ip["10.1.0.1"].captured = True  # type: ignore[misc]


def test_empty_snapshot_is_version_zero_with_no_policies() -> None:
    snap = empty_snapshot("example.org")
    assert snap.version == 0 and snap.trust_domain == "example.org"
    assert snap.workloads_by_ip == {} and len(snap.ztunnel_policies) == 0


def test_small_value_types() -> None:
    assert str(Locality("eu", "eu-a", "r1")) == "eu/eu-a/r1"
    assert str(Locality("eu")) == "eu"
    assert TrafficType.ALL.serves_services and TrafficType.ALL.serves_workloads
    assert TrafficType.SERVICE.serves_services and not TrafficType.SERVICE.serves_workloads
    assert not TrafficType.NONE.serves_services and not TrafficType.NONE.serves_workloads
