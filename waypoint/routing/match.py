"""Per-request routing: a request and a route table in, one :class:`RouteDecision` out.

Cost per request: one dict hit for the destination service, then for Gateway
API routes one dict hit for the exact path and one per path segment for
prefixes (candidates are pre-sorted, so the first full match wins), and for a
VirtualService a scan of that one service's ``http`` entries.  Randomness is an
input (``random.Random``) so weighted picks and mirror draws are reproducible.

Outcomes (Gateway API spec and Envoy/Istio):

* no service or no matching rule -> 404, response flag ``NR`` (Envoy "route not found");
* a rule without usable backends, all weights zero, or a draw landing on an
  invalid backend -> 500;
* redirect -> its status and ``Location``; direct response -> its status and body;
* otherwise FORWARD to the picked cluster with header mutations, rewritten path
  and host, mirror targets and the route's resilience policy.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from urllib.parse import unquote

from waypoint.resilience.config import RouteResilience
from waypoint.routing.filters import (
    join_target,
    redirect_location,
    rewrite_path,
    shadow_authority,
    split_authority,
    split_target,
)
from waypoint.routing.model import (
    NO_HEADER_OPS,
    Candidate,
    Cluster,
    HeaderOps,
    PathKind,
    RequestMatch,
    RouteRule,
    RoutesKind,
    RouteTable,
    ServiceRoutes,
)

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


# Request and RouteDecision are made once per request: plain slotted dataclasses, because a
# frozen one pays an object.__setattr__ per field (measured 3x slower to build).  Treat
# them as read-only.
@dataclass(slots=True)
class Request:
    """What routing needs to know about one request.

    ``headers``: lower-case names, repeated headers joined with ``,`` (RFC 9110
    field combination; the Gateway API leaves repeated headers to the
    implementation).  ``path`` is the request target (path and query).
    ``port``: the service port the connection was addressed to (from the HBONE
    ``:authority``); None takes the port of ``authority``, else 80.
    ``destination``: the VIP the connection was addressed to, when known; it
    wins over the Host header, as in Istio's waypoint.
    """

    method: str
    authority: str
    path: str
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    port: int | None = None
    destination: str | None = None
    scheme: str = "http"
    source_labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    source_namespace: str | None = None


def header_map(pairs: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header lines (lower-case names, as the HTTP codecs give them) -> :attr:`Request.headers`.

    Repeated fields are joined with ``,`` (RFC 9110 5.3), ``cookie`` with ``; `` (RFC 9113
    8.2.3), so a match sees what Envoy's header matcher sees.
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        old = out.get(name)
        if old is None:
            out[name] = value
        else:
            out[name] = f"{old}; {value}" if name == "cookie" else f"{old},{value}"
    return out


class Outcome(Enum):
    FORWARD = "forward"
    REDIRECT = "redirect"
    DIRECT_RESPONSE = "direct_response"
    NOT_FOUND = "not_found"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """A copy of the request to send, fire and forget, to ``cluster``.

    The copy is the request as forwarded (header mutations and rewrites applied, as
    Envoy mirrors after the route's request transforms) with Host ``authority``
    (``-shadow`` appended).  Its response is dropped and its failures never reach
    the client.
    """

    cluster: Cluster
    authority: str


@dataclass(slots=True)
class RouteDecision:
    """What to do with one request.

    ``status`` is set for every local answer (redirect, direct response, 404,
    500) and None for FORWARD.  ``path`` / ``authority`` are None when
    unchanged.  ``request_headers`` / ``response_headers`` are the mutations
    to apply (rule then backend).  ``response_flag`` follows Envoy's access log
    flags (``NR`` no route).
    """

    outcome: Outcome
    status: int | None = None
    rule: RouteRule | None = None
    match: RequestMatch | None = None
    cluster: Cluster | None = None
    backend_name: str | None = None
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    path: str | None = None
    authority: str | None = None
    location: str | None = None
    body: bytes = b""
    mirrors: tuple[MirrorTarget, ...] = ()
    resilience: RouteResilience | None = None
    response_flag: str = ""

    @property
    def route_name(self) -> str:
        """The rule's identity for metrics and logs (empty when no rule matched)."""
        return self.rule.route_name if self.rule is not None else ""


def not_found() -> RouteDecision:
    """404 with Envoy's ``NR`` flag: no service or no rule for the request (a fresh value)."""
    return RouteDecision(outcome=Outcome.NOT_FOUND, status=404, response_flag="NR")


def find_service(table: RouteTable, request: Request) -> tuple[ServiceRoutes | None, int]:
    """The routes for the request's destination service, and the service port used."""
    host, host_port = split_authority(request.authority)
    if host.startswith("["):
        host = host[1:-1]  # a v6 literal: VIPs are indexed without brackets
    elif host.endswith("."):
        host = host[:-1]  # an absolute FQDN
    port = request.port if request.port is not None else (host_port or 80)
    routes = None
    if request.destination is not None:
        routes = table.lookup(request.destination, port)
    if routes is None:
        routes = table.lookup(host, port)
    return routes, port


def route(table: RouteTable, request: Request, rng: random.Random) -> RouteDecision:
    """Route one request: the decision the HTTP shell executes."""
    routes, port = find_service(table, request)
    if routes is None:
        return not_found()
    path, query = split_target(request.path)
    hit = select(routes, request, path, query, port)
    if hit is None:
        return not_found()
    return decide(hit, request, path, query, port, rng)


def select(routes: ServiceRoutes, request: Request, path: str, query: str,
           port: int) -> Candidate | None:
    """The first candidate, in precedence order, whose match holds."""
    params = _QueryParams(query)
    if routes.kind is RoutesKind.GATEWAY:
        bucket = routes.exact.get(path)
        if bucket:
            for cand in bucket:
                if not cand.match.has_conditions or _conditions(cand.match, request, params,
                                                                port):
                    return cand
        if routes.prefix:
            for key in _prefix_keys(path, routes.max_prefix_segments):
                bucket = routes.prefix.get(key)
                if bucket:
                    for cand in bucket:
                        if not cand.match.has_conditions or _conditions(
                                cand.match, request, params, port):
                            return cand
    for cand in routes.rest:
        match = cand.match
        if _path_matches(match, path) and (not match.has_conditions
                                           or _conditions(match, request, params, port)):
            return cand
    return None


class _QueryParams:
    """Query parameters parsed on first use: most routes never look at them."""

    __slots__ = ("_params", "_query")

    def __init__(self, query: str) -> None:
        self._query = query
        self._params: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        if self._params is None:
            self._params = parse_query(self._query)
        return self._params.get(name)


def _prefix_keys(path: str, max_segments: int) -> list[str]:
    """Normalised prefixes that can match ``path`` on segment boundaries, longest first.

    Segments deeper than the table's longest prefix cannot match, so the walk
    starts there: a path of a hundred segments costs as much as a short one.
    """
    s = path
    if s.count("/") > max_segments:
        cut = -1
        for _ in range(max_segments + 1):
            cut = s.find("/", cut + 1)
        s = s[:cut]
    keys = []
    while True:
        if len(s) > 1 and not s.endswith("/"):
            keys.append(s)
        cut = s.rfind("/")
        if cut <= 0:
            break
        s = s[:cut]
    keys.append("/")
    return keys


def _path_matches(match: RequestMatch, path: str) -> bool:
    kind = match.path_kind
    if kind is PathKind.ANY:
        return True
    if match.path_lower:
        path = path.lower()
    if kind is PathKind.EXACT:
        return path == match.path
    if kind is PathKind.PREFIX:
        if not match.segment_prefix:
            return path.startswith(match.path)
        prefix = match.path
        return (prefix == "/" or path == prefix
                or (path.startswith(prefix) and path[len(prefix)] == "/"))
    assert match.path_pattern is not None
    return match.path_pattern.fullmatch(path) is not None


def _conditions(match: RequestMatch, request: Request, params: _QueryParams, port: int) -> bool:
    """Every non-path condition of ``match``."""
    if match.method is not None and request.method != match.method:
        return False
    if match.port is not None and port != match.port:
        return False
    headers = request.headers
    for name, matcher in match.headers:
        value = headers.get(name)
        if value is None or not matcher.matches(value):
            return False
    for name, absent in match.without_headers:
        value = headers.get(name)
        if value is not None and (absent is None or absent.matches(value)):
            return False
    for name, matcher in match.query:
        value = params.get(name)
        if value is None or not matcher.matches(value):
            return False
    if match.authority is not None and not match.authority.matches(request.authority):
        return False
    if match.scheme is not None and not match.scheme.matches(request.scheme):
        return False
    if match.source_namespace is not None and request.source_namespace != match.source_namespace:
        return False
    labels = request.source_labels
    return all(labels.get(k) == v for k, v in match.source_labels)


def parse_query(query: str) -> dict[str, str]:
    """Query parameters, percent-decoded; the first value of a repeated name wins."""
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote(name)
        if name not in params:
            params[name] = unquote(value)
    return params


def decide(cand: Candidate, request: Request, path: str, query: str, port: int,
           rng: random.Random) -> RouteDecision:
    """Turn the matched candidate into a decision (pick the backend, rewrite, mirror)."""
    rule, match = cand.rule, cand.match
    if rule.fixed_status is not None:
        return RouteDecision(outcome=Outcome.ERROR, status=rule.fixed_status, rule=rule,
                             match=match, response_headers=rule.response_headers)
    if rule.redirect is not None:
        location = redirect_location(rule.redirect, scheme=request.scheme,
                                     authority=request.authority, port=port, path=path,
                                     query=query, match=match)
        return RouteDecision(outcome=Outcome.REDIRECT, status=rule.redirect.status, rule=rule,
                             match=match, location=location,
                             response_headers=rule.response_headers)
    if rule.direct is not None:
        return RouteDecision(outcome=Outcome.DIRECT_RESPONSE, status=rule.direct.status,
                             rule=rule, match=match, body=rule.direct.body,
                             response_headers=rule.response_headers)
    total = rule.total_weight
    if total <= 0:
        return RouteDecision(outcome=Outcome.ERROR, status=500, rule=rule, match=match,
                             response_headers=rule.response_headers)
    backends = rule.backends
    if len(backends) == 1:
        backend = backends[0]
    else:
        backend = backends[bisect.bisect_right(rule.cumulative, rng.random() * total)]
    if backend.cluster is None:
        return RouteDecision(outcome=Outcome.ERROR, status=backend.invalid_status, rule=rule,
                             match=match,
                             backend_name=backend.name,
                             response_flag="NC" if backend.invalid_status == 503 else "",
                             response_headers=rule.response_headers)
    new_path = None
    if rule.path_rewrite is not None:
        new_path = join_target(rewrite_path(path, match, rule.path_rewrite), query)
    new_authority = rule.host_rewrite
    mirrors: tuple[MirrorTarget, ...] = ()
    if rule.mirrors:
        shadow = shadow_authority(new_authority or request.authority)
        mirrors = tuple(MirrorTarget(cluster=m.cluster, authority=shadow) for m in rule.mirrors
                        if m.fraction >= 1.0 or rng.random() < m.fraction)
    return RouteDecision(
        outcome=Outcome.FORWARD, rule=rule, match=match, cluster=backend.cluster,
        backend_name=backend.name,
        request_headers=backend.request_headers, response_headers=backend.response_headers,
        path=new_path, authority=new_authority, mirrors=mirrors, resilience=rule.resilience)
