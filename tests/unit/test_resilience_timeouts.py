"""Route and per-try deadlines (Envoy "Router filter" timeout headers, Gateway API timeouts)."""

from __future__ import annotations

import pytest

from waypoint.resilience.config import RetryPolicy, TimeoutPolicy
from waypoint.resilience.timeouts import deadlines


def test_route_timeout_covers_all_tries() -> None:
    d = deadlines(100.0, TimeoutPolicy(request=0.5, per_try=0.2))
    assert d.request_deadline == pytest.approx(100.5)
    assert d.try_deadline(100.0) == pytest.approx(100.2)
    # A late try is cut by the route deadline, not given its full per-try budget.
    assert d.try_deadline(100.4) == pytest.approx(100.5)
    assert d.expired(100.5) and not d.expired(100.49)


def test_no_timeout_means_no_deadline_and_no_expected_header() -> None:
    d = deadlines(0.0, TimeoutPolicy())
    assert d.request_deadline is None and d.try_deadline(5.0) is None
    assert d.expected_timeout_ms(5.0) is None and not d.expired(1e9)


def test_headers_override_route_and_per_try() -> None:
    headers = {"x-envoy-upstream-rq-timeout-ms": "2000",
               "x-envoy-upstream-rq-per-try-timeout-ms": "300"}
    d = deadlines(0.0, TimeoutPolicy(request=0.5), None, headers)
    assert d.request_deadline == pytest.approx(2.0)
    assert d.per_try == pytest.approx(0.3)


def test_zero_header_disables_route_timeout() -> None:
    d = deadlines(0.0, TimeoutPolicy(request=0.5), None, {"x-envoy-upstream-rq-timeout-ms": "0"})
    assert d.request_deadline is None


def test_malformed_header_is_ignored() -> None:
    d = deadlines(0.0, TimeoutPolicy(request=0.5), None, {"x-envoy-upstream-rq-timeout-ms": "x"})
    assert d.request_deadline == pytest.approx(0.5)


def test_per_try_not_below_route_timeout_is_ignored() -> None:
    # Envoy drops a per-try timeout >= the global timeout.
    d = deadlines(0.0, TimeoutPolicy(request=1.0, per_try=1.0))
    assert d.per_try is None


def test_istio_per_try_timeout_wins_over_backend_request() -> None:
    d = deadlines(0.0, TimeoutPolicy(per_try=2.0), RetryPolicy(per_try_timeout=0.25))
    assert d.per_try == pytest.approx(0.25)


def test_expected_timeout_header_is_per_try_or_remaining_route() -> None:
    d = deadlines(0.0, TimeoutPolicy(request=1.0, per_try=0.3))
    assert d.expected_timeout_ms(0.0) == 300
    assert d.expected_timeout_ms(0.9) == 100
    assert deadlines(0.0, TimeoutPolicy(request=1.0)).expected_timeout_ms(0.25) == 750


def test_remaining_clamps_delays_to_the_route_deadline() -> None:
    d = deadlines(10.0, TimeoutPolicy(request=0.5))
    assert d.remaining(10.2) == pytest.approx(0.3)
    assert d.remaining(11.0) == 0.0
    assert deadlines(0.0, TimeoutPolicy()).remaining(5.0) is None
