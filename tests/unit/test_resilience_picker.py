"""EndpointPicker: LB + outlier detection + locality for one cluster."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.resilience.config import (
    ConsistentHashSettings,
    LoadBalancerSettings,
    LocalityDistribute,
    LocalityLbSettings,
    OutlierDetectionSettings,
    SimpleLb,
)
from waypoint.resilience.hosts import Host, Locality
from waypoint.resilience.outlier import LocalFailure
from waypoint.resilience.picker import EndpointPicker

RR = LoadBalancerSettings(simple=SimpleLb.ROUND_ROBIN)
ALL_EJECTABLE = OutlierDetectionSettings(max_ejection_percent=100)


def hosts(n: int, locality: str = "") -> list[Host]:
    return [Host(f"10.2.0.{i}:80", locality=Locality.parse(locality)) for i in range(n)]


def test_no_hosts_means_no_healthy_upstream() -> None:
    assert EndpointPicker([], RR).pick(0.0, random.Random(1)) is None


def test_ejected_host_gets_no_traffic_and_returns_after_its_time() -> None:
    # Issue 6: one of three pods answering 500 is ejected after 5 errors, then returns.
    hs = hosts(3)
    picker = EndpointPicker(hs, RR, OutlierDetectionSettings())
    rng = random.Random(1)
    for _ in range(5):
        picker.report_response(hs[0], 500, 1.0)
    assert hs[0] not in {picker.pick(2.0, rng) for _ in range(60)}
    assert hs[0] in {picker.pick(31.0, rng) for _ in range(60)}


def test_all_ejected_without_panic_is_none() -> None:
    hs = hosts(2)
    picker = EndpointPicker(hs, RR, ALL_EJECTABLE)
    for h in hs:
        for _ in range(5):
            picker.report_local_failure(h, LocalFailure.CONNECT_FAILURE, 0.0)
    assert picker.pick(1.0, random.Random(1)) is None


def test_below_min_health_percent_panics_and_uses_all_hosts() -> None:
    # Istio minHealthPercent: below it, outlier detection is disabled and all hosts serve.
    hs = hosts(4)
    picker = EndpointPicker(hs, RR, OutlierDetectionSettings(max_ejection_percent=100,
                                                             min_health_percent=60))
    for h in hs[:2]:
        for _ in range(5):
            picker.report_response(h, 503, 0.0)
    assert {picker.pick(1.0, random.Random(i)) for i in range(40)} == set(hs)


def test_retry_avoids_previous_hosts() -> None:
    hs = hosts(3)
    picker = EndpointPicker(hs, LoadBalancerSettings(simple=SimpleLb.RANDOM))
    rng = random.Random(5)
    assert all(picker.pick(0.0, rng, exclude=[hs[0], hs[1]]) is hs[2] for _ in range(50))
    # With nothing else left the last pick stands rather than failing.
    assert picker.pick(0.0, rng, exclude=hs) in hs


def test_surviving_hosts_keep_their_state_across_updates() -> None:
    hs = hosts(3)
    picker = EndpointPicker(hs, RR, OutlierDetectionSettings())
    for _ in range(5):
        picker.report_response(hs[0], 500, 0.0)
    picker.set_hosts([Host(h.address) for h in hs] + [Host("10.2.0.9:80")])
    assert picker.hosts[0] is hs[0] and picker.hosts[0].ejected


def test_client_zone_is_preferred_then_fails_over_and_comes_back() -> None:
    # Issue 6: a client in zone A reaches only zone-A pods; after they fail zone B serves;
    # back to zone A after recovery (ejection 30 s).
    zone_a, zone_b = hosts(2, "r1/a"), [Host(f"10.3.0.{i}:80", locality=Locality("r1", "b"))
                                        for i in range(2)]
    picker = EndpointPicker(zone_a + zone_b,
                            LoadBalancerSettings(locality_lb=LocalityLbSettings()),
                            ALL_EJECTABLE, client_locality=Locality("r1", "a"))
    rng = random.Random(3)
    assert {picker.pick(0.0, rng) for _ in range(100)} <= set(zone_a)
    for h in zone_a:
        for _ in range(5):
            picker.report_response(h, 503, 1.0)
    assert {picker.pick(2.0, rng) for _ in range(100)} <= set(zone_b)
    picker.sweep(31.0)
    assert {picker.pick(31.0, rng) for _ in range(100)} <= set(zone_a)


def test_half_healthy_zone_spills_thirty_percent() -> None:
    # Envoy priority load: P0 50 % healthy -> 70 % stays, 30 % spills to P1.
    zone_a = hosts(2, "r1/a")
    zone_b = [Host(f"10.3.0.{i}:80", locality=Locality("r1", "b")) for i in range(2)]
    picker = EndpointPicker(zone_a + zone_b,
                            LoadBalancerSettings(simple=SimpleLb.RANDOM,
                                                 locality_lb=LocalityLbSettings()),
                            ALL_EJECTABLE, client_locality=Locality("r1", "a"))
    for _ in range(5):
        picker.report_response(zone_a[0], 500, 0.0)
    rng = random.Random(9)
    picks = Counter(picker.pick(1.0, rng) for _ in range(20_000))
    share_b = (picks[zone_b[0]] + picks[zone_b[1]]) / 20_000
    assert 0.28 < share_b < 0.32


def test_distribute_splits_by_locality_weight() -> None:
    zone_a, zone_b = hosts(1, "r1/a"), [Host("10.3.0.1:80", locality=Locality("r1", "b"))]
    lb = LoadBalancerSettings(locality_lb=LocalityLbSettings(distribute=(LocalityDistribute(
        from_="r1/a", to={"r1/a": 80, "r1/b": 20}),)))
    picker = EndpointPicker(zone_a + zone_b, lb, client_locality=Locality("r1", "a"))
    rng = random.Random(11)
    picks = Counter(picker.pick(0.0, rng) for _ in range(10_000))
    assert 0.78 < picks[zone_a[0]] / 10_000 < 0.82


def test_consistent_hash_is_sticky_and_only_ejected_keys_move() -> None:
    hs = hosts(4)
    lb = LoadBalancerSettings(consistent_hash=ConsistentHashSettings(use_source_ip=True))
    picker = EndpointPicker(hs, lb, ALL_EJECTABLE)
    rng = random.Random(1)
    keys = list(range(0, 2**64, 2**64 // 500))
    before = {k: picker.pick(0.0, rng, k) for k in keys}
    assert all(picker.pick(0.0, rng, k) is before[k] for k in keys)
    for _ in range(5):
        picker.report_response(hs[1], 500, 0.0)
    after = {k: picker.pick(1.0, rng, k) for k in keys}
    assert all(after[k] is before[k] for k in keys if before[k] is not hs[1])
    assert hs[1] not in after.values()


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(list(SimpleLb)), n=st.integers(2, 8),
       ejected=st.sets(st.integers(0, 7), max_size=7), seed=st.integers(0, 2**32))
def test_picks_never_return_ejected_hosts_unless_panic(policy: SimpleLb, n: int,
                                                       ejected: set[int], seed: int) -> None:
    hs = hosts(n)
    picker = EndpointPicker(hs, LoadBalancerSettings(simple=policy), ALL_EJECTABLE)
    for i in ejected:
        if i < n:
            for _ in range(5):
                picker.report_response(hs[i], 500, 0.0)
    rng = random.Random(seed)
    for _ in range(30):
        host = picker.pick(1.0, rng)
        if host is None:
            assert all(h.ejected for h in hs)
        else:
            assert not host.ejected


def test_mesh_default_prefers_the_client_zone_once_outlier_detection_is_set() -> None:
    # Istio: localityLbSetting is enabled mesh-wide by default; failover needs outlier detection.
    zone_a = hosts(1, "r1/a")
    zone_b = [Host("10.3.0.1:80", locality=Locality("r1", "b"))]
    rng = random.Random(2)
    with_od = EndpointPicker(zone_a + zone_b, RR, OutlierDetectionSettings(),
                             client_locality=Locality("r1", "a"))
    assert {with_od.pick(0.0, rng) for _ in range(20)} == set(zone_a)
    without_od = EndpointPicker(zone_a + zone_b, RR, client_locality=Locality("r1", "a"))
    assert {without_od.pick(0.0, rng) for _ in range(20)} == set(zone_a + zone_b)
    disabled = EndpointPicker(zone_a + zone_b, LoadBalancerSettings(
        simple=SimpleLb.ROUND_ROBIN, locality_lb=LocalityLbSettings(enabled=False)),
        OutlierDetectionSettings(), client_locality=Locality("r1", "a"))
    assert {disabled.pick(0.0, rng) for _ in range(20)} == set(zone_a + zone_b)
    unknown_client = EndpointPicker(zone_a + zone_b, RR, OutlierDetectionSettings())
    assert {unknown_client.pick(0.0, rng) for _ in range(20)} == set(zone_a + zone_b)


def test_locality_weight_scales_with_its_health() -> None:
    # Envoy "Locality weighted load balancing": effective weight = weight x min(100, 1.4 x
    # healthy %); zone a 80 with half its hosts ejected -> 80 x 0.7 = 56 against zone b's 20.
    zone_a = hosts(2, "r1/a")
    zone_b = [Host("10.3.0.1:80", locality=Locality("r1", "b"))]
    lb = LoadBalancerSettings(simple=SimpleLb.RANDOM, locality_lb=LocalityLbSettings(
        distribute=(LocalityDistribute(from_="r1/a", to={"r1/a": 80, "r1/b": 20}),)))
    picker = EndpointPicker(zone_a + zone_b, lb, ALL_EJECTABLE, client_locality=Locality("r1", "a"))
    for _ in range(5):
        picker.report_response(zone_a[0], 500, 0.0)
    rng = random.Random(12)
    picks = Counter(picker.pick(1.0, rng) for _ in range(20_000))
    assert picks[zone_a[0]] == 0
    assert abs(picks[zone_b[0]] / 20_000 - 20 / 76) < 0.02


def test_retry_remote_localities_moves_the_retry_to_another_level() -> None:
    # Istio retryRemoteLocalities (Envoy previous_priorities): the retry leaves the tried level.
    zone_a = hosts(2, "r1/a")
    zone_b = [Host(f"10.3.0.{i}:80", locality=Locality("r1", "b")) for i in range(2)]
    picker = EndpointPicker(zone_a + zone_b, RR, OutlierDetectionSettings(),
                            client_locality=Locality("r1", "a"))
    rng = random.Random(4)
    first = picker.pick(0.0, rng)
    assert first in zone_a
    retries = {picker.pick(0.0, rng, exclude=[first], avoid_excluded_levels=True)
               for _ in range(30)}
    assert retries <= set(zone_b)
    # Without the option the retry stays in the preferred level, on the other host.
    assert {picker.pick(0.0, rng, exclude=[first]) for _ in range(30)} == set(zone_a) - {first}
