"""Fault injection decisions (Istio "Virtual Service" HTTPFaultInjection, Envoy fault filter)."""

from __future__ import annotations

import random

from waypoint.resilience.config import FaultAbort, FaultDelay, FaultPolicy
from waypoint.resilience.faults import NO_FAULT, abort_response, decide


def test_no_policy_or_no_percentage_injects_nothing() -> None:
    rng = random.Random(1)
    assert decide(None, rng) is NO_FAULT
    # Istio: "If left unspecified, no request will be delayed/aborted."
    policy = FaultPolicy(delay=FaultDelay(fixed_delay=2.0), abort=FaultAbort(http_status=500))
    assert all(decide(policy, rng) is NO_FAULT for _ in range(1000))


def test_abort_at_100_percent_always_aborts_with_flag_fi() -> None:
    policy = FaultPolicy(abort=FaultAbort(http_status=500, percentage=100.0))
    decision = decide(policy, random.Random(2))
    assert decision.abort is not None and decision.abort.http_status == 500
    assert decision.response_flags == ("FI",)
    status, _headers, body = abort_response(decision.abort)
    assert (status, body) == (500, b"fault filter abort")


def test_grpc_abort_is_http_200_with_grpc_status() -> None:
    status, headers, _ = abort_response(FaultAbort(grpc_status=14, percentage=100.0))
    assert status == 200 and (b"grpc-status", b"14") in headers


def test_delay_at_50_percent_hits_about_half_with_flag_di() -> None:
    policy = FaultPolicy(delay=FaultDelay(fixed_delay=2.0, percentage=50.0))
    rng = random.Random(3)
    decisions = [decide(policy, rng) for _ in range(10_000)]
    delayed = [d for d in decisions if d.delay == 2.0]
    assert 4700 < len(delayed) < 5300
    assert delayed[0].response_flags == ("DI",)


def test_fractional_percentage_point_one_percent() -> None:
    # Istio percentages are fractions: 0.1 means one request in a thousand.
    policy = FaultPolicy(abort=FaultAbort(http_status=503, percentage=0.1))
    rng = random.Random(4)
    hits = sum(decide(policy, rng).abort is not None for _ in range(200_000))
    assert 140 < hits < 260
