"""Resilience settings of one route or one cluster, as plain frozen values.

These are the types the translator builds from Istio ``VirtualService`` /
``DestinationRule`` and Gateway API ``HTTPRoute`` objects, and the decision
cores in this package read.  They carry Istio's defaults, so a translator only
sets what the API object sets.  Durations are float seconds; ``None`` means
"disabled / not set"; a ``0`` timeout is accepted and stored as ``None``, since
``0s`` disables a timeout in Istio and Envoy.

Sources for the defaults (cited by page name):

* Istio "Virtual Service" reference (``HTTPRetry``, ``HTTPFaultInjection``) and
  pilot's ``retry.DefaultPolicy``: retries default to 2 on
  ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``
  (no status codes listed in current Istio), previous hosts avoided, up to 5 host
  selections per retry.
* Envoy "Router filter" / "Retry semantics" (``x-envoy-retry-on``): backoff base
  25 ms, max 10 x base (250 ms).
* Istio "Destination Rule" reference (``ConnectionPoolSettings``,
  ``OutlierDetection``, ``LoadBalancerSettings``, ``LocalityLoadBalancerSetting``)
  and pilot's ``getDefaultCircuitBreakerThresholds``: circuit-breaker thresholds
  default to 2^32-1 (Envoy's own 1024/3 are overridden), outlier detection 5
  consecutive 5xx, 10 s interval, 30 s base ejection, 10 % max ejected, min
  health 0 %; default load balancer ``LEAST_REQUEST`` (Istio >= 1.14).
* Envoy "Outlier detection" and "Load balancing: ring hash / Maglev":
  ``max_ejection_time`` 300 s, ring ``minimum_ring_size`` 1024, Maglev table 65537.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from common.errors import ConfigError

#: Envoy's "unlimited" circuit-breaker threshold; Istio sets every threshold to it.
UNLIMITED = 2**32 - 1

#: Envoy ``retry_on`` policies for HTTP (Envoy "Router filter", x-envoy-retry-on).
HTTP_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure",
})
#: Envoy ``retry_on`` policies for gRPC (x-envoy-retry-grpc-on), keyed to gRPC status codes.
GRPC_RETRY_ON: Mapping[str, int] = MappingProxyType({
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
})
ALL_RETRY_ON = HTTP_RETRY_ON | frozenset(GRPC_RETRY_ON)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_duration(value: float | None, name: str) -> None:
    _check(value is None or (value > 0 and math.isfinite(value)),
           f"{name} must be a positive finite number of seconds or None (disabled), got {value!r}")


def _zero_disables(obj: object, *names: str) -> None:
    """Turn a ``0s`` duration into ``None`` (Istio and Envoy: zero disables the timeout)."""
    for name in names:
        if getattr(obj, name) == 0:
            object.__setattr__(obj, name, None)


def _check_percent(value: float, name: str) -> None:
    _check(0.0 <= value <= 100.0, f"{name} must be a percentage in [0, 100], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a route retries (Istio ``HTTPRetry``, Gateway API ``HTTPRouteRetry``).

    ``attempts`` is the number of *retries*: a request is tried at most
    ``1 + attempts`` times (Istio "attempts", Gateway API "attempts: 3 means up
    to 4 tries", Envoy ``num_retries``).  ``attempts=0`` disables retries.
    ``retry_on`` holds Envoy policy names; bare status codes belong in
    ``retriable_status_codes`` (and imply ``retriable-status-codes``, as Istio
    adds it).  ``backoff_max`` defaults to 10 x ``backoff_base`` (Envoy).
    """

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"})
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base: float = 0.025
    backoff_max: float | None = None
    retry_host_predicate: Literal["previous_hosts"] | None = "previous_hosts"
    host_selection_retry_max_attempts: int = 5
    retry_remote_localities: bool = False

    def __post_init__(self) -> None:
        _check(self.attempts >= 0, f"retries.attempts must be >= 0, got {self.attempts}")
        _zero_disables(self, "per_try_timeout")
        _check_duration(self.per_try_timeout, "retries.perTryTimeout")
        unknown = self.retry_on - ALL_RETRY_ON
        _check(not unknown, f"retries.retryOn has unknown policies {sorted(unknown)}; "
               f"known: {sorted(ALL_RETRY_ON)} or bare HTTP status codes")
        bad = [c for c in self.retriable_status_codes if not 100 <= c <= 599]
        _check(not bad, f"retriable status codes must be HTTP statuses 100-599, got {sorted(bad)}")
        if self.retriable_status_codes and "retriable-status-codes" not in self.retry_on:
            object.__setattr__(self, "retry_on", self.retry_on | {"retriable-status-codes"})
        _check_duration(self.backoff_base, "retries backoff base interval")
        _check_duration(self.backoff_max, "retries backoff max interval")
        if self.backoff_max is None:
            object.__setattr__(self, "backoff_max", 10 * self.backoff_base)
        _check(self.host_selection_retry_max_attempts >= 1,
               "host_selection_retry_max_attempts must be >= 1")

    @property
    def max_backoff(self) -> float:
        """The backoff cap in seconds (never ``None`` after construction)."""
        return self.backoff_max if self.backoff_max is not None else 10 * self.backoff_base


#: Istio's policy for a route that says nothing about retries.
ISTIO_DEFAULT_RETRY = RetryPolicy()
#: Istio's default when the destination uses consistent hashing: retries stay on
#: the hashed host (no ``previous_hosts`` predicate).  Istio also drops the
#: predicate from explicit policies to such destinations unless
#: ``retryIgnorePreviousHosts`` is set.
ISTIO_DEFAULT_RETRY_CONSISTENT_HASH = RetryPolicy(retry_host_predicate=None)
#: ``retries: {attempts: 0}``: retries explicitly off.
NO_RETRY = RetryPolicy(attempts=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """Route deadlines (Istio ``HTTPRoute.timeout``, Gateway API ``timeouts``).

    ``request`` covers the whole request including every retry and backoff
    (Gateway API ``timeouts.request``, Istio ``timeout``); ``per_try`` bounds one
    upstream try (Gateway API ``timeouts.backendRequest``).  ``None`` disables;
    Istio's default route timeout is disabled.  Istio's ``retries.perTryTimeout``
    lives in :class:`RetryPolicy` and wins over ``per_try`` when both are set.
    """

    request: float | None = None
    per_try: float | None = None

    def __post_init__(self) -> None:
        _zero_disables(self, "request", "per_try")
        _check_duration(self.request, "timeout (request)")
        _check_duration(self.per_try, "timeouts.backendRequest (per try)")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    """Istio ``HTTPFaultInjection.Delay``: wait ``fixed_delay`` s on ``percentage`` % of requests.

    ``percentage`` is a float percent (0.1 means one request in a thousand);
    Istio: "If left unspecified, no request will be delayed", so it defaults to 0.
    """

    fixed_delay: float
    percentage: float = 0.0

    def __post_init__(self) -> None:
        _check(self.fixed_delay >= 0 and math.isfinite(self.fixed_delay),
               f"fault.delay.fixedDelay must be >= 0 seconds, got {self.fixed_delay!r}")
        _check_percent(self.percentage, "fault.delay.percentage")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    """Istio ``HTTPFaultInjection.Abort``: answer ``http_status`` or ``grpc_status``.

    Exactly one of the two statuses is set.  A gRPC abort is answered as HTTP
    200 with ``grpc-status`` (Envoy "Fault injection" filter).
    """

    http_status: int | None = None
    grpc_status: int | None = None
    percentage: float = 0.0

    def __post_init__(self) -> None:
        _check((self.http_status is None) != (self.grpc_status is None),
               "fault.abort needs exactly one of httpStatus or grpcStatus")
        _check(self.http_status is None or 200 <= self.http_status <= 599,
               f"fault.abort.httpStatus must be 200-599, got {self.http_status}")
        _check(self.grpc_status is None or 0 <= self.grpc_status <= 16,
               f"fault.abort.grpcStatus must be a gRPC code 0-16, got {self.grpc_status}")
        _check_percent(self.percentage, "fault.abort.percentage")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPolicy:
    """Istio ``HTTPFaultInjection``: an optional delay and an optional abort."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPoolSettings:
    """Istio ``ConnectionPoolSettings`` (circuit-breaker thresholds and pool limits).

    Thresholds default to :data:`UNLIMITED` as Istio sets them (Envoy's own
    defaults, 1024 and 3 retries, caused 503s during pod churn).
    ``max_requests_per_connection`` 0 means unlimited; 1 disables keep-alive.
    Timeouts: ``connect_timeout`` Istio's mesh default 10 s; idle timeouts 1 h
    (Istio ``tcp.idleTimeout`` and ``http.idleTimeout``).
    """

    max_connections: int = UNLIMITED
    connect_timeout: float = 10.0
    tcp_idle_timeout: float | None = 3600.0
    http1_max_pending_requests: int = UNLIMITED
    http2_max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0
    max_retries: int = UNLIMITED
    http_idle_timeout: float | None = 3600.0
    max_concurrent_streams: int = UNLIMITED

    def __post_init__(self) -> None:
        for name in ("max_connections", "http1_max_pending_requests", "http2_max_requests",
                     "max_retries", "max_concurrent_streams"):
            value = getattr(self, name)
            _check(0 <= value <= UNLIMITED, f"connectionPool {name} must be 0..2^32-1, got {value}")
        _check(self.max_requests_per_connection >= 0,
               "connectionPool.http.maxRequestsPerConnection must be >= 0")
        _check_duration(self.connect_timeout, "connectionPool.tcp.connectTimeout")
        _zero_disables(self, "tcp_idle_timeout", "http_idle_timeout")
        _check_duration(self.tcp_idle_timeout, "connectionPool.tcp.idleTimeout")
        _check_duration(self.http_idle_timeout, "connectionPool.http.idleTimeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetectionSettings:
    """Istio ``OutlierDetection`` (Envoy "Outlier detection").

    ``consecutive_5xx`` counts every 5xx, and locally originated failures
    (connect failure, reset, timeout) unless ``split_external_local_origin_errors``;
    ``consecutive_gateway_errors`` counts 502/503/504 and the same local failures.
    ``None`` disables a detector (Istio: 0 disables).  Ejection lasts
    ``base_ejection_time`` x times ejected, capped at ``max(base, max_ejection_time)``.
    ``min_health_percent``: below it outlier ejection is ignored and every host is
    used (Envoy panic threshold; Istio default 0 = never).
    """

    consecutive_5xx: int | None = 5
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway_errors",
                     "consecutive_local_origin_failures"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"outlierDetection {name} must be >= 1 or None")
        _check_duration(self.interval, "outlierDetection.interval")
        _check_duration(self.base_ejection_time, "outlierDetection.baseEjectionTime")
        _check_duration(self.max_ejection_time, "outlier max ejection time")
        _check_percent(self.max_ejection_percent, "outlierDetection.maxEjectionPercent")
        _check_percent(self.min_health_percent, "outlierDetection.minHealthPercent")


class SimpleLb(StrEnum):
    """Istio ``LoadBalancerSettings.SimpleLB``."""

    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


@dataclass(frozen=True, slots=True, kw_only=True)
class HashCookie:
    """Istio ``consistentHash.httpCookie``: hash on this cookie (``ttl`` lets Envoy mint one)."""

    name: str
    path: str | None = None
    ttl: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHashSettings:
    """Istio ``ConsistentHashLB``: exactly one key source, and ring hash or Maglev.

    Key sources: ``http_header_name`` (case-insensitive), ``http_cookie``,
    ``use_source_ip``, ``http_query_parameter_name``.  ``algorithm`` "ring_hash"
    uses ``minimum_ring_size`` (Envoy default 1024), "maglev" ``table_size``
    (must be prime; Envoy default 65537).
    """

    http_header_name: str | None = None
    http_cookie: HashCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None
    algorithm: Literal["ring_hash", "maglev"] = "ring_hash"
    minimum_ring_size: int = 1024
    table_size: int = 65537

    def __post_init__(self) -> None:
        sources = sum((self.http_header_name is not None, self.http_cookie is not None,
                       self.use_source_ip, self.http_query_parameter_name is not None))
        _check(sources == 1, "consistentHash needs exactly one of httpHeaderName, httpCookie, "
               f"useSourceIp, httpQueryParameterName; got {sources}")
        _check(1 <= self.minimum_ring_size <= 8_388_608,
               "consistentHash.ringHash.minimumRingSize must be 1..8M")
        _check(self.table_size >= 2 and _is_prime(self.table_size),
               f"consistentHash.maglev.tableSize must be prime, got {self.table_size}")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityDistribute:
    """One ``localityLbSetting.distribute`` entry: traffic from ``from_`` split by ``to``.

    Locality strings are ``region/zone/subzone`` with ``*`` wildcards; weights are
    percentages summing to 100 (Istio "Locality Load Balancing").
    """

    from_: str
    to: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "to", MappingProxyType(dict(self.to)))
        _check(sum(self.to.values()) == 100,
               f"localityLbSetting.distribute[from={self.from_}] weights must sum to 100")


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityFailover:
    """One ``localityLbSetting.failover`` entry: region ``from_`` fails over to region ``to``."""

    from_: str
    to: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityLbSettings:
    """Istio ``LocalityLoadBalancerSetting``.

    Locality failover only takes effect when the cluster also has outlier
    detection (Istio: "outlier detection must be configured for locality
    failover"); ``distribute`` and ``failover`` are mutually exclusive.
    ``failover_priority`` lists labels (e.g. ``topology.kubernetes.io/zone``)
    whose equality with the client's ranks endpoints.
    """

    enabled: bool = True
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(not (self.distribute and self.failover),
               "localityLbSetting: set distribute or failover, not both")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancerSettings:
    """Istio ``LoadBalancerSettings``: a simple policy or a consistent hash, plus locality.

    ``locality_lb=None`` means the mesh default, which in Istio is locality load
    balancing *enabled* (failover by region/zone/subzone, in effect only when the
    cluster has outlier detection); ``LocalityLbSettings(enabled=False)`` turns it off.
    """

    simple: SimpleLb = SimpleLb.LEAST_REQUEST
    consistent_hash: ConsistentHashSettings | None = None
    locality_lb: LocalityLbSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteResilience:
    """What one route asks for: deadlines, retries, faults (an HTTPRoute / VirtualService rule)."""

    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    retries: RetryPolicy = ISTIO_DEFAULT_RETRY
    fault: FaultPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterResilience:
    """What one destination asks for (a DestinationRule ``trafficPolicy``)."""

    connection_pool: ConnectionPoolSettings = field(default_factory=ConnectionPoolSettings)
    outlier_detection: OutlierDetectionSettings | None = None
    load_balancer: LoadBalancerSettings = field(default_factory=LoadBalancerSettings)
