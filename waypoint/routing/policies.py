"""API resilience fields -> the typed settings of :mod:`waypoint.resilience.config`.

Istio ``VirtualService`` (``timeout``, ``retries``, ``fault``), Gateway API
``HTTPRoute`` (``timeouts``, experimental ``retry``) and Istio
``DestinationRule`` (``trafficPolicy`` with port-level settings and subsets).
Every function raises :class:`~common.errors.ConfigError` on values the
settings refuse, and the translator reports it on the object.

Istio merge rules for DestinationRules ("Destination Rule" reference): a
subset's ``trafficPolicy`` overrides the top-level one section by section
(``loadBalancer``, ``connectionPool``, ``outlierDetection``, ``tls``), and
``portLevelSettings`` for the cluster's port override their policy's sections.
Zero means "unset" for Istio's integer thresholds and "disabled" for
durations, as in Istio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.api import gateway as gw
from common.api import istio_networking as nw
from common.api.duration import parse_gateway_duration, parse_istio_duration
from common.errors import ConfigError
from waypoint.resilience.config import (
    ISTIO_DEFAULT_RETRY,
    NO_RETRY,
    ClusterResilience,
    ConnectionPoolSettings,
    ConsistentHashSettings,
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HashCookie,
    LoadBalancerSettings,
    LocalityDistribute,
    LocalityFailover,
    LocalityLbSettings,
    OutlierDetectionSettings,
    RetryPolicy,
    RouteResilience,
    SimpleLb,
    TimeoutPolicy,
)

#: gRPC status names Istio accepts in ``fault.abort.grpcStatus``.
GRPC_STATUS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


def _seconds(text: str | None) -> float | None:
    """An Istio duration in seconds; absent or zero -> None (disabled)."""
    if text is None:
        return None
    value = parse_istio_duration(text)
    return value if value > 0 else None


def _gw_seconds(text: str | None) -> float | None:
    if text is None:
        return None
    value = parse_gateway_duration(text)
    return value if value > 0 else None


def parse_retry_on(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """``"5xx,connect-failure,503"`` -> (policies, status codes)."""
    policies: set[str] = set()
    codes: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit():
            codes.add(int(item))
        else:
            policies.add(item)
    return frozenset(policies), frozenset(codes)


def vs_resilience(rule: nw.HTTPRoute) -> RouteResilience:
    """``timeout``, ``retries`` and ``fault`` of one VirtualService ``http`` entry."""
    return RouteResilience(timeouts=TimeoutPolicy(request=_seconds(rule.timeout)),
                           retries=vs_retry(rule.retries), fault=vs_fault(rule.fault))


def vs_retry(spec: nw.HTTPRetry | None) -> RetryPolicy:
    """Istio ``HTTPRetry``: unset -> Istio's default policy; ``attempts: 0`` -> no retries."""
    if spec is None:
        return ISTIO_DEFAULT_RETRY
    if spec.attempts == 0:
        return NO_RETRY
    kwargs: dict[str, Any] = {"attempts": spec.attempts,
                              "per_try_timeout": _seconds(spec.per_try_timeout)}
    if spec.retry_on:
        policies, codes = parse_retry_on(spec.retry_on)
        kwargs["retry_on"] = policies
        kwargs["retriable_status_codes"] = codes
    if spec.backoff is not None:
        kwargs["backoff_base"] = _seconds(spec.backoff) or ISTIO_DEFAULT_RETRY.backoff_base
    if spec.retry_remote_localities is not None:
        kwargs["retry_remote_localities"] = spec.retry_remote_localities
    if spec.retry_ignore_previous_hosts is False:
        kwargs["retry_host_predicate"] = None
    return RetryPolicy(**kwargs)


def vs_fault(spec: nw.HTTPFaultInjection | None) -> FaultPolicy | None:
    if spec is None or (spec.delay is None and spec.abort is None):
        return None
    delay = abort = None
    if spec.delay is not None:
        if spec.delay.fixed_delay is None:
            raise ConfigError("fault.delay.exponentialDelay is not supported; use fixedDelay")
        delay = FaultDelay(fixed_delay=parse_istio_duration(spec.delay.fixed_delay),
                           percentage=_percent(spec.delay.percentage, spec.delay.percent))
    if spec.abort is not None:
        if spec.abort.http2_error is not None:
            raise ConfigError("fault.abort.http2Error is not supported; use httpStatus or "
                              "grpcStatus")
        grpc = None
        if spec.abort.grpc_status is not None:
            name = spec.abort.grpc_status.strip().upper()
            grpc = int(name) if name.isdigit() else GRPC_STATUS.get(name)
            if grpc is None:
                raise ConfigError(f"fault.abort.grpcStatus {spec.abort.grpc_status!r} is not a "
                                  f"gRPC status name ({', '.join(GRPC_STATUS)})")
        abort = FaultAbort(http_status=spec.abort.http_status, grpc_status=grpc,
                           percentage=_percent(spec.abort.percentage, None))
    return FaultPolicy(delay=delay, abort=abort)


def _percent(percentage: nw.Percent | None, legacy: int | None) -> float:
    if percentage is not None:
        return percentage.value
    return float(legacy) if legacy is not None else 0.0


def gateway_resilience(rule: gw.HTTPRouteRule) -> RouteResilience:
    """``timeouts`` and ``retry`` of one HTTPRoute rule (retry unset -> Istio's default)."""
    request = per_try = None
    if rule.timeouts is not None:
        request = _gw_seconds(rule.timeouts.request)
        per_try = _gw_seconds(rule.timeouts.backend_request)
        if request is not None and per_try is not None and per_try > request:
            raise ConfigError("timeouts.backendRequest must not exceed timeouts.request")
    retries = ISTIO_DEFAULT_RETRY
    if rule.retry is not None:
        kwargs: dict[str, Any] = {"retriable_status_codes": frozenset(rule.retry.codes)}
        if rule.retry.attempts is not None:
            kwargs["attempts"] = rule.retry.attempts
        if rule.retry.backoff is not None:
            kwargs["backoff_base"] = (_gw_seconds(rule.retry.backoff)
                                      or ISTIO_DEFAULT_RETRY.backoff_base)
        retries = RetryPolicy(**kwargs)
    return RouteResilience(timeouts=TimeoutPolicy(request=request, per_try=per_try),
                           retries=retries)


# --- DestinationRule ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySections:
    """The four overridable sections of a traffic policy; None = not set here."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetectionSettings | None = None
    tls_mode: str | None = None

    def under(self, override: PolicySections | None) -> PolicySections:
        """These sections with every section ``override`` sets replacing ours."""
        if override is None:
            return self
        return PolicySections(
            load_balancer=override.load_balancer or self.load_balancer,
            connection_pool=override.connection_pool or self.connection_pool,
            outlier_detection=override.outlier_detection or self.outlier_detection,
            tls_mode=override.tls_mode or self.tls_mode)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    sections: PolicySections = field(default_factory=PolicySections)
    ports: Mapping[int, PolicySections] = field(default_factory=dict)

    def for_port(self, port: int) -> PolicySections:
        return self.sections.under(self.ports.get(port))


@dataclass(frozen=True, slots=True)
class CompiledSubset:
    labels: Mapping[str, str]
    policy: CompiledPolicy | None


@dataclass(frozen=True, slots=True)
class CompiledDestinationRule:
    """A validated DestinationRule, ready to give each cluster its settings."""

    host: str
    policy: CompiledPolicy
    subsets: Mapping[str, CompiledSubset]

    def settings(self, port: int, subset: str | None) -> tuple[ClusterResilience, str | None]:
        sections = self.policy.for_port(port)
        if subset is not None:
            sub = self.subsets[subset]
            if sub.policy is not None:
                sections = sections.under(sub.policy.for_port(port))
        return cluster_resilience(sections), sections.tls_mode


def cluster_resilience(sections: PolicySections) -> ClusterResilience:
    kwargs: dict[str, Any] = {}
    if sections.connection_pool is not None:
        kwargs["connection_pool"] = sections.connection_pool
    if sections.load_balancer is not None:
        kwargs["load_balancer"] = sections.load_balancer
    kwargs["outlier_detection"] = sections.outlier_detection
    return ClusterResilience(**kwargs)


def compile_destination_rule(host: str, spec: nw.DestinationRuleSpec) -> CompiledDestinationRule:
    subsets: dict[str, CompiledSubset] = {}
    for i, subset in enumerate(spec.subsets):
        if subset.name in subsets:
            raise ConfigError(f"subsets[{i}]: duplicate subset name {subset.name!r}")
        policy = _compile_policy(subset.traffic_policy, f"subsets[{i}].trafficPolicy")
        subsets[subset.name] = CompiledSubset(labels=dict(subset.labels), policy=policy)
    top = _compile_policy(spec.traffic_policy, "trafficPolicy") or CompiledPolicy()
    return CompiledDestinationRule(host=host, policy=top, subsets=subsets)


def _compile_policy(spec: nw.TrafficPolicy | None, where: str) -> CompiledPolicy | None:
    if spec is None:
        return None
    sections = _sections(spec.load_balancer, spec.connection_pool, spec.outlier_detection,
                         spec.tls, where)
    ports: dict[int, PolicySections] = {}
    for i, level in enumerate(spec.port_level_settings):
        if level.port is None:
            raise ConfigError(f"{where}.portLevelSettings[{i}].port is required")
        ports[level.port.number] = _sections(level.load_balancer, level.connection_pool,
                                             level.outlier_detection, level.tls,
                                             f"{where}.portLevelSettings[{i}]")
    return CompiledPolicy(sections=sections, ports=ports)


def _sections(lb: nw.LoadBalancerSettings | None, pool: nw.ConnectionPoolSettings | None,
              outlier: nw.OutlierDetection | None, tls: nw.ClientTLSSettings | None,
              where: str) -> PolicySections:
    try:
        return PolicySections(
            load_balancer=load_balancer(lb) if lb is not None else None,
            connection_pool=connection_pool(pool) if pool is not None else None,
            outlier_detection=outlier_detection(outlier) if outlier is not None else None,
            tls_mode=tls.mode if tls is not None else None)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_balancer(spec: nw.LoadBalancerSettings) -> LoadBalancerSettings:
    simple = SimpleLb.LEAST_REQUEST
    if spec.simple in ("ROUND_ROBIN", "RANDOM", "PASSTHROUGH"):
        simple = SimpleLb(spec.simple)
    chash = None
    if spec.consistent_hash is not None:
        ch = spec.consistent_hash
        kwargs: dict[str, Any] = {
            "http_header_name": ch.http_header_name.lower() if ch.http_header_name else None,
            "use_source_ip": bool(ch.use_source_ip),
            "http_query_parameter_name": ch.http_query_parameter_name,
        }
        if ch.http_cookie is not None:
            kwargs["http_cookie"] = HashCookie(name=ch.http_cookie.name, path=ch.http_cookie.path,
                                               ttl=_seconds(ch.http_cookie.ttl))
        if ch.maglev is not None:
            kwargs["algorithm"] = "maglev"
            if ch.maglev.table_size is not None:
                kwargs["table_size"] = ch.maglev.table_size
        ring = ch.ring_hash.minimum_ring_size if ch.ring_hash is not None else None
        ring = ring if ring is not None else ch.minimum_ring_size
        if ring is not None:
            kwargs["minimum_ring_size"] = ring
        chash = ConsistentHashSettings(**kwargs)
    locality = None
    if spec.locality_lb_setting is not None:
        loc = spec.locality_lb_setting
        locality = LocalityLbSettings(
            enabled=loc.enabled if loc.enabled is not None else True,
            distribute=tuple(LocalityDistribute(from_=d.from_, to=d.to) for d in loc.distribute),
            failover=tuple(LocalityFailover(from_=f.from_, to=f.to) for f in loc.failover),
            failover_priority=loc.failover_priority)
    return LoadBalancerSettings(simple=simple, consistent_hash=chash, locality_lb=locality)


def connection_pool(spec: nw.ConnectionPoolSettings) -> ConnectionPoolSettings:
    kwargs: dict[str, Any] = {}
    tcp, http = spec.tcp, spec.http
    if tcp is not None:
        if tcp.max_connections:
            kwargs["max_connections"] = tcp.max_connections
        if tcp.connect_timeout is not None:
            timeout = _seconds(tcp.connect_timeout)
            if timeout is None:
                raise ConfigError("connectionPool.tcp.connectTimeout must be > 0")
            kwargs["connect_timeout"] = timeout
        if tcp.idle_timeout is not None:
            kwargs["tcp_idle_timeout"] = _seconds(tcp.idle_timeout)
    if http is not None:
        for api, name in (("http1_max_pending_requests", "http1_max_pending_requests"),
                          ("http2_max_requests", "http2_max_requests"),
                          ("max_retries", "max_retries"),
                          ("max_concurrent_streams", "max_concurrent_streams")):
            value = getattr(http, api)
            if value:
                kwargs[name] = value
        if http.max_requests_per_connection is not None:
            kwargs["max_requests_per_connection"] = http.max_requests_per_connection
        if http.idle_timeout is not None:
            kwargs["http_idle_timeout"] = _seconds(http.idle_timeout)
    return ConnectionPoolSettings(**kwargs)


def outlier_detection(spec: nw.OutlierDetection) -> OutlierDetectionSettings:
    kwargs: dict[str, Any] = {}
    if spec.consecutive_5xx_errors is not None:
        kwargs["consecutive_5xx"] = spec.consecutive_5xx_errors or None
    gateway = spec.consecutive_gateway_errors
    if gateway is None:
        gateway = spec.consecutive_errors
    if gateway is not None:
        kwargs["consecutive_gateway_errors"] = gateway or None
    if spec.consecutive_local_origin_failures is not None:
        kwargs["consecutive_local_origin_failures"] = spec.consecutive_local_origin_failures or None
    if spec.split_external_local_origin_errors is not None:
        kwargs["split_external_local_origin_errors"] = spec.split_external_local_origin_errors
    for name, wire in (("interval", "interval"), ("base_ejection_time", "baseEjectionTime")):
        text = getattr(spec, name)
        if text is not None:
            value = _seconds(text)
            if value is None:
                raise ConfigError(f"outlierDetection.{wire} must be > 0")
            kwargs[name] = value
    if spec.max_ejection_percent is not None:
        kwargs["max_ejection_percent"] = float(spec.max_ejection_percent)
    if spec.min_health_percent is not None:
        kwargs["min_health_percent"] = float(spec.min_health_percent)
    return OutlierDetectionSettings(**kwargs)
