"""Locality priorities, weights and priority load (Istio "Locality Load Balancing",
Envoy "Priority levels" and "Locality weighted load balancing")."""

from __future__ import annotations

import pytest

from waypoint.resilience.config import LocalityDistribute, LocalityFailover, LocalityLbSettings
from waypoint.resilience.hosts import Host, Locality
from waypoint.resilience.locality import (
    failover_rank,
    label_rank,
    level_health,
    locality_matches,
    locality_weights,
    priority_levels,
    priority_load,
)

CLIENT = Locality("us-west", "zone1", "sub1")


def host(locality: str, **labels: str) -> Host:
    return Host(f"{locality}:80", locality=Locality.parse(locality), labels=labels)


def test_failover_ranks_follow_istio_order() -> None:
    # Istio "Locality failover": same subzone > same zone > same region > failover region > rest.
    failover = {"us-west": "us-east"}
    ranks = [failover_rank(CLIENT, Locality.parse(loc), failover) for loc in (
        "us-west/zone1/sub1", "us-west/zone1/sub2", "us-west/zone2/sub1",
        "us-east/zone1/sub1", "eu-west/zone1/sub1")]
    assert ranks == [0, 1, 2, 3, 4]


def test_levels_are_compacted_and_ordered() -> None:
    hs = [host("eu-west/z/s"), host("us-west/zone1/sub1"), host("us-west/zone9/s")]
    levels = priority_levels(hs, LocalityLbSettings(), client_locality=CLIENT, client_labels={},
                             outlier_detection=True)
    assert levels == [[hs[1]], [hs[2]], [hs[0]]]


def test_failover_needs_outlier_detection() -> None:
    # Istio: locality failover is only applied when outlierDetection is set.
    hs = [host("eu-west/z/s"), host("us-west/zone1/sub1")]
    levels = priority_levels(hs, LocalityLbSettings(), client_locality=CLIENT, client_labels={},
                             outlier_detection=False)
    assert levels == [hs]


def test_failover_priority_ranks_by_label_prefix() -> None:
    # Istio failoverPriority: all labels equal -> 0; the first label differing -> len(labels).
    labels = ["topology.istio.io/network", "topology.kubernetes.io/region"]
    client = {"topology.istio.io/network": "n1"}
    a = host("us-west/zone1/sub1", **{"topology.istio.io/network": "n1"})
    b = host("us-east/zone1/sub1", **{"topology.istio.io/network": "n1"})
    c = host("us-west/zone1/sub1", **{"topology.istio.io/network": "n2"})
    assert [label_rank(client, CLIENT, h, labels) for h in (a, b, c)] == [0, 1, 2]
    levels = priority_levels([c, b, a], LocalityLbSettings(failover_priority=tuple(labels)),
                             client_locality=CLIENT, client_labels=client,
                             outlier_detection=True)
    assert levels == [[a], [b], [c]]


def test_locality_patterns() -> None:
    loc = Locality("us-west", "zone1", "sub1")
    assert locality_matches(loc, "us-west/*")
    assert locality_matches(loc, "us-west")
    assert locality_matches(loc, "us-west/zone1/sub1")
    assert not locality_matches(loc, "us-west/zone2/*")
    assert locality_matches(loc, "*")


def test_distribute_weights_share_a_pattern_by_host_weight() -> None:
    # Istio "Locality weighted distribution": from us-west/zone1/* -> 80 % zone1, 20 % zone2.
    hs = [host("us-west/zone1/a"), host("us-west/zone1/b"), host("us-west/zone2/a"),
          host("eu-west/z/s")]
    settings = LocalityLbSettings(distribute=(LocalityDistribute(
        from_="us-west/zone1/*", to={"us-west/zone1/*": 80, "us-west/zone2/*": 20}),))
    weights = locality_weights(hs, settings, CLIENT)
    assert weights == {Locality("us-west", "zone1", "a"): 40.0,
                       Locality("us-west", "zone1", "b"): 40.0,
                       Locality("us-west", "zone2", "a"): 20.0}


def test_distribute_does_not_apply_to_other_clients() -> None:
    settings = LocalityLbSettings(distribute=(LocalityDistribute(
        from_="eu-west/*", to={"eu-west/*": 100}),))
    assert locality_weights([host("eu-west/z/s")], settings, CLIENT) is None


@pytest.mark.parametrize(("p0_healthy_percent", "expected"), [
    # Envoy "Priority levels" table: P0 healthy % -> traffic to P0 / P1 (P1 fully healthy).
    (100, [100.0, 0.0]),
    (72, [100.0, 0.0]),
    (71, [99.4, 0.6]),
    (50, [70.0, 30.0]),
    (25, [35.0, 65.0]),
    (0, [0.0, 100.0]),
])
def test_priority_load_with_overprovisioning(p0_healthy_percent: int,
                                             expected: list[float]) -> None:
    load = priority_load([level_health(p0_healthy_percent, 100), level_health(100, 100)])
    assert load == pytest.approx(expected)


def test_degraded_levels_are_normalised_to_100() -> None:
    # Both levels at 20 % healthy: health 28 + 28 < 100, so each gets half the traffic.
    load = priority_load([level_health(20, 100), level_health(20, 100)])
    assert load == pytest.approx([50.0, 50.0])


def test_all_levels_down_gives_no_load() -> None:
    assert priority_load([0.0, 0.0]) == [0.0, 0.0]


def test_failover_mapping_puts_the_named_region_next() -> None:
    hs = [host("eu-west/z/s"), host("us-east/z/s"), host("us-west/zone1/sub1")]
    settings = LocalityLbSettings(failover=(LocalityFailover(from_="us-west", to="us-east"),))
    levels = priority_levels(hs, settings, client_locality=CLIENT, client_labels={},
                             outlier_detection=True)
    assert levels == [[hs[2]], [hs[1]], [hs[0]]]
