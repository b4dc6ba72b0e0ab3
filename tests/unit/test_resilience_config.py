"""Defaults and validation of the resilience settings types."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from waypoint.resilience.config import (
    ISTIO_DEFAULT_RETRY,
    UNLIMITED,
    ConnectionPoolSettings,
    ConsistentHashSettings,
    FaultAbort,
    LoadBalancerSettings,
    LocalityDistribute,
    OutlierDetectionSettings,
    RetryPolicy,
    SimpleLb,
    TimeoutPolicy,
)


def test_istio_default_retry_policy_matches_pilot() -> None:
    # istio/istio pilot/pkg/networking/core/route/retry: DefaultPolicy.
    assert ISTIO_DEFAULT_RETRY.attempts == 2
    assert ISTIO_DEFAULT_RETRY.retry_on == {
        "connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    assert ISTIO_DEFAULT_RETRY.retry_host_predicate == "previous_hosts"
    assert ISTIO_DEFAULT_RETRY.host_selection_retry_max_attempts == 5


def test_backoff_max_defaults_to_ten_times_base() -> None:
    # Envoy "Router filter": max_interval defaults to 10 times base_interval.
    assert RetryPolicy().max_backoff == pytest.approx(0.25)
    assert RetryPolicy(backoff_base=0.1).max_backoff == pytest.approx(1.0)


def test_status_codes_imply_retriable_status_codes_policy() -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), retriable_status_codes=frozenset({500}))
    assert "retriable-status-codes" in policy.retry_on


def test_unknown_retry_on_is_rejected_with_the_known_list() -> None:
    with pytest.raises(ConfigError, match="known"):
        RetryPolicy(retry_on=frozenset({"5xxx"}))


def test_circuit_breaker_defaults_are_istios_unlimited() -> None:
    pool = ConnectionPoolSettings()
    assert pool.max_connections == pool.http1_max_pending_requests == UNLIMITED
    assert pool.http2_max_requests == pool.max_retries == UNLIMITED


def test_outlier_defaults_match_istio_docs() -> None:
    od = OutlierDetectionSettings()
    assert (od.consecutive_5xx, od.interval, od.base_ejection_time, od.max_ejection_percent) == (
        5, 10.0, 30.0, 10.0)
    assert od.consecutive_gateway_errors is None
    assert od.min_health_percent == 0.0


def test_default_load_balancer_is_least_request() -> None:
    assert LoadBalancerSettings().simple is SimpleLb.LEAST_REQUEST


def test_fault_abort_needs_exactly_one_status() -> None:
    with pytest.raises(ConfigError):
        FaultAbort(http_status=500, grpc_status=14, percentage=1.0)
    with pytest.raises(ConfigError):
        FaultAbort(percentage=1.0)


def test_consistent_hash_needs_one_source_and_prime_table() -> None:
    with pytest.raises(ConfigError):
        ConsistentHashSettings()
    with pytest.raises(ConfigError, match="prime"):
        ConsistentHashSettings(use_source_ip=True, algorithm="maglev", table_size=65536)


def test_distribute_weights_must_sum_to_100() -> None:
    with pytest.raises(ConfigError):
        LocalityDistribute(from_="us-east/*", to={"us-east/a/*": 50})


def test_zero_timeouts_mean_disabled() -> None:
    # Istio/Envoy: a 0s timeout disables it.
    assert TimeoutPolicy(request=0, per_try=0) == TimeoutPolicy()
    assert RetryPolicy(per_try_timeout=0).per_try_timeout is None
    assert ConnectionPoolSettings(tcp_idle_timeout=0).tcp_idle_timeout is None
