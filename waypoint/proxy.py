"""The per-request pipeline of the waypoint (DESIGN.md section 8), whatever the protocol.

Theory of operation.  A protocol shell (:mod:`waypoint.h1_shell`, later an HTTP/2
one) parses a request head and calls :meth:`Proxy.handle` with a
:class:`Downstream`: the body to read and the response to write.  The pipeline
then runs, in order::

    route match (404 NR / 500 / redirect / direct response)
    -> L7 authorization (403 "RBAC: access denied")
    -> rate limits of the route's object (429 RL; :mod:`waypoint.ratelimit`)
    -> fault injection (delay inside the route timeout, flag DI; abort, flag FI)
    -> circuit breaker admission (503 x-envoy-overloaded, flag UO)
    -> tries: pick a host, take a pooled connection, send, read the response head,
       report the outcome to outlier detection, ask the retry policy
       (route timeout covers every try and backoff: 504 UT; per-try timeout)
    -> response header rules, x-envoy-upstream-service-time, body streamed
    -> metrics and access log.

A request addressed to a pod IP rather than a service (a workload waypoint) skips the
route table: the waypoint's own L7 policies, then straight to that pod
(:mod:`waypoint.routing.workloads`, :meth:`Proxy._to_pod`).

Every decision is made by a sans-I/O core (:mod:`waypoint.routing`,
:mod:`waypoint.resilience`, :mod:`common.authz`); this module only executes them.
The request reads the router state once (:attr:`Proxy.state`), so a snapshot
update swaps the state for later requests while this one keeps what it started
with.  A request body is held (for retries and mirrors) up to ``body_buffer``
bytes; a longer body is streamed and its request is not retried.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol

import trio

from common.authz.evaluate import check_request
from common.authz.index import EMPTY_POLICY_SET, WaypointPolicies
from common.authz.model import GatewayRef, RequestContext, ServiceRef
from common.errors import Http1Error, UpstreamError
from common.identity import SpiffeId
from common.logging import get_logger
from common.tcp import TcpStream
from waypoint import telemetry
from waypoint.clusters import UNKNOWN, Clusters, ClusterState
from waypoint.direct import DirectClusters
from waypoint.grpc import grpc_status
from waypoint.http import Data, EndOfMessage, Headers, RequestHead, ResponseHead, hop_by_hop_names
from waypoint.mirror import Mirrorer
from waypoint.ratelimit import RateLimiter
from waypoint.resilience import (
    OVERFLOW_HEADERS,
    Deadlines,
    Host,
    LocalFailure,
    OutcomeKind,
    RetryState,
    TryOutcome,
    deadlines,
    faults,
)
from waypoint.resilience.hashkey import request_hash
from waypoint.resilience.picker import NO_HEALTHY_UPSTREAM_BODY
from waypoint.resilience.timeouts import TIMEOUT_BODY
from waypoint.routing.filters import apply_header_ops_pairs, split_target
from waypoint.routing.match import (
    Outcome,
    Request,
    RouteDecision,
    decide,
    find_service,
    header_map,
    not_found,
    select,
)
from waypoint.routing.model import NO_HEADER_OPS, HeaderOps, RouteTable, ServiceRoutes
from waypoint.routing.workloads import EMPTY_WORKLOADS, PodTarget, WorkloadIndex
from waypoint.upstream import (
    STREAM_ERRORS,
    EndpointInfo,
    PoolOverflow,
    SendBatcher,
    TryTimer,
    UpstreamConnection,
)

_log = get_logger("waypoint.proxy")

#: Request body bytes held for retries and mirrors (Envoy's default retry buffer is 64 KiB).
BODY_BUFFER = 64 * 1024
#: A retried response's body is drained (to keep the connection) only when this small.
DRAIN_LIMIT = 64 * 1024

RBAC_DENIED_BODY = b"RBAC: access denied"
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
CONNECT_FAILURE_BODY = (b"upstream connect error or disconnect/reset before headers. "
                        b"reset reason: connection failure")
RESET_BODY = (b"upstream connect error or disconnect/reset before headers. "
              b"reset reason: connection termination")

# Request headers the router consumes and does not forward (Envoy strips them too),
# and ``expect``: the waypoint answers 100-continue itself.
_CONSUMED = frozenset({
    b"x-envoy-upstream-rq-timeout-ms", b"x-envoy-upstream-rq-per-try-timeout-ms",
    b"x-envoy-max-retries", b"x-envoy-retry-on", b"x-envoy-retry-grpc-on",
    b"x-envoy-retriable-status-codes", b"x-envoy-expected-rq-timeout-ms",
    b"x-envoy-attempt-count", b"expect", b"x-forwarded-proto",
})
_HOP_BY_HOP = hop_by_hop_names([])
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (UpstreamError, *STREAM_ERRORS)
_EXCHANGE_ERRORS: tuple[type[BaseException], ...] = (Http1Error, *STREAM_ERRORS)
_TRACE = frozenset({b"traceparent", b"x-b3-spanid", b"b3"})
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_TEXT = (b"content-type", b"text/plain")


#: A try's result: its outcome, and the connection and response head when one came.
_TryResult = tuple[TryOutcome, UpstreamConnection | None, ResponseHead | None]

# Outcomes of plain responses (no x-envoy-overloaded, no grpc-status) by status: the
# outcome is immutable, so one per status serves every request.
_PLAIN_OUTCOMES: dict[int, TryOutcome] = {}


def _response_outcome(head: ResponseHead) -> TryOutcome:
    """The retry core's view of a response head, scanning its headers once."""
    special = False
    for name, _ in head.headers:
        if name == b"x-envoy-overloaded" or name == b"grpc-status":
            special = True
            break
    status = head.status
    if not special:
        outcome = _PLAIN_OUTCOMES.get(status)
        if outcome is None:
            outcome = _PLAIN_OUTCOMES[status] = TryOutcome(OutcomeKind.RESPONSE, status=status)
        return outcome
    overloaded = any(n == b"x-envoy-overloaded" for n, _ in head.headers)
    return TryOutcome(OutcomeKind.RESPONSE, status=status, overloaded=overloaded,
                      grpc_status=grpc_status(head.headers))


def _hop_by_hop(headers: Headers) -> frozenset[bytes]:
    """The names to drop from ``headers``: the fixed hop-by-hop set, plus any names a
    ``Connection`` header nominates (rare: usually it only says keep-alive or close)."""
    for name, value in headers:
        if name == b"connection" and value not in _PLAIN_CONNECTION:
            return hop_by_hop_names(headers)
    return _HOP_BY_HOP


class Downstream(Protocol):
    """The downstream side of one request, as the protocol shell offers it.

    Writes are buffered: :meth:`start_response`, :meth:`write_data` and
    :meth:`write_end` queue bytes, :meth:`flush` sends them.  The pipeline flushes
    before every wait on the upstream, so a small response leaves in one write.

    A shell may also offer ``nursery`` (a ``trio.Nursery`` that outlives the
    request): the pipeline then sends a streamed request body from a task of it
    while the response comes back (full duplex, as streaming gRPC needs); and
    ``body_ready()``: whether body (or its end) is at hand, so the pipeline buffers
    for retries only what already arrived instead of waiting for a streaming client.
    """

    @property
    def response_started(self) -> bool:
        """Some of the response head has been queued or sent."""
        ...

    async def receive_body(self) -> bytes | memoryview | None:
        """The next piece of the request body; ``None`` at its end."""
        ...

    def start_response(self, status: int, headers: Headers, reason: bytes = b"") -> None: ...

    def write_data(self, data: bytes | memoryview) -> None: ...

    def write_end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None: ...

    async def flush(self) -> None: ...


class ResponseAbortedError(UpstreamError):
    """The upstream failed after the response head went downstream: reset the client."""


@dataclass(slots=True)
class PeerInfo:
    """What the waypoint knows about a downstream connection (from HBONE and discovery)."""

    source_ip: str
    destination: str | None = None
    port: int | None = None
    identity: SpiffeId | None = None
    source_workload: str = UNKNOWN
    source_namespace: str = UNKNOWN
    source_labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    destination_ip: str = "0.0.0.0"
    scheme: str = "http"
    _ctx_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                    ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None

    @property
    def principal(self) -> str:
        return str(self.identity) if self.identity is not None else UNKNOWN

    def ips(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                           ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if self._ctx_ips is None:
            self._ctx_ips = (ipaddress.ip_address(self.source_ip),
                             ipaddress.ip_address(self.destination_ip))
        return self._ctx_ips


@dataclass(slots=True)
class RouterState:
    """What one request reads once: the route table, clusters, L7 policies."""

    table: RouteTable
    clusters: Clusters
    gateway: GatewayRef
    policies: WaypointPolicies = field(default_factory=WaypointPolicies)
    service_refs: dict[str, ServiceRef] = field(default_factory=dict)
    #: Pod IPs, for workload-addressed traffic (:mod:`waypoint.routing.workloads`).
    workloads: WorkloadIndex = EMPTY_WORKLOADS

    def service_ref(self, routes: ServiceRoutes) -> ServiceRef:
        ref = self.service_refs.get(routes.host)
        if ref is None:
            ref = self.service_refs[routes.host] = service_ref_of(routes)
        return ref


def service_ref_of(routes: ServiceRoutes) -> ServiceRef:
    """The Service a policy's targetRef names for this route host.  A Service's host is
    ``<name>.<namespace>.svc...``; any other host (a ServiceEntry's ``api.example.com``)
    keeps its whole name, which no Service can have, so a policy for a Service ``api``
    never applies to it."""
    labels = routes.host.split(".")
    if len(labels) >= 3 and labels[1] == routes.service_namespace and labels[2] == "svc":
        return ServiceRef(routes.service_namespace, labels[0])
    return ServiceRef(routes.service_namespace, routes.host)


class _Log:
    """The per-request record for metrics and the access log."""

    __slots__ = ("attempts", "bytes_in", "bytes_out", "destination", "flags", "host", "route",
                 "spec_version", "spec_workload", "status", "upstream")

    def __init__(self) -> None:
        self.status = 0
        self.flags: list[str] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream = "-"
        self.destination = UNKNOWN
        self.route = ""
        self.attempts = 0
        self.host = UNKNOWN
        self.spec_workload = UNKNOWN
        self.spec_version = UNKNOWN


class Proxy:
    """Runs the pipeline for each request; one per waypoint process."""

    def __init__(self, state: RouterState, *, metrics: telemetry.RequestMetrics | None = None,
                 mirror: Mirrorer | None = None, rng: random.Random | None = None,
                 access_log: bool = True, body_buffer: int = BODY_BUFFER) -> None:
        self.state = state
        self.metrics = metrics or telemetry.RequestMetrics()
        self.mirror = mirror
        self.rng = rng or random.Random()
        self.access_log = access_log
        self.body_buffer = body_buffer
        self.rate_limiter: RateLimiter | None = None
        self.direct = DirectClusters()
        # Connections whose request body is still being sent by a _pump_body task.
        self._pumping: set[int] = set()
        self._timer = TryTimer()
        #: Requests sent whole and keep-alive responses go out in one burst per
        #: scheduler pass (:class:`SendBatcher`); the HTTP/1.1 shell uses it too.
        self.sends = SendBatcher()
        # The running trio loop's clock, bound on first use: three calls cheaper per
        # reading than trio.current_time(), read about seven times per request.
        self._now: Callable[[], float] | None = None

    def _clock(self) -> float:
        now_fn = self._now
        if now_fn is None:
            now_fn = self._now = trio.lowlevel.current_clock().current_time
        return now_fn()

    async def handle(self, head: RequestHead, down: Downstream, peer: PeerInfo) -> None:
        """Answer one request; raises only when the downstream connection must close."""
        now_fn = self._now
        if now_fn is None:
            now_fn = self._now = trio.lowlevel.current_clock().current_time
        started = now_fn()
        state = self.state
        log = _Log()
        headers = header_map(head.headers)
        target = head.target.decode("latin-1")
        authority = headers.get("host") or peer.destination or ""
        request = Request(method=head.method.decode("latin-1"), authority=authority,
                          path=target, headers=headers, port=peer.port,
                          destination=peer.destination, scheme=peer.scheme,
                          source_labels=peer.source_labels,
                          source_namespace=peer.source_namespace)
        try:
            pod = state.workloads.by_ip.get(peer.destination or "")
            if pod is not None:
                await self._to_pod(head, down, peer, request, pod, log, started)
                return
            routes, port = find_service(state.table, request)
            decision: RouteDecision | None = None
            if routes is not None:
                path, query = split_target(target)
                hit = select(routes, request, path, query, port)
                if hit is not None:
                    decision = decide(hit, request, path, query, port, self.rng)
                log.destination = routes.host
            if decision is None:
                decision = not_found()
            log.route = decision.route_name
            if decision.outcome is not Outcome.FORWARD:
                await self._route_answer(down, decision, log)
                return
            if routes is not None and len(state.policies):
                policies = state.policies.for_target(state.gateway, state.service_ref(routes))
                if policies is not EMPTY_POLICY_SET and not self._authorized(
                        state, routes, request, peer, port, target):
                    await self._local(down, log, 403, RBAC_DENIED_BODY)
                    return
            limiter = self.rate_limiter
            if limiter is not None and limiter.policies and decision.rule is not None:
                src = decision.rule.source
                limited = await limiter.check(src.kind, src.namespace, src.name, headers,
                                              target, None if peer.identity is None
                                              else peer.principal, peer.source_ip)
                if limited is not None:
                    await self._local(down, log, limited.status, limited.body, limited.headers,
                                      flag=limited.flag)
                    return
            await self._forward(head, down, peer, request, decision, log, started)
        finally:
            self._record(peer, log, started, request)

    # --- local answers ---------------------------------------------------------------

    async def _local(self, down: Downstream, log: _Log, status: int, body: bytes = b"",
                     headers: Sequence[tuple[bytes, bytes]] = (),
                     ops: HeaderOps = NO_HEADER_OPS, flag: str | None = None) -> None:
        log.status = status
        if flag:
            log.flags.append(flag)
        pairs: list[tuple[bytes, bytes]] = [(b"content-length", b"%d" % len(body))]
        if body:
            pairs.append(_TEXT)
        pairs.extend(headers)
        if ops:
            pairs = apply_header_ops_pairs(pairs, ops)
        down.start_response(status, pairs)
        if body:
            down.write_data(body)
            log.bytes_out = len(body)
        down.write_end()
        await down.flush()

    async def _route_answer(self, down: Downstream, decision: RouteDecision, log: _Log) -> None:
        status = decision.status or 500
        extra: list[tuple[bytes, bytes]] = []
        if decision.location is not None:
            extra.append((b"location", decision.location.encode("latin-1")))
        await self._local(down, log, status, decision.body, extra, decision.response_headers,
                          decision.response_flag or None)

    def tcp_refusal(self, destination: str, port: int) -> str | None:
        """Why a non-HTTP connection to ``destination:port`` must not be passed through.

        HTTP authorization cannot be checked on bytes that are not HTTP, so a client
        could slip past an L7 DENY (or an ALLOW it does not satisfy) by not speaking
        HTTP, or by staying silent until detection gives up.  When any policy of this
        waypoint applies to the destination, the connection is refused (fail closed).
        A pod IP whose pod does not use this waypoint is refused too (Istio's waypoint
        has no filter chain for it).
        """
        state = self.state
        pod = state.workloads.by_ip.get(destination) if state.workloads else None
        if pod is not None and not pod.served:
            return (f"pod {pod.namespace}/{pod.name} does not use this waypoint for workload "
                    f"traffic (istio.io/use-waypoint, istio.io/waypoint-for workload or all)")
        if not len(state.policies):
            return None
        routes = state.table.lookup(destination, port)
        service = state.service_ref(routes) if routes is not None else None
        if state.policies.for_target(state.gateway, service) is EMPTY_POLICY_SET:
            return None
        return ("not HTTP, and the waypoint enforces HTTP authorization on this "
                "destination, which it cannot check on other protocols")

    def _authorized(self, state: RouterState, routes: ServiceRoutes | None, request: Request,
                    peer: PeerInfo, port: int, target: str) -> bool:
        """The L7 policies' verdict (``routes`` None: addressed to a pod, so only the
        policies targeting the waypoint itself apply)."""
        source_ip, destination_ip = peer.ips()
        ctx = RequestContext(source_identity=peer.identity, source_ip=source_ip,
                             destination_ip=destination_ip, destination_port=port,
                             method=request.method, host=request.authority, path=target,
                             headers=request.headers)
        decision = check_request(state.policies, state.gateway,
                                 state.service_ref(routes) if routes is not None else None, ctx)
        if not decision.allowed:
            _log.debug("request denied by policy", policy=decision.policy,
                       reason=decision.reason.value, path=target,
                       source=peer.principal)
        return decision.allowed

    async def _to_pod(self, head: RequestHead, down: Downstream, peer: PeerInfo,
                      request: Request, pod: PodTarget, log: _Log, started: float) -> None:
        """A request addressed to a pod IP (Istio's direct chain): no route table, the
        waypoint's own L7 policies, then the pod itself (:mod:`waypoint.routing.workloads`)."""
        state = self.state
        if not pod.served:
            await self._route_answer(down, not_found(), log)
            return
        port = peer.port if peer.port is not None else 80
        if len(state.policies) and not self._authorized(state, None, request, peer, port,
                                                         request.path):
            await self._local(down, log, 403, RBAC_DENIED_BODY)
            return
        cstate, decision = await self.direct.get(state.workloads, pod, port,
                                                 state.clusters.transport)
        await self._forward(head, down, peer, request, decision, log, started, cstate)

    # --- forwarding ------------------------------------------------------------------

    async def _forward(self, head: RequestHead, down: Downstream, peer: PeerInfo,
                       request: Request, decision: RouteDecision, log: _Log,
                       started: float, cstate: ClusterState | None = None) -> None:
        resilience = decision.resilience
        cluster = decision.cluster
        assert resilience is not None and cluster is not None
        rng = self.rng
        limits = deadlines(started, resilience.timeouts, resilience.retries, request.headers)
        fault = faults.decide(resilience.fault, rng)
        if fault is not faults.NO_FAULT:
            if fault.delay > 0:
                log.flags.append("DI")
                remaining = limits.remaining(self._clock())
                if remaining is not None and remaining <= fault.delay:
                    await trio.sleep(remaining)
                    await self._local(down, log, 504, TIMEOUT_BODY, flag="UT")
                    return
                await trio.sleep(fault.delay)
            if fault.abort is not None:
                status, pairs, body = faults.abort_response(fault.abort)
                await self._local(down, log, status, body, [p for p in pairs if p != _TEXT],
                                  flag="FI")
                return
        if cstate is None:
            cstate = self.state.clusters.get(cluster)
        log.upstream = cluster.name
        breaker = cstate.breaker
        if not breaker.try_request():
            await self._local(down, log, 503, OVERFLOW_BODY, OVERFLOW_HEADERS, flag="UO")
            return
        try:
            chunks, complete = await self._read_body(head, down, log)
            up_head, pairs = self._upstream_head(head, request, decision)
            if decision.mirrors and self.mirror is not None:
                if complete:
                    for target in decision.mirrors:
                        self.mirror.submit(self.state.clusters.get(target.cluster), up_head,
                                           pairs, target.authority, chunks)
                else:
                    self.mirror.skipped += 1
            await self._tries(up_head, pairs, chunks, complete, down, request, decision,
                              cstate, limits, log, peer)
        finally:
            breaker.release_request()

    async def _read_body(self, head: RequestHead, down: Downstream, log: _Log
                         ) -> tuple[list[bytes | memoryview], bool]:
        """The body's first ``body_buffer`` bytes, and whether that is all of it."""
        if not head.has_body:
            return [], True
        chunks: list[bytes | memoryview] = []
        size = 0
        # A full-duplex shell says whether more body is at hand: a streaming client may
        # be waiting for the response before it sends more, so do not wait for it.
        ready: Callable[[], bool] | None = getattr(down, "body_ready", None)
        while size <= self.body_buffer:
            if ready is not None and not ready():
                log.bytes_in = size
                return chunks, False
            piece = await down.receive_body()
            if piece is None:
                log.bytes_in = size
                return chunks, True
            chunks.append(piece)
            size += len(piece)
        log.bytes_in = size
        return chunks, False

    def _upstream_head(self, head: RequestHead, request: Request, decision: RouteDecision
                       ) -> tuple[RequestHead, Headers]:
        """The head sent upstream (without the per-try headers) and its header lines."""
        drop = _hop_by_hop(head.headers)
        rewrite_host = decision.authority
        pairs: Headers = []
        has_request_id = False
        has_host = False
        trace = False
        for name, value in head.headers:
            if name in drop or name in _CONSUMED:
                continue
            if name == b"host":
                if rewrite_host is not None:
                    continue
                has_host = True
            elif name == b"x-request-id":
                has_request_id = True
            elif name in _TRACE:
                trace = True
            pairs.append((name, value))
        if rewrite_host is not None:
            pairs.append((b"host", rewrite_host.encode("latin-1")))
        elif request.authority and not has_host:
            pairs.append((b"host", request.authority.encode("latin-1")))
        if head.chunked:
            pairs.append((b"transfer-encoding", b"chunked"))
        if decision.request_headers:
            pairs = apply_header_ops_pairs(pairs, decision.request_headers)
        pairs.append((b"x-forwarded-proto", request.scheme.encode()))
        if not has_request_id:
            pairs.append((b"x-request-id", telemetry.new_request_id()))
        if trace:
            telemetry.propagate_trace(pairs)
        up = head
        if decision.path is not None or head.version != b"1.1":
            up = replace(head, target=(decision.path.encode("latin-1")
                                       if decision.path is not None else head.target),
                         version=b"1.1")
        return up, pairs

    async def _tries(self, up_head: RequestHead, pairs: Headers,
                     chunks: list[bytes | memoryview], complete: bool, down: Downstream,
                     request: Request, decision: RouteDecision, cstate: ClusterState,
                     limits: Deadlines, log: _Log, peer: PeerInfo) -> None:
        resilience = decision.resilience
        assert resilience is not None
        rng = self.rng
        picker = cstate.picker
        breaker = cstate.breaker
        retry = RetryState(resilience.retries, request.headers)
        clock = self._now if self._now is not None else trio.current_time
        hash_key = None
        ch = cstate.cluster.resilience.load_balancer.consistent_hash
        if ch is not None:
            key = request_hash(ch, request.headers, source_ip=peer.source_ip, path=request.path)
            hash_key = key.value if key is not None else None
        holding_retry = False
        try:
            while True:
                now = clock()
                if limits.expired(now):
                    await self._local(down, log, 504, TIMEOUT_BODY, flag="UT")
                    return
                host = picker.pick(now, rng, hash_key, retry.excluded_hosts(),
                                   avoid_excluded_levels=retry.avoid_previous_localities)
                if host is None:
                    await self._local(down, log, 503, NO_HEALTHY_UPSTREAM_BODY, flag="UH")
                    return
                spec = cstate.endpoints.get(host.address)
                if spec is None:
                    await self._local(down, log, 503, NO_HEALTHY_UPSTREAM_BODY, flag="UH")
                    return
                attempt = retry.start_try(host)
                log.attempts = attempt
                log.host = host.address
                log.spec_workload = spec.workload
                log.spec_version = spec.version
                try_pairs = [*pairs, (b"x-envoy-attempt-count", b"%d" % attempt)]
                expected = limits.expected_timeout_ms(now)
                if expected is not None:
                    try_pairs.append((b"x-envoy-expected-rq-timeout-ms", b"%d" % expected))
                try_deadline = limits.try_deadline(now)
                try_started = now
                picker.request_started(host)
                try:
                    outcome: TryOutcome | None = None
                    conn: UpstreamConnection | None = None
                    response: ResponseHead | None = None
                    timed_out = False
                    if try_deadline is None:
                        # No route or per-try timeout (the Gateway API and Istio default).
                        outcome, conn, response = await self._try(
                            cstate, host, spec.info, up_head, try_pairs, chunks, complete, down)
                    else:
                        # A cancel scope per try costs more than the rest of a small
                        # request's bookkeeping: the usual try (whole body, idle TCP
                        # connection) has its deadline kept by the shared TryTimer.
                        idle = cstate.pool.take_interruptible(host) if complete else None
                        if idle is not None:
                            result = await self._timed_try(
                                cstate, idle, host, spec.info, up_head, try_pairs, chunks,
                                down, try_deadline)
                        else:
                            result = await self._scoped_try(
                                cstate, host, spec.info, up_head, try_pairs, chunks, complete,
                                down, try_deadline)
                        if result is None:
                            timed_out = True
                        else:
                            outcome, conn, response = result
                    if holding_retry:
                        breaker.release_retry()
                        holding_retry = False
                    now = clock()
                    if timed_out:
                        picker.report_local_failure(host, LocalFailure.TIMEOUT, now)
                        if limits.expired(now):
                            await self._local(down, log, 504, TIMEOUT_BODY, flag="UT")
                            return
                        outcome = TryOutcome(OutcomeKind.PER_TRY_TIMEOUT)
                    assert outcome is not None
                    if outcome.kind is OutcomeKind.RESPONSE:
                        assert response is not None and conn is not None
                        picker.report_response(host, response.status, now)
                    elif outcome.kind is OutcomeKind.CONNECT_FAILURE:
                        picker.report_local_failure(host, LocalFailure.CONNECT_FAILURE, now)
                    elif outcome.kind is OutcomeKind.RESET:
                        picker.report_local_failure(host, LocalFailure.RESET, now)
                    verdict = retry.decide(outcome, body_held=complete, rng=rng)
                    if verdict.retry and breaker.try_retry():
                        holding_retry = True
                        if conn is not None:
                            await self._discard_response(cstate, conn, try_deadline)
                        remaining = limits.remaining(clock())
                        wait = verdict.backoff if remaining is None else min(verdict.backoff,
                                                                             remaining)
                        if wait > 0:
                            await trio.sleep(wait)
                        continue
                    if retry.attempts > 1 and outcome.kind is not OutcomeKind.RESPONSE:
                        log.flags.append("URX")
                    if conn is not None and response is not None:
                        await self._respond(conn, response, cstate, decision, down, log,
                                            now - try_started)
                        return
                    await self._failure_answer(down, log, outcome)
                    return
                finally:
                    picker.request_finished(host)
        except PoolOverflow:
            await self._local(down, log, 503, OVERFLOW_BODY, OVERFLOW_HEADERS, flag="UO")
        finally:
            if holding_retry:
                breaker.release_retry()

    async def _failure_answer(self, down: Downstream, log: _Log, outcome: TryOutcome) -> None:
        kind = outcome.kind
        if kind is OutcomeKind.PER_TRY_TIMEOUT:
            await self._local(down, log, 504, TIMEOUT_BODY, flag="UT")
        elif kind is OutcomeKind.CONNECT_FAILURE:
            await self._local(down, log, 503, CONNECT_FAILURE_BODY, flag="UF")
        else:
            await self._local(down, log, 503, RESET_BODY, flag="UC")

    async def _try(self, cstate: ClusterState, host: Host, endpoint: EndpointInfo,
                   up_head: RequestHead, pairs: Headers, chunks: list[bytes | memoryview],
                   complete: bool, down: Downstream, fresh_only: bool = False) -> _TryResult:
        """One try: a connection, the request, the response head.  A reused keep-alive
        connection the upstream closed meanwhile is replaced once, transparently
        (``fresh_only``: this call is that replacement)."""
        pool = cstate.pool
        for fresh in ((True,) if fresh_only else (False, True)):
            try:
                conn = await pool.acquire(host, endpoint)
            except PoolOverflow:
                raise
            except _CONNECT_ERRORS:
                return TryOutcome(OutcomeKind.CONNECT_FAILURE, request_started=False), None, None
            result = await self._exchange(cstate, conn, up_head, pairs, chunks, complete, down,
                                          fresh)
            if result is not None:
                return result
        raise AssertionError("unreachable")

    async def _scoped_try(self, cstate: ClusterState, host: Host, endpoint: EndpointInfo,
                          up_head: RequestHead, pairs: Headers,
                          chunks: list[bytes | memoryview], complete: bool, down: Downstream,
                          deadline: float, fresh_only: bool = False) -> _TryResult | None:
        """:meth:`_try` under a cancel scope ending at ``deadline``; ``None``: timed out."""
        with trio.CancelScope(deadline=deadline):
            return await self._try(cstate, host, endpoint, up_head, pairs, chunks, complete,
                                   down, fresh_only)
        return None

    async def _timed_try(self, cstate: ClusterState, conn: UpstreamConnection, host: Host,
                         endpoint: EndpointInfo, up_head: RequestHead, pairs: Headers,
                         chunks: list[bytes | memoryview], down: Downstream, deadline: float
                         ) -> _TryResult | None:
        """A try with its whole body at hand on ``conn``, an idle plain-TCP connection:
        nothing in it can wait but the stream, so the :class:`TryTimer` keeps its deadline
        instead of a cancel scope (the usual request's case).  ``None``: timed out."""
        timer = self._timer
        entry = timer.start(deadline, conn)
        try:
            result = await self._exchange(cstate, conn, up_head, pairs, chunks, True, down,
                                          False)
        finally:
            timer.stop(entry)
        if conn.interrupted:
            if result is not None and result[1] is not None:
                # The head came in as the deadline passed: a cancel scope would have
                # cancelled the try at its last checkpoint all the same.
                await cstate.pool.release(conn, reusable=False)
            return None
        if result is None:  # the upstream had closed it: one fresh connection, scoped
            return await self._scoped_try(cstate, host, endpoint, up_head, pairs, chunks, True,
                                          down, deadline, fresh_only=True)
        return result

    async def _exchange(self, cstate: ClusterState, conn: UpstreamConnection,
                        up_head: RequestHead, pairs: Headers, chunks: list[bytes | memoryview],
                        complete: bool, down: Downstream, fresh: bool) -> _TryResult | None:
        """Send the request on ``conn`` and read the response head.  ``None``: ``conn``
        was a reused keep-alive connection the upstream had closed before reading the
        request (released; the caller replaces it once)."""
        pool = cstate.pool
        reused = conn.served > 0
        sent_all = False
        try:
            conn.parser.expect_response(up_head.method)
            writer = conn.writer
            out: list[bytes | memoryview] = [writer.head(up_head, pairs)]
            for piece in chunks:
                out.extend(writer.data(piece))
            if complete:
                out.append(writer.end())
                stream = conn.stream
                if type(stream) is TcpStream:
                    # The next step is the wait for the response: the request can go
                    # out with the others of this scheduler pass.
                    self.sends.defer(stream, b"".join(out))
                else:
                    await stream.send_all(b"".join(out))
            else:
                await conn.stream.send_all(b"".join(out))
                nursery: trio.Nursery | None = getattr(down, "nursery", None)
                if nursery is not None:
                    # Full duplex (streaming gRPC): the rest of the body goes up
                    # while the response comes down.
                    self._pumping.add(id(conn))
                    nursery.start_soon(self._pump_body, down, conn)
                else:
                    while (more := await down.receive_body()) is not None:
                        await conn.stream.send_all(b"".join(writer.data(more)))
                    await conn.stream.send_all(writer.end())
            sent_all = True
            while True:
                event = await conn.next_event()
                if isinstance(event, ResponseHead):
                    if event.status < 200 and event.status != 101:
                        continue
                    return _response_outcome(event), conn, event
                raise Http1Error(f"upstream sent {type(event).__name__} before a "
                                 f"response head", 502)
        except _EXCHANGE_ERRORS as exc:
            await pool.release(conn, reusable=False)
            if (reused and not fresh and complete and conn.parser.buffered == 0
                    and not conn.interrupted):
                _log.debug("reused upstream connection was closed; retrying on a new one",
                           upstream=conn.host.address, reason=str(exc), sent=sent_all)
                return None
            return TryOutcome(OutcomeKind.RESET), None, None
        except BaseException:
            await pool.release(conn, reusable=False)
            raise

    async def _pump_body(self, down: Downstream, conn: UpstreamConnection) -> None:
        """Send the rest of a streamed request body; a failure shows on the response side
        (a connection still sending when its response ended is not reused)."""
        writer = conn.writer
        try:
            while (more := await down.receive_body()) is not None:
                await conn.stream.send_all(b"".join(writer.data(more)))
            await conn.stream.send_all(writer.end())
        except _EXCHANGE_ERRORS as exc:
            _log.debug("request body not sent whole", upstream=conn.host.address, reason=str(exc))
        finally:
            self._pumping.discard(id(conn))

    async def _discard_response(self, cstate: ClusterState, conn: UpstreamConnection,
                                deadline: float | None) -> None:
        """Throw away a response that will be retried: drain a small body, else close."""
        parser = conn.parser
        reusable = False
        with trio.move_on_at(math.inf if deadline is None else deadline):
            drained = 0
            try:
                while drained <= DRAIN_LIMIT:
                    event = await conn.next_event()
                    if isinstance(event, Data):
                        drained += len(event.data)
                    elif isinstance(event, EndOfMessage):
                        reusable = not parser.must_close
                        break
            except _EXCHANGE_ERRORS:
                reusable = False
        await cstate.pool.release(conn, reusable and id(conn) not in self._pumping)

    async def _respond(self, conn: UpstreamConnection, response: ResponseHead,
                       cstate: ClusterState, decision: RouteDecision, down: Downstream,
                       log: _Log, service_time: float) -> None:
        """Send the upstream's response downstream, body streamed; release the connection.

        ``service_time``: seconds from the start of the try to its response head
        (``x-envoy-upstream-service-time``).
        """
        log.status = response.status
        drop = _hop_by_hop(response.headers)
        pairs: Headers = [h for h in response.headers if h[0] not in drop]
        if response.chunked:
            pairs.append((b"transfer-encoding", b"chunked"))
        if decision.response_headers:
            pairs = apply_header_ops_pairs(pairs, decision.response_headers)
        pairs.append((b"x-envoy-upstream-service-time", b"%d" % max(0, round(service_time * 1000))))
        down.start_response(response.status, pairs, response.reason)
        total = 0
        ok = False
        try:
            while True:
                event = conn.parser.next_event()
                if isinstance(event, Data):
                    down.write_data(event.data)
                    total += len(event.data)
                    continue
                if isinstance(event, EndOfMessage):
                    down.write_end(event.trailers)
                    ok = True
                    break
                await down.flush()
                try:
                    event2 = await conn.next_event()
                except _EXCHANGE_ERRORS as exc:
                    raise ResponseAbortedError(
                        f"upstream {conn.host.address} broke the response body: {exc}") from exc
                if isinstance(event2, Data):
                    down.write_data(event2.data)
                    total += len(event2.data)
                elif isinstance(event2, EndOfMessage):
                    down.write_end(event2.trailers)
                    ok = True
                    break
        finally:
            log.bytes_out = total
            await cstate.pool.release(conn, reusable=ok and id(conn) not in self._pumping)
        await down.flush()

    # --- telemetry -----------------------------------------------------------------

    def _record(self, peer: PeerInfo, log: _Log, started: float, request: Request) -> None:
        duration_ms = (self._clock() - started) * 1000.0
        flags = ",".join(log.flags) if log.flags else "-"
        destination = log.destination
        name = destination.split(".", 1)[0] if destination != UNKNOWN else UNKNOWN
        key = (peer.source_workload, peer.source_namespace, peer.principal, destination, name,
               log.spec_workload, log.spec_version, str(log.status), flags)
        self.metrics.record(key, duration_ms, log.bytes_in, log.bytes_out)
        if self.access_log:
            telemetry.access_log.info(
                "request", method=request.method, path=request.path,
                authority=request.authority, status=log.status, flags=flags,
                duration_ms=round(duration_ms, 3), route=log.route, cluster=log.upstream,
                upstream=log.host, attempts=log.attempts, bytes_in=log.bytes_in,
                bytes_out=log.bytes_out, source=peer.source_ip, principal=peer.principal)

