"""API objects + service catalogue -> one immutable :class:`RouteTable`.

Theory of operation
-------------------
``translate`` is a pure function.  It reads DestinationRules first (they give
clusters their subsets and settings), then HTTPRoutes with Service parents
(GAMMA), then VirtualServices for the services no HTTPRoute claimed, and gives
every remaining service port a default route to itself.  Objects are taken
oldest first (creation timestamp, then namespace/name), which is both the
Gateway API tie-break and Istio's "oldest wins" for conflicting objects.

Errors are per object.  An object whose shape or content is invalid (unknown
field, bad regex, malformed duration, unsupported filter, weights summing to
zero) is left out of the table entirely and reported with its field path; a
reference that does not resolve (backend Service missing, cross-namespace
without ReferenceGrant, unknown subset) keeps the object but makes that backend
answer 500 (Gateway API) or 503 (Istio, Envoy's "cluster not found"), as the
specs require.  Either way every other object is unaffected.
:class:`RouteTableStore` keeps the previous good table if translation as a
whole fails (a bug, not bad input).

GAMMA specifics: ``hostnames`` are ignored for Service parents (GEP-1294);
a parent Service in another namespace than the route (a "consumer route") is
not supported yet and reported; ``parentRefs[].port`` or ``sectionName``
narrows the route to one service port.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import gc
import typing
from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.api import gateway as gw
from common.api import istio_networking as nw
from common.api.base import field_errors
from common.errors import ConfigError
from common.logging import get_logger
from waypoint.resilience.config import ClusterResilience
from waypoint.routing.catalog import DEFAULT_DOMAIN, ApiObject, Catalog, ServiceInfo
from waypoint.routing.model import (
    EMPTY_TABLE,
    NO_HEADER_OPS,
    Candidate,
    Cluster,
    ConfigIssue,
    DirectResponse,
    HeaderOps,
    Mirror,
    ObjectRef,
    PathKind,
    PathRewrite,
    PathRewriteKind,
    Redirect,
    RequestMatch,
    RouteRule,
    RoutesKind,
    RouteTable,
    ServiceRoutes,
    StringKind,
    StringMatcher,
    WeightedBackend,
)
from waypoint.routing.policies import (
    CompiledDestinationRule,
    compile_destination_rule,
    gateway_resilience,
    vs_resilience,
)
from waypoint.routing.regex import compile_safe

HTTP_ROUTE = "HTTPRoute"
VIRTUAL_SERVICE = "VirtualService"
DESTINATION_RULE = "DestinationRule"
SERVICE_ENTRY = "ServiceEntry"

#: Status for a request that lands on an unusable backend (Gateway API spec).
GATEWAY_INVALID_BACKEND_STATUS = 500
#: Envoy answers 503 (flag NC) when a route names a cluster that does not exist.
ISTIO_INVALID_BACKEND_STATUS = 503

_T = TypeVar("_T", bound=BaseModel)
_log = get_logger("waypoint.routing")


#: Fields the models accept (Istio and the Gateway API define them) that the waypoint does not
#: act on yet, as ``Model.wireName``; setting one gives a warning so nobody believes it works.
IGNORED_FIELDS = frozenset({
    "VirtualServiceSpec.tls", "VirtualServiceSpec.tcp", "VirtualServiceSpec.exportTo",
    "DestinationRuleSpec.exportTo", "TCPSettings.tcpKeepalive",
    "TCPSettings.maxConnectionDuration", "HTTPSettings.h2UpgradePolicy",
    "HTTPSettings.useClientProtocol", "LoadBalancerSettings.warmupDurationSecs",
    "ClientTLSSettings.credentialName", "ClientTLSSettings.clientCertificate",
    "ClientTLSSettings.privateKey", "ClientTLSSettings.caCertificates", "ClientTLSSettings.sni",
    "ClientTLSSettings.subjectAltNames", "ClientTLSSettings.insecureSkipVerify",
    "ClientTLSSettings.caCrl", "HTTPMatchRequest.statPrefix", "HTTPRouteRule.sessionPersistence",
})


def ignored_fields(model: BaseModel, path: str = "spec") -> list[str]:
    """Paths of the :data:`IGNORED_FIELDS` set in ``model`` (recursively)."""
    found = []
    for name, wire, ignored in _walk_plan(type(model)):
        value = getattr(model, name)
        if value is None or value == () or value == {}:
            continue
        here = f"{path}.{wire}"
        if ignored:
            found.append(here)
        elif isinstance(value, BaseModel):
            found.extend(ignored_fields(value, here))
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found.extend(ignored_fields(item, f"{here}[{i}]"))
    return found


@functools.cache
def _walk_plan(cls: type[BaseModel]) -> tuple[tuple[str, str, bool], ...]:
    """The fields of ``cls`` worth visiting: ignored ones and those that hold models."""
    plan = []
    for name, info in cls.model_fields.items():
        wire = info.alias or name
        ignored = f"{cls.__name__}.{wire}" in IGNORED_FIELDS
        if ignored or _holds_model(info.annotation):
            plan.append((name, wire, ignored))
    return tuple(plan)


def _holds_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(arg) for arg in typing.get_args(annotation))


class _Invalid(ConfigError):
    """An object that cannot be translated; ``field`` says where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def translate(services: Iterable[ServiceInfo], objects: Iterable[ApiObject], *,
              served: Collection[tuple[str, str]] | None = None,
              home_namespace: str | None = None, domain: str = DEFAULT_DOMAIN,
              version: int = 0) -> RouteTable:
    """Build the route table of a waypoint from ``objects``.

    ``services`` is every service a route may name as a backend; ``served`` the
    (namespace, name) keys of those the waypoint routes for (None: all of them).
    Routes only get entries for served services, so the table's size follows the
    waypoint's share of the mesh.  ``home_namespace`` is the waypoint's namespace:
    bare service names (``Host: echo``) resolve there first.  Problems are in
    ``RouteTable.issues``.
    """
    # Translation allocates tens of thousands of long-lived objects; every cyclic-GC pass
    # during it walks the growing heap and frees nothing, which measured 2-3x the run time
    # for 2,000 objects.  The function never awaits, so pausing the collector is contained.
    paused = gc.isenabled()
    gc.disable()
    try:
        catalog = Catalog(services, domain)
        keys = set(catalog.by_key) if served is None else set(served)
        return _Translator(catalog, keys, home_namespace).run(objects, version)
    finally:
        if paused:
            gc.enable()


class RouteTableStore:
    """Holds the current table; a new one replaces it in one assignment (atomic for readers)."""

    def __init__(self) -> None:
        self.current: RouteTable = EMPTY_TABLE

    def update(self, services: Iterable[ServiceInfo], objects: Iterable[ApiObject], *,
               served: Collection[tuple[str, str]] | None = None,
               home_namespace: str | None = None, domain: str = DEFAULT_DOMAIN) -> RouteTable:
        """Translate and swap in; on an unexpected failure keep the previous table."""
        version = self.current.version + 1
        try:
            table = translate(services, objects, served=served, home_namespace=home_namespace,
                              domain=domain, version=version)
        except Exception:
            # Bad input is reported per object and never raises; reaching here is a bug,
            # and serving the last good routes beats serving none.
            _log.exception("route translation failed; keeping the previous route table",
                           version=self.current.version)
            return self.current
        known = set(self.current.issues)
        for issue in table.issues:
            if issue not in known:  # each problem is logged once, not on every update
                _log.warning("route config issue", object=str(issue.ref), field=issue.field,
                             problem=issue.message, severity=issue.severity)
        self.current = table
        return table


class _Translator:
    def __init__(self, catalog: Catalog, served: set[tuple[str, str]],
                 home_namespace: str | None) -> None:
        self.catalog = catalog
        self.served = served
        self.home = home_namespace
        self.issues: list[ConfigIssue] = []
        self.issue_set: set[ConfigIssue] = set()
        self.rules_by_host: dict[str, CompiledDestinationRule] = {}
        self.rule_refs: dict[str, ObjectRef] = {}
        self.clusters: dict[str, Cluster] = {}
        self.vs_compiled: dict[ObjectRef, tuple[Candidate, ...]] = {}
        self.port_needed = False

    def issue(self, ref: ObjectRef, field: str, message: str, severity: str = "error") -> None:
        """Record a problem once (a VirtualService may be compiled per port)."""
        issue = ConfigIssue(ref=ref, field=field, message=message, severity=severity)
        if issue not in self.issue_set:
            self.issue_set.add(issue)
            self.issues.append(issue)

    def parse(self, obj: ApiObject, model: type[_T]) -> _T | None:
        try:
            spec = model.model_validate(dict(obj.spec))
        except ValidationError as exc:
            for field, message in field_errors(exc):
                self.issue(obj.ref, field, message)
            return None
        for field in ignored_fields(spec):
            self.issue(obj.ref, field, "not supported by the waypoint yet; ignored", "warning")
        return spec

    # --- orchestration ------------------------------------------------------------------------

    def run(self, objects: Iterable[ApiObject], version: int) -> RouteTable:
        by_kind: dict[str, list[ApiObject]] = defaultdict(list)
        for obj in sorted(objects, key=lambda o: o.age_key):
            by_kind[obj.kind].append(obj)
        for obj in by_kind[DESTINATION_RULE]:
            self.destination_rule(obj)
        for obj in by_kind[SERVICE_ENTRY]:
            self.parse(obj, nw.ServiceEntrySpec)

        gateway: dict[tuple[str, str, int], list[tuple[tuple[Any, ...], Candidate]]] = (
            defaultdict(list))
        for obj in by_kind[HTTP_ROUTE]:
            if self.may_concern_us(obj):
                self.http_route(obj, gateway)
        claimed = {(ns, name) for ns, name, _port in gateway}
        istio = self.virtual_services(by_kind[VIRTUAL_SERVICE], claimed)

        routes: dict[tuple[str, str, int], ServiceRoutes] = {}
        for served_key, svc in self.catalog.by_key.items():
            if served_key not in self.served:
                continue
            for sp in svc.ports:
                key = (svc.namespace, svc.name, sp.port)
                if (svc.namespace, svc.name) in claimed:
                    if key in gateway:
                        routes[key] = _gateway_routes(svc, sp.port, gateway[key])
                    else:
                        # The HTTPRoute names other ports of this service; this one keeps
                        # its default route.
                        routes[key] = self.default_routes(svc, sp.port)
                elif (svc.namespace, svc.name) in istio:
                    routes[key] = self.istio_routes(svc, sp.port, *istio[svc.namespace, svc.name])
                else:
                    routes[key] = self.default_routes(svc, sp.port)
        return RouteTable(by_destination=self.index(routes), clusters=dict(self.clusters),
                          issues=tuple(self.issues), version=version)

    def index(self, routes: dict[tuple[str, str, int], ServiceRoutes],
              ) -> dict[tuple[str, int], ServiceRoutes]:
        by_dest: dict[tuple[str, int], ServiceRoutes] = {}
        short: dict[tuple[str, int], list[tuple[str, ServiceRoutes]]] = defaultdict(list)
        for (ns, name, port), r in routes.items():
            svc = self.catalog.by_key[(ns, name)]
            for alias in (svc.hostname, f"{name}.{ns}.svc", f"{name}.{ns}", *svc.vips):
                by_dest[(alias, port)] = r
            short[(name, port)].append((ns, r))
        for key, owners in short.items():
            home = [r for ns, r in owners if ns == self.home]
            if home:
                by_dest[key] = home[0]
            elif len(owners) == 1:
                by_dest[key] = owners[0][1]
        return by_dest

    def may_concern_us(self, obj: ApiObject) -> bool:
        """A cheap look at the raw spec: can this route name a service we serve?

        Keeps translation proportional to the waypoint's share of the mesh: routes of
        other waypoints' services are neither parsed nor reported here.  Anything
        malformed counts as concerning us, so that its errors get reported; so do
        routes for a missing Service in the waypoint's namespace.
        """
        try:
            if obj.kind == HTTP_ROUTE:
                for ref in obj.spec.get("parentRefs", ()):
                    if ref.get("kind") != "Service":
                        continue
                    key = (ref.get("namespace") or obj.namespace, ref["name"])
                    # A missing parent in our namespace is ours to report.
                    if key in self.served or (key[0] == self.home
                                              and key not in self.catalog.by_key):
                        return True
                return False
            hosts = obj.spec.get("hosts", ())
            for host in hosts:
                fqdn = self.catalog.resolve_host(host, obj.namespace)
                if any((s.namespace, s.name) in self.served
                       for s in self.catalog.services_for_host(fqdn)):
                    return True
            return False
        except (AttributeError, KeyError, TypeError):
            return True

    # --- clusters and DestinationRules ------------------------------------------------------

    def destination_rule(self, obj: ApiObject) -> None:
        spec = self.parse(obj, nw.DestinationRuleSpec)
        if spec is None:
            return
        if spec.workload_selector is not None:
            self.issue(obj.ref, "spec.workloadSelector", "a DestinationRule with a "
                       "workloadSelector applies to sidecars only; the waypoint ignores it",
                       "warning")
            return
        host = self.catalog.resolve_host(spec.host, obj.namespace)
        try:
            compiled = compile_destination_rule(host, spec)
        except ConfigError as exc:
            self.issue(obj.ref, "spec", str(exc))
            return
        if host in self.rules_by_host:
            self.issue(obj.ref, "spec.host", f"host {host} is already configured by "
                       f"{self.rule_refs[host]}; the oldest DestinationRule wins, this one is "
                       "ignored")
            return
        self.rules_by_host[host] = compiled
        self.rule_refs[host] = obj.ref

    def rule_for(self, host: str) -> CompiledDestinationRule | None:
        rule = self.rules_by_host.get(host)
        if rule is not None:
            return rule
        best: CompiledDestinationRule | None = None
        for pattern, candidate in self.rules_by_host.items():
            if pattern.startswith("*") and host.endswith(pattern[1:]) and (
                    best is None or len(pattern) > len(best.host)):
                best = candidate
        return best

    def cluster(self, svc: ServiceInfo, port: int, subset: str | None) -> Cluster:
        """The cluster for a service port (and subset); raises ConfigError for a missing subset."""
        name = f"outbound|{port}|{subset or ''}|{svc.hostname}"
        found = self.clusters.get(name)
        if found is not None:
            return found
        rule = self.rule_for(svc.hostname)
        labels: dict[str, str] = {}
        resilience, tls = ClusterResilience(), None
        if subset is not None and (rule is None or subset not in rule.subsets):
            raise ConfigError(f"subset {subset!r} of {svc.hostname} is not defined by any "
                              "DestinationRule")
        if rule is not None:
            resilience, tls = rule.settings(port, subset)
            if subset is not None:
                labels = dict(rule.subsets[subset].labels)
        cluster = Cluster(name=name, host=svc.hostname, port=port,
                          service_namespace=svc.namespace, service_name=svc.name, subset=subset,
                          subset_labels=labels, resilience=resilience, tls_mode=tls)
        self.clusters[name] = cluster
        return cluster

    def default_routes(self, svc: ServiceInfo, port: int) -> ServiceRoutes:
        ref = ObjectRef("Service", svc.namespace, svc.name)
        backend = WeightedBackend(name=svc.name, weight=1, cluster=self.cluster(svc, port, None))
        rule = RouteRule(source=ref, route_name=f"{svc.namespace}/{svc.name}/default", index=0,
                         backends=(backend,), cumulative=(1,))
        return ServiceRoutes(kind=RoutesKind.DEFAULT, host=svc.hostname, port=port,
                             service_namespace=svc.namespace,
                             rest=(Candidate(RequestMatch(), rule),))

    # --- Gateway API HTTPRoute ----------------------------------------------------------------

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
        except _Invalid as exc:
            self.issue(obj.ref, exc.field, str(exc))
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
                    raise _Invalid(fw, "a rule may have at most one RequestRedirect filter")
                redirect = _gateway_redirect(f.request_redirect, matches, fw)
            elif f.url_rewrite is not None:
                rewrites += 1
                if rewrites > 1:
                    raise _Invalid(fw, "a rule may have at most one URLRewrite filter")
                host_rewrite = f.url_rewrite.hostname
                if f.url_rewrite.path is not None:
                    path_rewrite = _gateway_path_modifier(f.url_rewrite.path, matches, fw)
            elif f.request_mirror is not None:
                mirror = self.gateway_mirror(obj, f.request_mirror, fw)
                if mirror is not None:
                    mirrors.append(mirror)
            else:
                raise _Invalid(fw, f"filter type {f.type} is not supported by the waypoint")
        if redirect is not None and rewrites:
            raise _Invalid(where, "RequestRedirect and URLRewrite cannot be used on one rule")
        backends = tuple(self.gateway_backend(obj, b, f"{where}.backendRefs[{j}]")
                         for j, b in enumerate(spec.backend_refs))
        try:
            resilience = gateway_resilience(spec)
        except ConfigError as exc:
            raise _Invalid(where, str(exc)) from exc
        backends = _after_rule_ops(backends, req_ops, resp_ops)
        rule = RouteRule(source=obj.ref, index=index,
                         route_name=f"{obj.namespace}/{obj.name}/{spec.name or index}",
                         backends=backends, cumulative=_cumulative(backends),
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
            raise _Invalid(where, str(exc)) from exc
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
                raise _Invalid(f"{where}.filters[{k}]", f"filter type {f.type} is not "
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

    # --- Istio VirtualService -----------------------------------------------------------------

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
        except _Invalid as exc:
            self.issue(obj.ref, exc.field, str(exc))
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
            raise _Invalid(f"{where}.delegate", "delegate VirtualServices are for ingress "
                           "gateways; the waypoint does not support them")
        req_ops, resp_ops = _istio_header_ops(spec.headers)
        backends = tuple(self.istio_destination(obj, d, port, f"{where}.route[{j}]")
                         for j, d in enumerate(spec.route))
        if len(backends) > 1 and sum(b.weight for b in backends) == 0:
            raise _Invalid(f"{where}.route", "the destination weights sum to 0; give at least "
                           "one destination a weight > 0")
        if len(backends) == 1 and backends[0].weight == 0:
            backends = (_reweight(backends[0], 100),)
        redirect = direct = None
        path_rewrite: PathRewrite | None = None
        host_rewrite: str | None = None
        if spec.redirect is not None:
            r = spec.redirect
            redirect = Redirect(status=r.redirect_code, scheme=r.scheme, host=r.authority,
                                port=r.port, gateway_semantics=False,
                                derive_port_from_request=r.derive_port == "FROM_REQUEST_PORT",
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
                    raise _Invalid(f"{where}.rewrite.uriRegexRewrite.match", str(exc)) from exc
                path_rewrite = PathRewrite(PathRewriteKind.REGEX, rr.rewrite, pattern=pattern)
        mirrors = self.istio_mirrors(obj, spec, port, where)
        if spec.cors_policy is not None:
            self.issue(obj.ref, f"{where}.corsPolicy", "corsPolicy is not enforced by the "
                       "waypoint yet", "warning")
        try:
            resilience = vs_resilience(spec)
        except ConfigError as exc:
            raise _Invalid(where, str(exc)) from exc
        backends = _after_rule_ops(backends, req_ops, resp_ops)
        rule = RouteRule(source=obj.ref, index=index,
                         route_name=f"{obj.namespace}/{obj.name}/{spec.name or index}",
                         backends=backends, cumulative=_cumulative(backends),
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
            raise _Invalid(where, str(exc)) from exc
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


def _gateway_routes(svc: ServiceInfo, port: int,
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


def _candidates(compiled: list[tuple[RouteRule, list[RequestMatch]] | None],
                ) -> tuple[Candidate, ...]:
    return tuple(Candidate(m, rule) for entry in compiled if entry is not None
                 for rule, matches in [entry] for m in matches)


def _cumulative(backends: tuple[WeightedBackend, ...]) -> tuple[int, ...]:
    total = 0
    out = []
    for b in backends:
        total += b.weight
        out.append(total)
    return tuple(out)


def _reweight(backend: WeightedBackend, weight: int) -> WeightedBackend:
    return dataclasses.replace(backend, weight=weight)


def _after_rule_ops(backends: tuple[WeightedBackend, ...], request: HeaderOps,
                    response: HeaderOps) -> tuple[WeightedBackend, ...]:
    """Backends whose header operations are the rule's followed by their own."""
    return tuple(dataclasses.replace(b, request_headers=request.then(b.request_headers),
                                     response_headers=response.then(b.response_headers))
                 for b in backends)


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
        raise _Invalid(f"{where}.path", "ReplacePrefixMatch needs every match of the rule to be "
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
        raise _Invalid(f"{where}.directResponse.body.bytes", "not valid base64") from exc

