"""Circuit breaker counters (Envoy "Circuit breaking", Istio task "Circuit Breaking")."""

from __future__ import annotations

from waypoint.resilience.breaker import CircuitBreaker
from waypoint.resilience.config import ConnectionPoolSettings


def test_istio_sample_one_connection_one_pending_third_request_overflows() -> None:
    # Istio task "Circuit Breaking": maxConnections 1, http1MaxPendingRequests 1.
    # Three concurrent requests: one gets the connection, one waits, one overflows (503 UO).
    breaker = CircuitBreaker(ConnectionPoolSettings(max_connections=1, http1_max_pending_requests=1,
                                                    max_requests_per_connection=1))
    outcomes = []
    for _ in range(3):
        assert breaker.try_request()
        if breaker.try_connection():
            outcomes.append("connected")
        elif breaker.try_pending():
            outcomes.append("pending")
        else:
            breaker.release_request()
            outcomes.append("overflow")
    assert outcomes == ["connected", "pending", "overflow"]
    assert breaker.stats.rq_pending_overflow == 1
    assert breaker.connection_exhausted(1)


def test_releases_make_room_again() -> None:
    breaker = CircuitBreaker(ConnectionPoolSettings(http2_max_requests=1, max_retries=1))
    assert breaker.try_request() and not breaker.try_request()
    breaker.release_request()
    assert breaker.try_request()
    assert breaker.try_retry() and not breaker.try_retry()
    assert breaker.stats.rq_retry_overflow == 1 and breaker.stats.rq_overflow == 1


def test_defaults_never_overflow_and_keep_alive_is_unlimited() -> None:
    breaker = CircuitBreaker(ConnectionPoolSettings())
    assert all(breaker.try_request() and breaker.try_connection() for _ in range(10_000))
    assert not breaker.connection_exhausted(10**9)
