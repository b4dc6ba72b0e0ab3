"""Retry decisions and backoff (Envoy "Router filter" x-envoy-retry-on, "Retry semantics")."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.resilience.config import ISTIO_DEFAULT_RETRY, NO_RETRY, RetryPolicy
from waypoint.resilience.hosts import Host
from waypoint.resilience.retry import OutcomeKind, RetryState, TryOutcome, backoff

RNG = random.Random(7)


def response(status: int, **kw: object) -> TryOutcome:
    return TryOutcome(OutcomeKind.RESPONSE, status=status, **kw)  # type: ignore[arg-type]


def policy(*retry_on: str, attempts: int = 3, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, retry_on=frozenset(retry_on),
                       retriable_status_codes=frozenset(codes))


def decide(state: RetryState, outcome: TryOutcome, body_held: bool = True) -> bool:
    state.start_try(None)
    return state.decide(outcome, body_held=body_held, rng=RNG).retry


def test_attempts_three_means_at_most_four_tries() -> None:
    # Gateway API HTTPRouteRetry: "attempts: 3" allows up to 4 tries in total.
    state = RetryState(policy("5xx", attempts=3))
    assert [decide(state, response(500)) for _ in range(4)] == [True, True, True, False]
    assert state.attempts == 4


def test_5xx_covers_every_5xx_and_no_response() -> None:
    # Envoy x-envoy-retry-on "5xx": any 5xx, or no response (disconnect/reset/read timeout),
    # including connect-failure and refused-stream.
    st5 = RetryState(policy("5xx"))
    assert st5.is_retriable(response(500)) and st5.is_retriable(response(599))
    for kind in (OutcomeKind.CONNECT_FAILURE, OutcomeKind.RESET, OutcomeKind.REFUSED_STREAM,
                 OutcomeKind.PER_TRY_TIMEOUT):
        assert st5.is_retriable(TryOutcome(kind))
    assert not st5.is_retriable(response(404))


def test_gateway_error_is_502_503_504_only() -> None:
    state = RetryState(policy("gateway-error"))
    assert [state.is_retriable(response(s)) for s in (500, 502, 503, 504)] == [
        False, True, True, True]


def test_codes_limit_which_statuses_retry() -> None:
    # ANCHORS: `codes: [500]` does not retry a 503.
    state = RetryState(policy("retriable-status-codes", codes=(500,)))
    assert state.is_retriable(response(500))
    assert not state.is_retriable(response(503))


def test_connect_failure_does_not_cover_resets() -> None:
    state = RetryState(policy("connect-failure"))
    assert state.is_retriable(TryOutcome(OutcomeKind.CONNECT_FAILURE))
    assert not state.is_retriable(TryOutcome(OutcomeKind.RESET))
    assert not state.is_retriable(response(503))


def test_reset_before_request_only_when_nothing_was_sent() -> None:
    state = RetryState(policy("reset-before-request"))
    assert state.is_retriable(TryOutcome(OutcomeKind.RESET, request_started=False))
    assert not state.is_retriable(TryOutcome(OutcomeKind.RESET, request_started=True))


def test_retriable_4xx_is_409() -> None:
    state = RetryState(policy("retriable-4xx"))
    assert state.is_retriable(response(409)) and not state.is_retriable(response(404))


def test_grpc_policies_match_grpc_status() -> None:
    # Envoy x-envoy-retry-grpc-on: unavailable = 14, cancelled = 1.
    state = RetryState(ISTIO_DEFAULT_RETRY)
    assert state.is_retriable(response(200, grpc_status=14))
    assert state.is_retriable(response(200, grpc_status=1))
    assert not state.is_retriable(response(200, grpc_status=13))


def test_istio_default_retries_connect_failures_twice_but_not_503() -> None:
    state = RetryState(ISTIO_DEFAULT_RETRY)
    assert not state.is_retriable(response(503))
    outcome = TryOutcome(OutcomeKind.CONNECT_FAILURE)
    assert [decide(state, outcome) for _ in range(3)] == [True, True, False]


def test_overloaded_response_is_never_retried() -> None:
    # Envoy: "If x-envoy-overloaded is set by upstream, Envoy will not retry."
    state = RetryState(policy("5xx"))
    state.start_try(None)
    decision = state.decide(response(503, overloaded=True), body_held=True, rng=RNG)
    assert not decision.retry and "overloaded" in decision.reason


def test_body_no_longer_held_stops_retries() -> None:
    state = RetryState(policy("5xx"))
    assert not decide(state, response(500), body_held=False)


def test_headers_add_policies_and_override_count() -> None:
    state = RetryState(NO_RETRY, {"x-envoy-retry-on": "5xx, bogus", "x-envoy-max-retries": "1"})
    assert state.max_retries == 1
    assert [decide(state, response(500)) for _ in range(2)] == [True, False]


def test_header_retriable_status_codes() -> None:
    state = RetryState(policy("retriable-status-codes"),
                       {"x-envoy-retriable-status-codes": "418"})
    assert state.is_retriable(response(418))


def test_max_retries_header_alone_does_not_enable_retries() -> None:
    state = RetryState(RetryPolicy(attempts=0, retry_on=frozenset()),
                       {"x-envoy-max-retries": "5"})
    assert state.max_retries == 0


def test_previous_hosts_are_excluded_only_with_the_predicate() -> None:
    a = Host("10.0.0.1:80")
    state = RetryState(ISTIO_DEFAULT_RETRY)
    state.start_try(a)
    assert state.excluded_hosts() == [a]
    plain = RetryState(RetryPolicy(retry_host_predicate=None))
    plain.start_try(a)
    assert plain.excluded_hosts() == []


def test_backoff_bounds_for_first_retries() -> None:
    # Envoy: retry N waits uniform in [0, (2^N - 1) * 25 ms), capped at 250 ms.
    class Top(random.Random):
        def random(self) -> float:
            return 0.999999

    top = Top()
    assert backoff(1, 0.025, 0.25, top) == pytest.approx(0.025, rel=1e-4)
    assert backoff(2, 0.025, 0.25, top) == pytest.approx(0.075, rel=1e-4)
    assert backoff(3, 0.025, 0.25, top) == pytest.approx(0.175, rel=1e-4)
    assert backoff(4, 0.025, 0.25, top) == pytest.approx(0.25, rel=1e-4)


@given(n=st.integers(min_value=1, max_value=10_000), seed=st.integers(0, 2**32))
def test_backoff_always_within_bounds(n: int, seed: int) -> None:
    value = backoff(n, 0.025, 0.25, random.Random(seed))
    assert 0.0 <= value < min((2 ** min(n, 30) - 1) * 0.025, 0.25)


def test_grpc_retry_header_adds_grpc_codes_without_growing_the_policy_cache() -> None:
    from waypoint.resilience import retry as retry_module

    before = len(retry_module._COMPILED)
    for i in range(50):
        state = RetryState(NO_RETRY, {"x-envoy-retry-grpc-on": f"internal,junk{i}"})
        assert state.is_retriable(response(200, grpc_status=13))
    assert len(retry_module._COMPILED) <= before + 1
