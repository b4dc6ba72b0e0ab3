"""The idle-resilience bench case: its two routes differ only by the resilience config."""

from __future__ import annotations

import os
import random

from bench.cases.resilience_idle import _overhead, bench_config, cpu_seconds
from waypoint.app import bench_config_from
from waypoint.routing.match import Request, route


def test_the_two_sides_share_the_backend_and_differ_only_in_resilience() -> None:
    config = bench_config_from(bench_config("127.0.0.1:9"))
    assert config.issues == ()
    sides = {}
    for side in ("plain", "resilient"):
        decision = route(config.table, Request(method="GET", authority=side, path="/"),
                         random.Random(1))
        assert decision.cluster is not None and decision.resilience is not None
        assert config.endpoints[("bench", side, 80)][0].address == "127.0.0.1:9"
        sides[side] = (decision.cluster.resilience, decision.resilience.retries)
    plain, resilient = sides["plain"], sides["resilient"]
    assert plain[0].outlier_detection is None and resilient[0].outlier_detection is not None
    assert resilient[0].connection_pool.max_connections == 10_000
    assert resilient[1].attempts == 3 and "5xx" in resilient[1].retry_on
    assert plain[0].load_balancer == resilient[0].load_balancer


def test_overhead_reads_rates_and_costs_the_same_way() -> None:
    assert round(_overhead(1000.0, 950.0), 9) == 5.0  # req/s: 5 % fewer
    assert round(_overhead(100.0, 105.0, per_request=True), 3) == 4.762  # 5 % more CPU each
    assert cpu_seconds(os.getpid()) > 0
