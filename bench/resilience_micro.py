"""Micro-benchmark of the waypoint's resilience decision cores: ns per decision.

Run: ``.venv/bin/python bench/resilience_micro.py [--quick]``.  Prints one line
per decision: nanoseconds per call (best of 5 runs, to damp the noise of a
shared machine).  Everything is in-process and deterministic; no sockets.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Literal

from waypoint.resilience import faults
from waypoint.resilience.breaker import CircuitBreaker
from waypoint.resilience.config import (
    ISTIO_DEFAULT_RETRY,
    ConnectionPoolSettings,
    ConsistentHashSettings,
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    LoadBalancerSettings,
    LocalityLbSettings,
    OutlierDetectionSettings,
    RetryPolicy,
    SimpleLb,
    TimeoutPolicy,
)
from waypoint.resilience.hashkey import request_hash
from waypoint.resilience.hosts import Host, Locality
from waypoint.resilience.outlier import OutlierDetector
from waypoint.resilience.picker import EndpointPicker
from waypoint.resilience.retry import OutcomeKind, RetryState, TryOutcome
from waypoint.resilience.timeouts import deadlines


def measure(name: str, fn: Callable[[], object], n: int) -> None:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    print(f"{name:<52} {best:>9.0f} ns")


def hosts(n: int, zones: int = 1) -> list[Host]:
    return [Host(f"10.{i // 250}.{i % 250}.1:8080", locality=Locality("r1", f"z{i % zones}"))
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    n = 2_000 if parser.parse_args().quick else 50_000
    rng = random.Random(1)

    def empty() -> None:
        return None

    measure("(loop + call overhead)", empty, n)

    policy = RetryPolicy(attempts=3, retry_on=frozenset({"5xx", "connect-failure"}))
    headers = {"x-envoy-retry-on": "gateway-error", "x-envoy-max-retries": "2"}
    measure("RetryState() no headers", lambda: RetryState(policy), n)
    measure("RetryState() with x-envoy-* headers", lambda: RetryState(policy, headers), n)
    ok = TryOutcome(OutcomeKind.RESPONSE, status=200)
    bad = TryOutcome(OutcomeKind.RESPONSE, status=503)

    measure("retry: new state + decide(200)", _decide(ISTIO_DEFAULT_RETRY, ok, rng), n)
    measure("retry: new state + decide(503 -> retry, backoff)", _decide(policy, bad, rng), n)

    timeouts = TimeoutPolicy(request=2.0, per_try=0.5)
    measure("deadlines() from policy", lambda: deadlines(1.0, timeouts, policy), n)
    rq_headers = {"x-envoy-upstream-rq-timeout-ms": "1500"}
    measure("deadlines() with header override",
            lambda: deadlines(1.0, timeouts, policy, rq_headers), n)

    fault = FaultPolicy(delay=FaultDelay(fixed_delay=2.0, percentage=50.0),
                        abort=FaultAbort(http_status=500, percentage=0.1))
    measure("faults.decide(delay 50 %, abort 0.1 %)", lambda: faults.decide(fault, rng), n)
    measure("faults.decide(None)", lambda: faults.decide(None, rng), n)

    breaker = CircuitBreaker(ConnectionPoolSettings())

    def admit() -> None:
        if breaker.try_request():
            breaker.release_request()

    measure("breaker try_request + release_request", admit, n)

    od_hosts = hosts(10)
    detector = OutlierDetector(OutlierDetectionSettings(), od_hosts)
    measure("outlier report_response(200)",
            lambda: detector.report_response(od_hosts[3], 200, 1.0), n)

    ch_header = ConsistentHashSettings(http_header_name="x-user")
    measure("hash key from header (xxh64)",
            lambda: request_hash(ch_header, {"x-user": "alice-1234"}, source_ip="10.0.0.1"), n)

    od = OutlierDetectionSettings()
    for size in (3, 100):
        for simple in (SimpleLb.ROUND_ROBIN, SimpleLb.LEAST_REQUEST, SimpleLb.RANDOM):
            picker = EndpointPicker(hosts(size), LoadBalancerSettings(simple=simple), od)
            measure(f"pick {simple.value} ({size} hosts, outlier on)",
                    _pick(picker, rng, None), n)
        algorithms: tuple[Literal["ring_hash", "maglev"], ...] = ("ring_hash", "maglev")
        for algorithm in algorithms:
            ch = ConsistentHashSettings(use_source_ip=True, algorithm=algorithm)
            picker = EndpointPicker(hosts(size), LoadBalancerSettings(consistent_hash=ch), od)
            measure(f"pick {algorithm} ({size} hosts)", _pick(picker, rng, 0x1234_5678_9ABC), n)
    locality = LoadBalancerSettings(simple=SimpleLb.ROUND_ROBIN, locality_lb=LocalityLbSettings())
    picker = EndpointPicker(hosts(30, zones=3), locality, od, client_locality=Locality("r1", "z0"))
    measure("pick ROUND_ROBIN, locality failover (30 hosts, 3 zones)", _pick(picker, rng, None), n)
    rr = EndpointPicker(hosts(3), LoadBalancerSettings(simple=SimpleLb.ROUND_ROBIN), od)
    tried = [rr.hosts[0]]
    measure("pick ROUND_ROBIN excluding a previous host",
            lambda: rr.pick(1.0, rng, None, tried), n)

    measure("whole idle request path (see below)", _request_path(rng), n)

    build_hosts = hosts(20)
    start = time.perf_counter_ns()
    EndpointPicker(build_hosts, LoadBalancerSettings(
        consistent_hash=ConsistentHashSettings(use_source_ip=True, algorithm="maglev")))
    print(f"{'build: Maglev 65537 table, 20 hosts':<52} "
          f"{(time.perf_counter_ns() - start) / 1e6:>9.1f} ms")


def _decide(policy: RetryPolicy, outcome: TryOutcome, rng: random.Random
            ) -> Callable[[], object]:
    def run() -> object:
        state = RetryState(policy)
        state.start_try(None)
        return state.decide(outcome, body_held=True, rng=rng)
    return run


def _request_path(rng: random.Random) -> Callable[[], object]:
    """Everything one successful request costs with retries, breaker and outlier on:
    RetryState, deadlines, fault draw, breaker admit/release, pick, counters, outlier
    report, retry decision."""
    route_retry = RetryPolicy(attempts=3, retry_on=frozenset({"5xx", "connect-failure"}))
    route_timeouts = TimeoutPolicy(request=2.0)
    breaker = CircuitBreaker(ConnectionPoolSettings(max_connections=100))
    picker = EndpointPicker(hosts(3), LoadBalancerSettings(), OutlierDetectionSettings())
    ok = TryOutcome(OutcomeKind.RESPONSE, status=200)
    headers: dict[str, str] = {}

    def run() -> object:
        state = RetryState(route_retry, headers)
        limits = deadlines(1.0, route_timeouts, route_retry, headers)
        faults.decide(None, rng)
        if not breaker.try_request():
            return None
        try:
            host = picker.pick(1.0, rng, None, state.excluded_hosts())
            assert host is not None
            state.start_try(host)
            limits.try_deadline(1.0)
            picker.request_started(host)
            picker.request_finished(host)
            picker.report_response(host, 200, 1.0)
            return state.decide(ok, body_held=True, rng=rng)
        finally:
            breaker.release_request()
    return run


def _pick(picker: EndpointPicker, rng: random.Random, key: int | None) -> Callable[[], object]:
    def run() -> object:
        return picker.pick(1.0, rng, key)
    return run


if __name__ == "__main__":
    main()
