"""Istio ``VirtualService`` (hosts = mesh services) -> route rules and candidates.

Istio semantics ("Virtual Service" reference): the ``http`` entries are tried in
order and the first match wins; conditions of one match are ANDed, the matches
of an entry ORed; ``uri`` prefix is a plain string prefix; destination weights
are proportional; an unknown destination or subset answers 503 (Envoy's
"cluster not found").  Among VirtualServices for one host the oldest wins, an
exact host before a wildcard, and an HTTPRoute for the same service before both.
"""

from __future__ import annotations

import base64
import binascii

from common.api import istio_networking as nw
from common.errors import ConfigError
from waypoint.routing.catalog import ApiObject, ServiceInfo
from waypoint.routing.context import Context, InvalidSpec, after_rule_ops, cumulative, reweight
from waypoint.routing.model import (
    NO_HEADER_OPS,
    Candidate,
    Cluster,
    DirectResponse,
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
from waypoint.routing.policies import vs_resilience
from waypoint.routing.regex import compile_safe

#: Envoy answers 503 (flag NC) when a route names a cluster that does not exist.
ISTIO_INVALID_BACKEND_STATUS = 503


class IstioTranslation(Context):
    """VirtualServices -> ordered candidates per served service port."""

    def virtual_services(self, objects: list[ApiObject], claimed_by_routes: set[tuple[str, str]],
                         ) -> dict[tuple[str, str], tuple[ApiObject, nw.VirtualServiceSpec]]:
        """Which VirtualService serves which service: exact hosts before wildcards, oldest first."""
        parsed: list[tuple[ApiObject, nw.VirtualServiceSpec]] = []
        for obj in objects:
            if not self.may_concern_us(obj):
                continue
            spec = self.parse(obj, nw.VirtualServiceSpec)
            if spec is None:
                continue
            if spec.gateways and "mesh" not in spec.gateways:
                continue  # bound to ingress gateways only
            if not self.virtual_service_valid(obj, spec):
                continue
            parsed.append((obj, spec))
        owner: dict[tuple[str, str], tuple[ApiObject, nw.VirtualServiceSpec]] = {}
        for wildcard in (False, True):
            for obj, spec in parsed:
                for i, host in enumerate(spec.hosts):
                    fqdn = self.catalog.resolve_host(host, obj.namespace)
                    if fqdn.startswith("*") != wildcard:
                        continue
                    for svc in self.catalog.services_for_host(fqdn):
                        key = (svc.namespace, svc.name)
                        if key not in self.served:
                            continue
                        if key in claimed_by_routes:
                            self.issue(obj.ref, f"spec.hosts[{i}]", f"{svc.hostname} also has an "
                                       "HTTPRoute; the HTTPRoute wins and this VirtualService is "
                                       "ignored for it", "warning")
                        elif key in owner and owner[key][0] is not obj:
                            if not wildcard:
                                self.issue(obj.ref, f"spec.hosts[{i}]", f"{svc.hostname} is "
                                           f"already routed by {owner[key][0].ref}; the oldest "
                                           "VirtualService wins", "warning")
                        else:
                            owner[key] = (obj, spec)
        return owner

    def virtual_service_valid(self, obj: ApiObject, spec: nw.VirtualServiceSpec) -> bool:
        """Compile every entry once without a port context, to reject the object as a whole.

        The result is kept for every service port unless some destination needed
        the port to pick its own (a multi-port service without ``destination.port``).
        """
        self.port_needed = False
        try:
            compiled = [self.istio_rule(obj, entry, i, port=None)
                        for i, entry in enumerate(spec.http)]
        except InvalidSpec as exc:
            self.reject(obj.ref, exc.field, str(exc))
            return False
        if not self.port_needed:
            self.vs_compiled[obj.ref] = _candidates(compiled)
        return True

    def istio_routes(self, svc: ServiceInfo, port: int, obj: ApiObject,
                     spec: nw.VirtualServiceSpec) -> ServiceRoutes:
        candidates = self.vs_compiled.get(obj.ref)
        if candidates is None:
            candidates = _candidates([self.istio_rule(obj, entry, i, port=port)
                                      for i, entry in enumerate(spec.http)])
        return ServiceRoutes(kind=RoutesKind.ISTIO, host=svc.hostname, port=port,
                             service_namespace=svc.namespace, rest=candidates)

    def istio_rule(self, obj: ApiObject, spec: nw.HTTPRoute, index: int, *,
                   port: int | None) -> tuple[RouteRule, list[RequestMatch]] | None:
        where = f"spec.http[{index}]"
        matches = [self.istio_match(m, f"{where}.match[{j}]") for j, m in enumerate(spec.match)
                   if not m.gateways or "mesh" in m.gateways]
        if spec.match and not matches:
            return None  # every match is for ingress gateways only
        if not matches:
            matches = [RequestMatch()]
        if spec.delegate is not None:
            raise InvalidSpec(f"{where}.delegate", "delegate VirtualServices are for ingress "
                           "gateways; the waypoint does not support them")
        req_ops, resp_ops = _istio_header_ops(spec.headers)
        backends = tuple(self.istio_destination(obj, d, port, f"{where}.route[{j}]")
                         for j, d in enumerate(spec.route))
        if len(backends) > 1 and sum(b.weight for b in backends) == 0:
            raise InvalidSpec(f"{where}.route", "the destination weights sum to 0; give at least "
                           "one destination a weight > 0")
        if len(backends) == 1 and backends[0].weight == 0:
            backends = (reweight(backends[0], 100),)
        redirect = direct = None
        path_rewrite: PathRewrite | None = None
        host_rewrite: str | None = None
        if spec.redirect is not None:
            r = spec.redirect
            redirect = Redirect(status=r.redirect_code, scheme=r.scheme, host=r.authority,
                                port=r.port, gateway_semantics=False,
                                derive_port_from_request=r.derive_port == "FROM_REQUEST_PORT",
                                protocol_default_port=r.derive_port == "FROM_PROTOCOL_DEFAULT",
                                path=PathRewrite(PathRewriteKind.FULL, r.uri) if r.uri else None)
        if spec.direct_response is not None:
            direct = DirectResponse(status=spec.direct_response.status,
                                    body=_direct_body(spec.direct_response, where))
        if spec.rewrite is not None:
            host_rewrite = spec.rewrite.authority
            if spec.rewrite.uri is not None:
                path_rewrite = PathRewrite(PathRewriteKind.PREFIX, spec.rewrite.uri,
                                           gateway_semantics=False)
            elif spec.rewrite.uri_regex_rewrite is not None:
                rr = spec.rewrite.uri_regex_rewrite
                try:
                    pattern = compile_safe(rr.match)
                except ConfigError as exc:
                    raise InvalidSpec(f"{where}.rewrite.uriRegexRewrite.match", str(exc)) from exc
                path_rewrite = PathRewrite(PathRewriteKind.REGEX, rr.rewrite, pattern=pattern)
        mirrors = self.istio_mirrors(obj, spec, port, where)
        if spec.cors_policy is not None:
            self.issue(obj.ref, f"{where}.corsPolicy", "corsPolicy is not enforced by the "
                       "waypoint yet", "warning")
        try:
            resilience = vs_resilience(spec)
        except ConfigError as exc:
            raise InvalidSpec(where, str(exc)) from exc
        backends = after_rule_ops(backends, req_ops, resp_ops)
        rule = RouteRule(source=obj.ref, index=index,
                         route_name=f"{obj.namespace}/{obj.name}/{spec.name or index}",
                         backends=backends, cumulative=cumulative(backends),
                         request_headers=req_ops, response_headers=resp_ops,
                         path_rewrite=path_rewrite, host_rewrite=host_rewrite, redirect=redirect,
                         direct=direct, mirrors=mirrors, resilience=resilience)
        return rule, matches

    def istio_match(self, spec: nw.HTTPMatchRequest, where: str) -> RequestMatch:
        try:
            path_kind, path, pattern = PathKind.ANY, "", None
            uri = spec.uri
            if uri is not None and uri.exact is not None:
                path_kind, path = PathKind.EXACT, uri.exact
            elif uri is not None and uri.prefix is not None:
                path_kind, path = PathKind.PREFIX, uri.prefix
            elif uri is not None and uri.regex is not None:
                path_kind, path = PathKind.REGEX, uri.regex
                pattern = compile_safe(uri.regex, ignore_case=spec.ignore_uri_case)
            lower = spec.ignore_uri_case and path_kind in (PathKind.EXACT, PathKind.PREFIX)
            method = None
            if spec.method is not None:
                if spec.method.exact is None:
                    raise ConfigError("method supports exact matches only")
                method = spec.method.exact
            headers = tuple((n.lower(), _istio_matcher(m))
                            for n, m in spec.headers.items())
            without = tuple((n.lower(), None if _is_empty(m) else _istio_matcher(m))
                            for n, m in spec.without_headers.items())
            query = tuple((n, _istio_matcher(m))
                          for n, m in spec.query_params.items())
            authority = (None if spec.authority is None or _is_empty(spec.authority)
                         else _istio_matcher(spec.authority))
            scheme = (None if spec.scheme is None or _is_empty(spec.scheme)
                      else _istio_matcher(spec.scheme))
        except ConfigError as exc:
            raise InvalidSpec(where, str(exc)) from exc
        return RequestMatch(path_kind=path_kind, path=path.lower() if lower else path,
                            raw_path=path, path_pattern=pattern, segment_prefix=False,
                            path_lower=lower, method=method, headers=headers,
                            without_headers=without, query=query, authority=authority,
                            scheme=scheme, port=spec.port,
                            source_labels=tuple(sorted(spec.source_labels.items())),
                            source_namespace=spec.source_namespace, name=spec.name)

    def istio_service_ref(self, obj: ApiObject, dest: nw.Destination,
                          port: int | None) -> tuple[Cluster | None, str | None]:
        host = self.catalog.resolve_host(dest.host, obj.namespace)
        svc = self.catalog.by_host.get(host)
        if svc is None:
            return None, f"destination host {host} is not a known service"
        if dest.port is not None:
            number = dest.port.number
            if svc.port_by_number(number) is None:
                return None, f"{host} has no port {number}"
        elif len(svc.ports) == 1:
            number = svc.ports[0].port
        elif port is not None and svc.port_by_number(port) is not None:
            number = port
        elif port is None:
            self.port_needed = True  # the first pass cannot tell; compile again per port
            return None, None
        else:
            return None, f"{host} has several ports; set destination.port"
        try:
            return self.cluster(svc, number, dest.subset), None
        except ConfigError as exc:
            return None, str(exc)

    def istio_destination(self, obj: ApiObject, spec: nw.HTTPRouteDestination,
                          port: int | None, where: str) -> WeightedBackend:
        req_ops, resp_ops = _istio_header_ops(spec.headers)
        cluster, problem = self.istio_service_ref(obj, spec.destination, port)
        if problem is not None:
            self.issue(obj.ref, f"{where}.destination", f"{problem}; requests routed to it get "
                       f"{ISTIO_INVALID_BACKEND_STATUS}")
        return WeightedBackend(name=spec.destination.host, weight=spec.weight, cluster=cluster,
                               request_headers=req_ops, response_headers=resp_ops,
                               invalid_status=ISTIO_INVALID_BACKEND_STATUS)

    def istio_mirrors(self, obj: ApiObject, spec: nw.HTTPRoute, port: int | None,
                      where: str) -> tuple[Mirror, ...]:
        wanted: list[tuple[nw.Destination, float, str]] = []
        if spec.mirror is not None:
            share = 100.0
            if spec.mirror_percentage is not None:
                share = spec.mirror_percentage.value
            elif spec.mirror_percent is not None:
                share = float(spec.mirror_percent)
            wanted.append((spec.mirror, share, f"{where}.mirror"))
        for i, m in enumerate(spec.mirrors):
            share = m.percentage.value if m.percentage is not None else 100.0
            wanted.append((m.destination, share, f"{where}.mirrors[{i}]"))
        out = []
        for dest, share, field in wanted:
            cluster, problem = self.istio_service_ref(obj, dest, port)
            if cluster is None:
                if problem is not None:
                    self.issue(obj.ref, field, f"{problem}; not mirrored")
                continue
            out.append(Mirror(cluster=cluster, fraction=share / 100))
        return tuple(out)



def _candidates(compiled: list[tuple[RouteRule, list[RequestMatch]] | None],
                ) -> tuple[Candidate, ...]:
    return tuple(Candidate(m, rule) for entry in compiled if entry is not None
                 for rule, matches in [entry] for m in matches)



def _is_empty(m: nw.StringMatch) -> bool:
    return m.exact is None and m.prefix is None and m.regex is None


def _istio_matcher(m: nw.StringMatch) -> StringMatcher:
    if m.exact is not None:
        return StringMatcher(StringKind.EXACT, m.exact)
    if m.prefix is not None:
        return StringMatcher(StringKind.PREFIX, m.prefix)
    if m.regex is not None:
        return StringMatcher(StringKind.REGEX, m.regex, compile_safe(m.regex))
    # An empty StringMatch: "present" (every value starts with "").
    return StringMatcher(StringKind.PREFIX, "")


def _istio_header_ops(spec: nw.Headers | None) -> tuple[HeaderOps, HeaderOps]:
    if spec is None:
        return NO_HEADER_OPS, NO_HEADER_OPS
    return _istio_ops(spec.request), _istio_ops(spec.response)


def _istio_ops(spec: nw.HeaderOperations | None) -> HeaderOps:
    if spec is None:
        return NO_HEADER_OPS
    return HeaderOps(set=tuple((k.lower(), v) for k, v in spec.set.items()),
                     add=tuple((k.lower(), v) for k, v in spec.add.items()),
                     remove=tuple(n.lower() for n in spec.remove))


def _direct_body(spec: nw.HTTPDirectResponse, where: str) -> bytes:
    if spec.body is None:
        return b""
    if spec.body.string is not None:
        return spec.body.string.encode()
    try:
        return base64.b64decode(spec.body.bytes_ or "", validate=True)
    except binascii.Error as exc:
        raise InvalidSpec(f"{where}.directResponse.body.bytes", "not valid base64") from exc


