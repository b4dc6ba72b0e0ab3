"""Gateway API ``HTTPRoute`` (GAMMA, Service parents) -> route rules and candidates.

Precedence (Gateway API ``HTTPRouteRule`` reference): Exact path, then the longest
PathPrefix, then (implementation-specific, as Istio ranks it) RegularExpression by
pattern length; then method, most header matches, most query matches; then the
oldest route, then namespace/name; then rule and match order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from common.api import gateway as gw
from common.errors import ConfigError
from waypoint.routing.catalog import ApiObject, ServiceInfo
from waypoint.routing.context import Context, InvalidSpec, after_rule_ops, cumulative
from waypoint.routing.model import (
    NO_HEADER_OPS,
    Candidate,
    Cluster,
    HeaderOps,
    Mirror,
    PathKind,
    PathRewrite,
    PathRewriteKind,
    Redirect,
    RequestMatch,
    RouteRule,
    RoutesKind,
    ServiceRoutes,
    StringKind,
    StringMatcher,
    WeightedBackend,
)
from waypoint.routing.policies import gateway_resilience
from waypoint.routing.regex import compile_safe

#: Status for a request that lands on an unusable backend (Gateway API spec).
GATEWAY_INVALID_BACKEND_STATUS = 500


class GatewayTranslation(Context):
    """HTTPRoutes with Service parents -> precedence-keyed candidates per service port."""

    def http_route(self, obj: ApiObject,
                   out: dict[tuple[str, str, int], list[tuple[tuple[Any, ...], Candidate]]],
                   ) -> None:
        spec = self.parse(obj, gw.HTTPRouteSpec)
        if spec is None:
            return
        targets = self.gateway_parents(obj, spec)
        if not targets:
            return
        if spec.hostnames:
            self.issue(obj.ref, "spec.hostnames", "hostnames are ignored for Service parents "
                       "(GEP-1294); match the Host header with a header match instead",
                       "warning")
        try:
            rules = [self.gateway_rule(obj, rule, i) for i, rule in enumerate(spec.rules)]
        except InvalidSpec as exc:
            self.reject(obj.ref, exc.field, str(exc))
            return
        for svc, ports in targets:
            for port in ports:
                bucket = out[(svc.namespace, svc.name, port)]
                for ri, (rule, matches) in enumerate(rules):
                    for mi, match in enumerate(matches):
                        key = (match.path_kind.value, -len(match.raw_path),
                               0 if match.method else 1, -len(match.headers), -len(match.query),
                               obj.creation_timestamp, obj.namespace, obj.name, ri, mi)
                        bucket.append((key, Candidate(match, rule)))

    def gateway_parents(self, obj: ApiObject, spec: gw.HTTPRouteSpec,
                        ) -> list[tuple[ServiceInfo, list[int]]]:
        targets = []
        for i, parent in enumerate(spec.parent_refs):
            if not parent.is_service:
                continue  # a north-south Gateway parent: not the waypoint's business
            where = f"spec.parentRefs[{i}]"
            ns = parent.namespace or obj.namespace
            if ns != obj.namespace:
                self.issue(obj.ref, where, "a parent Service in another namespace (a GAMMA "
                           "consumer route) is not supported by the waypoint; ignored", "warning")
                continue
            svc = self.catalog.get(ns, parent.name)
            if svc is None:
                self.issue(obj.ref, where, f"parent Service {ns}/{parent.name} not found",
                           "warning")
                continue
            if (ns, parent.name) not in self.served:
                continue  # another waypoint's service
            if parent.port is not None:
                if svc.port_by_number(parent.port) is None:
                    self.issue(obj.ref, f"{where}.port",
                               f"Service {ns}/{parent.name} has no port {parent.port}")
                    continue
                ports = [parent.port]
            elif parent.section_name is not None:
                named = svc.port_by_name(parent.section_name)
                if named is None:
                    self.issue(obj.ref, f"{where}.sectionName",
                               f"Service {ns}/{parent.name} has no port named "
                               f"{parent.section_name!r}")
                    continue
                ports = [named.port]
            else:
                ports = [p.port for p in svc.ports]
            targets.append((svc, ports))
        return targets

    def gateway_rule(self, obj: ApiObject, spec: gw.HTTPRouteRule, index: int,
                     ) -> tuple[RouteRule, list[RequestMatch]]:
        where = f"spec.rules[{index}]"
        matches = [self.gateway_match(m, f"{where}.matches[{j}]")
                   for j, m in enumerate(spec.matches)]
        req_ops = resp_ops = NO_HEADER_OPS
        redirect: Redirect | None = None
        path_rewrite: PathRewrite | None = None
        host_rewrite: str | None = None
        rewrites = 0
        mirrors: list[Mirror] = []
        for k, f in enumerate(spec.filters):
            fw = f"{where}.filters[{k}]"
            if f.request_header_modifier is not None:
                req_ops = req_ops.then(_gateway_header_ops(f.request_header_modifier))
            elif f.response_header_modifier is not None:
                resp_ops = resp_ops.then(_gateway_header_ops(f.response_header_modifier))
            elif f.request_redirect is not None:
                if redirect is not None:
                    raise InvalidSpec(fw, "a rule may have at most one RequestRedirect filter")
                redirect = _gateway_redirect(f.request_redirect, matches, fw)
            elif f.url_rewrite is not None:
                rewrites += 1
                if rewrites > 1:
                    raise InvalidSpec(fw, "a rule may have at most one URLRewrite filter")
                host_rewrite = f.url_rewrite.hostname
                if f.url_rewrite.path is not None:
                    path_rewrite = _gateway_path_modifier(f.url_rewrite.path, matches, fw)
            elif f.request_mirror is not None:
                mirror = self.gateway_mirror(obj, f.request_mirror, fw)
                if mirror is not None:
                    mirrors.append(mirror)
            else:
                raise InvalidSpec(fw, f"filter type {f.type} is not supported by the waypoint")
        if redirect is not None and rewrites:
            raise InvalidSpec(where, "RequestRedirect and URLRewrite cannot be used on one rule")
        backends = tuple(self.gateway_backend(obj, b, f"{where}.backendRefs[{j}]")
                         for j, b in enumerate(spec.backend_refs))
        try:
            resilience = gateway_resilience(spec)
        except ConfigError as exc:
            raise InvalidSpec(where, str(exc)) from exc
        backends = after_rule_ops(backends, req_ops, resp_ops)
        rule = RouteRule(source=obj.ref, index=index,
                         route_name=f"{obj.namespace}/{obj.name}/{spec.name or index}",
                         backends=backends, cumulative=cumulative(backends),
                         request_headers=req_ops, response_headers=resp_ops,
                         path_rewrite=path_rewrite, host_rewrite=host_rewrite, redirect=redirect,
                         mirrors=tuple(mirrors), resilience=resilience)
        return rule, matches

    def gateway_match(self, spec: gw.HTTPRouteMatch, where: str) -> RequestMatch:
        path = spec.path
        value = path.value
        try:
            if path.type == "RegularExpression":
                match = RequestMatch(path_kind=PathKind.REGEX, path=value, raw_path=value,
                                     path_pattern=compile_safe(value))
            else:
                _check_gateway_path(value)
                if path.type == "Exact":
                    match = RequestMatch(path_kind=PathKind.EXACT, path=value, raw_path=value)
                else:
                    match = RequestMatch(path_kind=PathKind.PREFIX,
                                         path=value.rstrip("/") or "/", raw_path=value)
            headers: dict[str, StringMatcher] = {}
            for h in spec.headers:
                # Only the first entry for a name counts (names are case-insensitive).
                headers.setdefault(h.name.lower(), _gateway_value_matcher(h.type, h.value))
            query: dict[str, StringMatcher] = {}
            for q in spec.query_params:
                query.setdefault(q.name, _gateway_value_matcher(q.type, q.value))
        except ConfigError as exc:
            raise InvalidSpec(where, str(exc)) from exc
        return RequestMatch(path_kind=match.path_kind, path=match.path, raw_path=match.raw_path,
                            path_pattern=match.path_pattern, method=spec.method,
                            headers=tuple(headers.items()), query=tuple(query.items()))

    def gateway_backend(self, obj: ApiObject, ref: gw.HTTPBackendRef,
                        where: str) -> WeightedBackend:
        req_ops = resp_ops = NO_HEADER_OPS
        for k, f in enumerate(ref.filters):
            if f.request_header_modifier is not None:
                req_ops = req_ops.then(_gateway_header_ops(f.request_header_modifier))
            elif f.response_header_modifier is not None:
                resp_ops = resp_ops.then(_gateway_header_ops(f.response_header_modifier))
            else:
                raise InvalidSpec(f"{where}.filters[{k}]", f"filter type {f.type} is not "
                               "supported on a backendRef by the waypoint")
        cluster, problem = self.gateway_service_ref(obj, ref)
        if problem is not None:
            self.issue(obj.ref, where, f"{problem}; requests routed to it get "
                       f"{GATEWAY_INVALID_BACKEND_STATUS}")
        return WeightedBackend(name=ref.name, weight=ref.weight, cluster=cluster,
                               request_headers=req_ops, response_headers=resp_ops)

    def gateway_service_ref(self, obj: ApiObject, ref: gw.BackendObjectReference,
                            ) -> tuple[Cluster | None, str | None]:
        ns = ref.namespace or obj.namespace
        if ref.group not in ("", "core") or ref.kind != "Service":
            return None, f"backend kind {ref.group or 'core'}/{ref.kind} is not supported"
        if ns != obj.namespace:
            return None, (f"backend {ns}/{ref.name} is in another namespace; a ReferenceGrant "
                          "is needed and the waypoint does not support them yet "
                          "(RefNotPermitted)")
        if ref.port is None:
            return None, "port is required for a Service backend"
        svc = self.catalog.get(ns, ref.name)
        if svc is None:
            return None, f"backend Service {ns}/{ref.name} not found (BackendNotFound)"
        if svc.port_by_number(ref.port) is None:
            return None, f"backend Service {ns}/{ref.name} has no port {ref.port}"
        return self.cluster(svc, ref.port, None), None

    def gateway_mirror(self, obj: ApiObject, spec: gw.HTTPRequestMirrorFilter,
                       where: str) -> Mirror | None:
        cluster, problem = self.gateway_service_ref(obj, spec.backend_ref)
        if cluster is None:
            # The spec: an unresolvable mirror backend is dropped, the rule still works.
            self.issue(obj.ref, f"{where}.requestMirror.backendRef", f"{problem}; not mirrored")
            return None
        fraction = 1.0
        if spec.percent is not None:
            fraction = spec.percent / 100
        elif spec.fraction is not None:
            fraction = spec.fraction.numerator / spec.fraction.denominator
        return Mirror(cluster=cluster, fraction=fraction)


def gateway_service_routes(svc: ServiceInfo, port: int,
                    entries: list[tuple[tuple[Any, ...], Candidate]]) -> ServiceRoutes:
    exact: dict[str, list[Candidate]] = defaultdict(list)
    prefix: dict[str, list[Candidate]] = defaultdict(list)
    rest: list[Candidate] = []
    for _key, cand in sorted(entries, key=lambda e: e[0]):
        if cand.match.path_kind is PathKind.EXACT:
            exact[cand.match.path].append(cand)
        elif cand.match.path_kind is PathKind.PREFIX:
            prefix[cand.match.path].append(cand)
        else:
            rest.append(cand)
    return ServiceRoutes(
        kind=RoutesKind.GATEWAY, host=svc.hostname, port=port, service_namespace=svc.namespace,
        exact={k: tuple(v) for k, v in exact.items()},
        prefix={k: tuple(v) for k, v in prefix.items()}, rest=tuple(rest),
        max_prefix_segments=max((k.count("/") for k in prefix), default=0))



_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#")


def _check_gateway_path(value: str) -> None:
    """The Gateway API CRD's path rules: absolute, no dot segments or encoded slashes."""
    if not value.startswith("/"):
        raise ConfigError(f"path {value!r} must start with '/'")
    bad = [p for p in _BAD_PATH_PARTS if p in value]
    if bad or value.endswith(("/..", "/.")):
        raise ConfigError(f"path {value!r} must not contain '//', '/./', '/../', '%2f' or '#'")


def _gateway_value_matcher(kind: str, value: str) -> StringMatcher:
    if kind == "RegularExpression":
        return StringMatcher(StringKind.REGEX, value, compile_safe(value))
    return StringMatcher(StringKind.EXACT, value)


def _gateway_header_ops(spec: gw.HTTPHeaderFilter) -> HeaderOps:
    return HeaderOps(set=tuple((h.name.lower(), h.value) for h in spec.set),
                     add=tuple((h.name.lower(), h.value) for h in spec.add),
                     remove=tuple(n.lower() for n in spec.remove))


def _gateway_path_modifier(spec: gw.HTTPPathModifier, matches: list[RequestMatch],
                           where: str) -> PathRewrite:
    if spec.type == "ReplaceFullPath":
        assert spec.replace_full_path is not None
        return PathRewrite(PathRewriteKind.FULL, spec.replace_full_path)
    if any(m.path_kind is not PathKind.PREFIX for m in matches):
        raise InvalidSpec(f"{where}.path", "ReplacePrefixMatch needs every match of the rule to be "
                       "a PathPrefix match")
    assert spec.replace_prefix_match is not None
    return PathRewrite(PathRewriteKind.PREFIX, spec.replace_prefix_match)


def _gateway_redirect(spec: gw.HTTPRequestRedirectFilter, matches: list[RequestMatch],
                      where: str) -> Redirect:
    path = None
    if spec.path is not None:
        path = _gateway_path_modifier(spec.path, matches, f"{where}.requestRedirect")
    return Redirect(status=spec.status_code, scheme=spec.scheme, host=spec.hostname,
                    port=spec.port, path=path)


