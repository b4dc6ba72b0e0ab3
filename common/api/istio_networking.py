"""Spec models of ``networking.istio.io/v1`` VirtualService, DestinationRule, ServiceEntry.

Field names follow the Istio reference pages ("Virtual Service", "Destination
Rule", "Service Entry").  Unknown fields are an error (Istio's own validation
rejects them too).  ``oneof`` groups (``StringMatch``, ``abort`` status,
``consistentHash`` key, ``directResponse.body``) are checked here; meaning
(regex safety, host resolution, subsets) is the route translator's job.
Durations are kept as written and validated with Go syntax.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.api.base import ApiModel, IstioDuration


def _one_of(model: ApiModel, names: tuple[str, ...], what: str, required: bool = True) -> None:
    count = sum(getattr(model, n) is not None for n in names)
    if count > 1 or (required and count == 0):
        wire = ", ".join(type(model).model_fields[n].alias or n for n in names)
        raise ValueError(f"{what} needs exactly one of {wire}")


class StringMatch(ApiModel):
    """Istio ``StringMatch``: at most one of exact / prefix / regex (RE2, full match).

    An empty match (``{}``) means "present" for headers and "anything" elsewhere.
    """

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> StringMatch:
        _one_of(self, ("exact", "prefix", "regex"), "a string match", required=False)
        return self


class PortSelector(ApiModel):
    number: int = Field(ge=1, le=65535)


class Destination(ApiModel):
    host: str = Field(min_length=1)
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOperations(ApiModel):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: tuple[str, ...] = ()


class Headers(ApiModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPMatchRequest(ApiModel):
    """One ``match`` entry: its conditions are ANDed; the entries of a list are ORed."""

    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: int | None = Field(default=None, ge=1, le=65535)
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None


class HTTPRouteDestination(ApiModel):
    destination: Destination
    weight: int = Field(default=0, ge=0)
    headers: Headers | None = None


class HTTPRedirect(ApiModel):
    uri: str | None = None
    authority: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str | None = None
    redirect_code: int = Field(default=301, ge=300, le=399)


class RegexRewrite(ApiModel):
    match: str
    rewrite: str


class HTTPRewrite(ApiModel):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None

    @model_validator(mode="after")
    def _uri_xor_regex(self) -> HTTPRewrite:
        _one_of(self, ("uri", "uri_regex_rewrite"), "rewrite", required=False)
        return self


class HTTPBody(ApiModel):
    string: str | None = None
    bytes_: str | None = Field(default=None, alias="bytes")

    @model_validator(mode="after")
    def _one_body(self) -> HTTPBody:
        _one_of(self, ("string", "bytes_"), "directResponse.body")
        return self


class HTTPDirectResponse(ApiModel):
    status: int = Field(ge=200, le=599)
    body: HTTPBody | None = None


class Percent(ApiModel):
    value: float = Field(ge=0.0, le=100.0)


class HTTPRetry(ApiModel):
    attempts: int = Field(default=0, ge=0)
    per_try_timeout: IstioDuration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: IstioDuration | None = None


class FaultDelay(ApiModel):
    fixed_delay: IstioDuration | None = None
    exponential_delay: IstioDuration | None = None
    percentage: Percent | None = None
    percent: int | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _one_delay(self) -> FaultDelay:
        _one_of(self, ("fixed_delay", "exponential_delay"), "fault.delay")
        return self


class FaultAbort(ApiModel):
    http_status: int | None = Field(default=None, ge=200, le=599)
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None

    @model_validator(mode="after")
    def _one_status(self) -> FaultAbort:
        _one_of(self, ("http_status", "grpc_status", "http2_error"), "fault.abort")
        return self


class HTTPFaultInjection(ApiModel):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HTTPMirrorPolicy(ApiModel):
    destination: Destination
    percentage: Percent | None = None


class CorsPolicy(ApiModel):
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: IstioDuration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None


class Delegate(ApiModel):
    name: str
    namespace: str | None = None


class HTTPRoute(ApiModel):
    """One ``http`` entry of a VirtualService (a route rule; entries are tried in order)."""

    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: IstioDuration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = Field(default=None, ge=0, le=100)
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _one_action(self) -> HTTPRoute:
        actions = sum((bool(self.route), self.redirect is not None,
                       self.direct_response is not None, self.delegate is not None))
        if actions != 1:
            raise ValueError("an http route needs exactly one of route, redirect, "
                             "directResponse, delegate")
        if self.mirror is not None and self.mirrors:
            raise ValueError("set mirror or mirrors, not both")
        return self


class VirtualServiceSpec(ApiModel):
    """``VirtualService.spec``; the waypoint uses ``http`` (``tls``/``tcp`` are carried only)."""

    hosts: tuple[str, ...] = Field(min_length=1)
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[dict[str, object], ...] = ()
    tcp: tuple[dict[str, object], ...] = ()
    export_to: tuple[str, ...] = ()


class HttpCookie(ApiModel):
    name: str
    path: str | None = None
    ttl: IstioDuration | None = None


class RingHash(ApiModel):
    minimum_ring_size: int | None = Field(default=None, ge=1)


class MagLev(ApiModel):
    table_size: int | None = Field(default=None, ge=2)


class ConsistentHashLB(ApiModel):
    http_header_name: str | None = None
    http_cookie: HttpCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_key(self) -> ConsistentHashLB:
        _one_of(self, ("http_header_name", "http_cookie", "use_source_ip",
                       "http_query_parameter_name"), "consistentHash")
        _one_of(self, ("ring_hash", "maglev"), "consistentHash", required=False)
        return self


class LocalityDistribute(ApiModel):
    from_: str = Field(alias="from")
    to: dict[str, int]


class LocalityFailover(ApiModel):
    from_: str = Field(alias="from")
    to: str


class LocalityLoadBalancerSetting(ApiModel):
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


class LoadBalancerSettings(ApiModel):
    simple: Literal["UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST",
                    "LEAST_CONN"] | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: IstioDuration | None = None

    @model_validator(mode="after")
    def _simple_or_hash(self) -> LoadBalancerSettings:
        _one_of(self, ("simple", "consistent_hash"), "loadBalancer", required=False)
        return self


class TcpKeepalive(ApiModel):
    probes: int | None = None
    time: IstioDuration | None = None
    interval: IstioDuration | None = None


class TCPSettings(ApiModel):
    max_connections: int | None = Field(default=None, ge=0)
    connect_timeout: IstioDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: IstioDuration | None = None
    idle_timeout: IstioDuration | None = None


class HTTPSettings(ApiModel):
    http1_max_pending_requests: int | None = Field(default=None, ge=0)
    http2_max_requests: int | None = Field(default=None, ge=0)
    max_requests_per_connection: int | None = Field(default=None, ge=0)
    max_retries: int | None = Field(default=None, ge=0)
    idle_timeout: IstioDuration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = Field(default=None, ge=0)


class ConnectionPoolSettings(ApiModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(ApiModel):
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = Field(default=None, ge=0)
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    consecutive_5xx_errors: int | None = Field(default=None, ge=0,
                                               alias="consecutive5xxErrors")
    consecutive_errors: int | None = Field(default=None, ge=0)
    interval: IstioDuration | None = None
    base_ejection_time: IstioDuration | None = None
    max_ejection_percent: int | None = Field(default=None, ge=0, le=100)
    min_health_percent: int | None = Field(default=None, ge=0, le=100)


class ClientTLSSettings(ApiModel):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


class PortTrafficPolicy(ApiModel):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(ApiModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


class Subset(ApiModel):
    name: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class WorkloadSelector(ApiModel):
    match_labels: dict[str, str] = Field(default_factory=dict)


class DestinationRuleSpec(ApiModel):
    host: str = Field(min_length=1)
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


class ServicePort(ApiModel):
    number: int = Field(ge=1, le=65535)
    protocol: str | None = None
    name: str = Field(min_length=1)
    target_port: int | None = Field(default=None, ge=1, le=65535)


class WorkloadEntry(ApiModel):
    address: str | None = None
    ports: dict[str, int] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network: str | None = None
    locality: str | None = None
    weight: int | None = Field(default=None, ge=0)
    service_account: str | None = None


class ServiceEntrySpec(ApiModel):
    hosts: tuple[str, ...] = Field(min_length=1)
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] = "NONE"
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
