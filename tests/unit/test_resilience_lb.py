"""Load-balancing algorithms (Envoy "Load balancers" architecture page)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.resilience.hosts import Host
from waypoint.resilience.lb import (
    LeastRequest,
    Maglev,
    RandomBalancer,
    RingHash,
    RoundRobin,
    ring_points_per_weight,
)


def hosts(n: int, weights: list[int] | None = None) -> list[Host]:
    ws = weights or [1] * n
    return [Host(f"10.1.{i // 250}.{i % 250}:8080", weight=ws[i]) for i in range(n)]


def always(_: Host) -> bool:
    return True


def test_round_robin_visits_each_host_in_turn() -> None:
    hs = hosts(3)
    rr = RoundRobin(hs, random.Random(1))
    picks = [rr.pick(random.Random()) for _ in range(6)]
    assert set(picks[:3]) == set(hs) and picks[:3] == picks[3:]


def test_weighted_round_robin_is_proportional_and_smooth() -> None:
    hs = hosts(2, [3, 1])
    rr = RoundRobin(hs, random.Random(1))
    picks = [rr.pick(random.Random()) for _ in range(400)]
    assert Counter(picks)[hs[0]] == 300
    # Smooth: the light host's turns are spread out, not bunched (gap 4, +1 for float ties).
    gaps = [i for i, h in enumerate(picks) if h is hs[1]]
    assert max(b - a for a, b in itertools.pairwise(gaps)) <= 5


def test_least_request_prefers_the_idle_host() -> None:
    hs = hosts(2)
    hs[0].active_requests = 10
    lr = LeastRequest(hs, random.Random(1))
    rng = random.Random(2)
    assert all(lr.pick(rng) is hs[1] for _ in range(50))


def test_least_request_power_of_two_never_picks_the_busiest_of_three() -> None:
    hs = hosts(3)
    hs[0].active_requests, hs[1].active_requests, hs[2].active_requests = 5, 0, 0
    lr = LeastRequest(hs, random.Random(1))
    rng = random.Random(3)
    assert hs[0] not in {lr.pick(rng) for _ in range(300)}


def test_random_by_weight() -> None:
    hs = hosts(2, [9, 1])
    rb = RandomBalancer(hs, random.Random(1))
    rng = random.Random(4)
    counts = Counter(rb.pick(rng) for _ in range(10_000))
    assert 8700 < counts[hs[0]] < 9300


def test_hash_is_xxhash64_stable_across_processes() -> None:
    # Published xxHash64 test vector for "abc", seed 0.
    assert xxhash.xxh64_intdigest(b"abc") == 0x44BC2CF5AD770999


def test_ring_points_stay_stable_between_one_and_four_times_the_minimum() -> None:
    # Envoy "Ring hash": at least minimum_ring_size points (3 equal hosts -> 342 each).
    assert ring_points_per_weight(3, 1024, None) == 342
    assert RingHash(hosts(3), 342).size == 1026
    # Adding hosts keeps the per-host count, so only the new host takes keys ...
    assert ring_points_per_weight(4, 1024, 342) == 342
    # ... until the ring would exceed 4x the minimum, or fall below it.
    assert ring_points_per_weight(13, 1024, 342) == 79
    assert ring_points_per_weight(2, 1024, 342) == 512


def test_ring_hash_same_key_same_host_and_skips_unusable() -> None:
    hs = hosts(5)
    ring = RingHash(hs, 200)
    key = xxhash.xxh64_intdigest(b"user-1")
    first = ring.pick(key, always)
    assert first is ring.pick(key, always)
    other = ring.pick(key, lambda h: h is not first)
    assert other is not None and other is not first


def _keys(n: int) -> list[int]:
    return [xxhash.xxh64_intdigest(f"key-{i}".encode()) for i in range(n)]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(min_value=2, max_value=12))
def test_ring_hash_adding_a_host_remaps_about_one_in_n_plus_one(n: int) -> None:
    hs = hosts(n + 1)
    per_host = ring_points_per_weight(n, 1024, None)
    before = RingHash(hs[:n], per_host)
    after = RingHash(hs, ring_points_per_weight(n + 1, 1024, per_host))
    keys = _keys(4000)
    moved = [k for k in keys if before.pick(k, always) is not after.pick(k, always)]
    # Every moved key goes to the new host, and about 1/(n+1) of them move.
    assert all(after.pick(k, always) is hs[n] for k in moved)
    assert abs(len(moved) / len(keys) - 1 / (n + 1)) < 0.5 / (n + 1)


def test_maglev_spreads_evenly_and_remaps_little() -> None:
    hs = hosts(6)
    before = Maglev(hs[:5], 65537)
    after = Maglev(hs, 65537)
    keys = _keys(6000)
    counts = Counter(after.pick(k, always) for k in keys)
    assert all(800 < c < 1200 for c in counts.values())
    moved = sum(before.pick(k, always) is not after.pick(k, always) for k in keys)
    assert moved / len(keys) < 0.25  # ideal 1/6 ~ 0.167; Maglev moves slightly more


def test_maglev_skips_unusable_hosts() -> None:
    hs = hosts(3)
    table = Maglev(hs, 251)
    for k in _keys(200):
        host = table.pick(k, lambda h: h is not hs[0])
        assert host is not None and host is not hs[0]
