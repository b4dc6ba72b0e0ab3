"""The waypoint's internal route table: immutable, precompiled, indexed for dict-hit lookups.

Theory of operation
-------------------
The translator (:mod:`waypoint.routing.translate`) turns Gateway API ``HTTPRoute``
and Istio ``VirtualService`` / ``DestinationRule`` objects plus the service
catalogue into one :class:`RouteTable`.  Everything that can be decided once is
decided then: regexes compiled, header names lower-cased and encoded, weights
made cumulative, precedence sorted, clusters resolved.  The per-request engine
(:mod:`waypoint.routing.match`) only does dict hits and short scans of the
candidates of one service.

Lookup is two-level:

1. ``(destination, port)`` -> :class:`ServiceRoutes`, where destination is a
   service VIP or any Host form of the service (``svc.ns.svc.<domain>``,
   ``svc.ns.svc``, ``svc.ns``, and ``svc`` for the waypoint's own namespace).
2. Inside one service: for Gateway API routes, candidates bucketed by exact
   path, then by normalised path prefix (tried longest first, one dict hit per
   path segment), then regex candidates; each bucket is already in precedence
   order, so the first full match wins.  For a VirtualService, its ``http``
   entries in order (Istio: first match wins).

Which API wins: when an ``HTTPRoute`` (GAMMA Service parent) and a
``VirtualService`` both name the same service, the ``HTTPRoute`` wins and the
VirtualService is reported as conflicting for that host.  Istio documents the
same for waypoints ("VirtualService may be used ... as long as its hosts do not
conflict with the parentRefs of any Gateway API route").  Among several
VirtualServices for one host the oldest wins (Istio does not merge them for
waypoints); among several HTTPRoutes all rules are merged by Gateway API
precedence.

Regex path precedence is implementation-specific in the Gateway API; this table
ranks like Istio's Gateway API conversion: Exact > PathPrefix (longer first) >
RegularExpression (longer pattern first), then method, headers, query params.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from waypoint.resilience.config import ClusterResilience, RouteResilience

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Which API object something came from (for errors, metrics and logs)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem with one API object; the rest of the table is unaffected.

    ``field`` is the path inside the object (``spec.rules[0].matches[1].path``).
    A later piece turns these into status conditions / events and log lines.
    """

    ref: ObjectRef
    field: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.ref}: {self.field}: {self.message}"


class PathKind(Enum):
    """How a match constrains the path; order is precedence (Exact first)."""

    EXACT = 0
    PREFIX = 1
    REGEX = 2
    ANY = 3


class StringKind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """A compiled string condition (Istio ``StringMatch``, Gateway API header/query match)."""

    kind: StringKind
    value: str
    pattern: re.Pattern[str] | None = None
    ignore_case: bool = False

    def matches(self, text: str) -> bool:
        """True when ``text`` satisfies the condition (regex: full match, as RE2 in Envoy)."""
        if self.ignore_case:
            text = text.lower()
        if self.kind is StringKind.EXACT:
            return text == self.value
        if self.kind is StringKind.PREFIX:
            return text.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One compiled match: every condition must hold.

    ``path`` for PREFIX is normalised: Gateway API prefixes lose a trailing
    ``/`` and match on segment boundaries (``segment_prefix``); Istio prefixes
    are plain string prefixes.  ``path_lower`` marks Istio ``ignoreUriCase``.
    """

    path_kind: PathKind = PathKind.ANY
    path: str = ""
    raw_path: str = ""
    path_pattern: re.Pattern[str] | None = None
    segment_prefix: bool = True
    path_lower: bool = False
    method: str | None = None
    headers: tuple[tuple[str, StringMatcher], ...] = ()
    without_headers: tuple[tuple[str, StringMatcher | None], ...] = ()
    query: tuple[tuple[str, StringMatcher], ...] = ()
    authority: StringMatcher | None = None
    scheme: StringMatcher | None = None
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str | None = None
    name: str | None = None
    #: False when the path is the only condition, so the engine can skip the rest.
    has_conditions: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "has_conditions", bool(
            self.method or self.headers or self.without_headers or self.query or self.authority
            or self.scheme or self.port or self.source_labels or self.source_namespace))


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header mutations in application order: remove, then set (replace), then add (append).

    Names are lower-case.  ``add`` appends a value; on a header map the value is
    joined with ``,`` (Gateway API conformance: ``some-value,added``).
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def then(self, later: HeaderOps) -> HeaderOps:
        """These operations followed by ``later`` (a later set of a name wins)."""
        if not later:
            return self
        if not self:
            return later
        return HeaderOps(set=self.set + later.set, add=self.add + later.add,
                         remove=self.remove + later.remove)


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Cluster:
    """An upstream cluster: one service port, optionally narrowed to a subset.

    ``name`` follows Envoy/Istio (``outbound|<port>|<subset>|<host>``) so metrics
    and logs read like Istio's.  ``subset_labels`` select endpoints.
    """

    name: str
    host: str
    port: int
    service_namespace: str
    service_name: str
    subset: str | None = None
    subset_labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS)
    resilience: ClusterResilience = field(default_factory=ClusterResilience)
    tls_mode: str | None = None


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    """A weighted destination of a rule.

    ``cluster`` None marks a backend that did not resolve: requests drawn to it
    are answered ``invalid_status`` (Gateway API 500; Istio/Envoy 503 "cluster
    not found").  The header operations are the rule's followed by the
    backend's own, combined at translation so a request does no merging.
    """

    name: str
    weight: int
    cluster: Cluster | None
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    invalid_status: int = 500


class PathRewriteKind(Enum):
    FULL = "full"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """A path replacement.

    FULL replaces the whole path.  PREFIX replaces the prefix the request
    matched (Gateway API ``ReplacePrefixMatch`` on segment boundaries, or
    Istio ``rewrite.uri`` after a prefix match; after another match kind Istio
    replaces the whole path).  REGEX is Istio ``uriRegexRewrite``.
    ``gateway_semantics`` selects the Gateway API slash handling.
    """

    kind: PathRewriteKind
    value: str
    pattern: re.Pattern[str] | None = None
    gateway_semantics: bool = True


@dataclass(frozen=True, slots=True)
class Redirect:
    """A redirect answer (Gateway API ``RequestRedirect`` or Istio ``redirect``)."""

    status: int
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: PathRewrite | None = None
    #: Gateway API: an explicit scheme implies its well-known port; Istio keeps the request port.
    gateway_semantics: bool = True
    #: Istio ``derivePort``: FROM_REQUEST_PORT keeps the request's port, FROM_PROTOCOL_DEFAULT
    #: uses the scheme's default (so the Location carries none).
    derive_port_from_request: bool = False
    protocol_default_port: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Mirror:
    """Send a copy to ``cluster`` for ``fraction`` (0..1) of requests; fire and forget."""

    cluster: Cluster
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule (an HTTPRoute rule or a VirtualService ``http`` entry), fully compiled.

    ``route_name`` identifies it for metrics and logs (``ns/name`` plus the rule
    name or index).  Exactly one outcome applies: ``fixed_status`` (an invalid
    rule answers it, e.g. 500), ``redirect``, ``direct``, or forwarding to one
    of ``backends`` picked by weight (no backends, or all weights zero -> 500).
    """

    source: ObjectRef
    route_name: str
    index: int
    backends: tuple[WeightedBackend, ...] = ()
    cumulative: tuple[int, ...] = ()
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    path_rewrite: PathRewrite | None = None
    host_rewrite: str | None = None
    redirect: Redirect | None = None
    direct: DirectResponse | None = None
    fixed_status: int | None = None
    mirrors: tuple[Mirror, ...] = ()
    resilience: RouteResilience = field(default_factory=RouteResilience)

    @property
    def total_weight(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A (match, rule) pair in precedence order."""

    match: RequestMatch
    rule: RouteRule


class RoutesKind(Enum):
    GATEWAY = "HTTPRoute"
    ISTIO = "VirtualService"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """Everything the waypoint needs to route requests addressed to one service port.

    GATEWAY: ``exact`` and ``prefix`` map a path (or normalised prefix) to
    candidates in precedence order; ``rest`` holds regex and path-less
    candidates, also in order.  ISTIO and DEFAULT: ``rest`` in list order,
    first match wins.
    """

    kind: RoutesKind
    host: str
    port: int
    service_namespace: str
    exact: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)
    prefix: Mapping[str, tuple[Candidate, ...]] = field(default_factory=dict)
    rest: tuple[Candidate, ...] = ()
    #: The longest prefix in ``prefix`` (in segments); bounds the per-request walk.
    max_prefix_segments: int = 0


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The whole routing state of one waypoint; swapped atomically, never mutated."""

    by_destination: Mapping[tuple[str, int], ServiceRoutes]
    clusters: Mapping[str, Cluster]
    issues: tuple[ConfigIssue, ...] = ()
    version: int = 0
    #: Objects whose given version is not in this table because it is invalid (the
    #: store may serve an earlier valid version of them instead).
    rejected: frozenset[ObjectRef] = frozenset()

    def lookup(self, destination: str, port: int) -> ServiceRoutes | None:
        """The routes for a VIP or Host (without port, any case) and a service port."""
        routes = self.by_destination.get((destination, port))
        if routes is None and destination != (lowered := destination.lower()):
            routes = self.by_destination.get((lowered, port))
        return routes


EMPTY_TABLE = RouteTable(by_destination=MappingProxyType({}), clusters=MappingProxyType({}))
