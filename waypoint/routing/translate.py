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
:class:`RouteTableStore` keeps, per object, the last version that translated: an
update that makes an object invalid leaves its previous version in force (as
Istio's API server would, by refusing the update), and the store keeps the
previous table if translation as a whole fails (a bug, not bad input).

GAMMA specifics: ``hostnames`` are ignored for Service parents (GEP-1294);
a parent Service in another namespace than the route (a "consumer route") is
not supported yet and reported; ``parentRefs[].port`` or ``sectionName``
narrows the route to one service port.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import Any

from common.api import istio_networking as nw
from common.logging import get_logger
from waypoint.egress import ExternalServiceInfo
from waypoint.routing.catalog import DEFAULT_DOMAIN, ApiObject, Catalog, ServiceInfo
from waypoint.routing.context import (
    DESTINATION_RULE,
    HTTP_ROUTE,
    SERVICE_ENTRY,
    VIRTUAL_SERVICE,
)
from waypoint.routing.gateway_routes import GatewayTranslation, gateway_service_routes
from waypoint.routing.istio_routes import IstioTranslation
from waypoint.routing.model import (
    EMPTY_TABLE,
    Candidate,
    ConfigIssue,
    ObjectRef,
    RequestMatch,
    RouteRule,
    RoutesKind,
    RouteTable,
    ServiceRoutes,
    WeightedBackend,
)

_log = get_logger("waypoint.routing")


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
    """The current table, swapped in one assignment (atomic for readers), and per API
    object the last version that translated.

    Istio never sees an invalid route object: the API server's validation refuses the
    update, so the object keeps its previous version.  Here objects arrive unvalidated,
    so the store plays that part: when an object's new version is rejected (left out of
    the table as invalid), its last good version keeps serving, the problems of the new
    version are still reported, plus one issue saying the previous version stays in
    force.  A later good version replaces it; an object that never had a good version is
    simply left out.  Cache entries follow the objects given: a deleted object loses its
    entry, so the cache holds at most one extra version per live object.

    Whether a version is rejected depends only on the object itself (its shape, regexes,
    filters), not on the rest of the mesh, so substituting the good version cannot change
    what other objects mean.
    """

    def __init__(self) -> None:
        self.current: RouteTable = EMPTY_TABLE
        self._good: dict[ObjectRef, ApiObject] = {}
        # Objects held at their good version: the refused version and its issues.  An
        # unchanged refused version is swapped for the good one before translating, so
        # a bad object that stays costs one translation per update, not two.
        self._refused: dict[ObjectRef, tuple[ApiObject, tuple[ConfigIssue, ...]]] = {}

    def update(self, services: Iterable[ServiceInfo], objects: Iterable[ApiObject], *,
               served: Collection[tuple[str, str]] | None = None,
               home_namespace: str | None = None, domain: str = DEFAULT_DOMAIN) -> RouteTable:
        """Translate and swap in; on an unexpected failure keep the previous table."""
        version = self.current.version + 1
        services = list(services)
        live = {obj.ref: obj for obj in objects}
        try:
            table, held = self._translate(services, live, served=served,
                                          home_namespace=home_namespace, domain=domain,
                                          version=version)
        except Exception:
            # Bad input is reported per object and never raises; reaching here is a bug,
            # and serving the last good routes beats serving none.
            _log.exception("route translation failed; keeping the previous route table",
                           version=self.current.version)
            return self.current
        self._remember(live, table, held)
        table = _with_held(table, held)
        known = set(self.current.issues)
        for issue in table.issues:
            if issue not in known:  # each problem is logged once, not on every update
                _log.warning("route config issue", object=str(issue.ref), field=issue.field,
                             problem=issue.message, severity=issue.severity)
        self.current = table
        return table

    def _translate(self, services: list[ServiceInfo], live: dict[ObjectRef, ApiObject], *,
                   served: Collection[tuple[str, str]] | None, home_namespace: str | None,
                   domain: str, version: int,
                   ) -> tuple[RouteTable, dict[ObjectRef, tuple[ConfigIssue, ...]]]:
        """The table with held objects at their good version, and the held objects'
        issues (those of the refused version)."""
        held = {ref: issues for ref, (bad, issues) in self._refused.items()
                if live.get(ref) == bad and ref in self._good}
        objects = {ref: self._good[ref] if ref in held else obj for ref, obj in live.items()}
        table = translate(services, objects.values(), served=served,
                          home_namespace=home_namespace, domain=domain, version=version)
        newly = {ref for ref in table.rejected
                 if ref in live and ref in self._good and self._good[ref] != live[ref]}
        if not newly:
            return table, held
        for ref in newly:
            held[ref] = tuple(i for i in table.issues if i.ref == ref)
            objects[ref] = self._good[ref]
        table = translate(services, objects.values(), served=served,
                          home_namespace=home_namespace, domain=domain, version=version)
        return table, held

    def _remember(self, live: dict[ObjectRef, ApiObject], table: RouteTable,
                  held: dict[ObjectRef, tuple[ConfigIssue, ...]]) -> None:
        good: dict[ObjectRef, ApiObject] = {}
        refused: dict[ObjectRef, tuple[ApiObject, tuple[ConfigIssue, ...]]] = {}
        for ref, obj in live.items():
            if ref in table.rejected:
                # Rejected even at its good version (or never had one): nothing to keep.
                held.pop(ref, None)
            elif ref in held:
                good[ref] = self._good[ref]
                refused[ref] = (obj, held[ref])
            else:
                good[ref] = obj
        self._good, self._refused = good, refused


def _with_held(table: RouteTable,
               held: dict[ObjectRef, tuple[ConfigIssue, ...]]) -> RouteTable:
    """``table`` with the held objects' own problems and a note for each."""
    if not held:
        return table
    issues = list(table.issues)
    seen = set(issues)
    for ref, problems in held.items():
        note = ConfigIssue(ref=ref, field="metadata", message=(
            "this version is invalid and was not applied; the previous valid version stays "
            "in force until a valid version replaces it or the object is deleted"))
        for issue in (*problems, note):
            if issue not in seen:
                seen.add(issue)
                issues.append(issue)
    return dataclasses.replace(table, issues=tuple(issues),
                               rejected=table.rejected.union(held))


class _Translator(GatewayTranslation, IstioTranslation):
    """One run: DestinationRules, then HTTPRoutes, then VirtualServices, then defaults."""

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
                        routes[key] = gateway_service_routes(svc, sp.port, gateway[key])
                    else:
                        # The HTTPRoute names other ports of this service; this one keeps
                        # its default route.
                        routes[key] = self.default_routes(svc, sp.port)
                elif (svc.namespace, svc.name) in istio:
                    routes[key] = self.istio_routes(svc, sp.port, *istio[svc.namespace, svc.name])
                else:
                    routes[key] = self.default_routes(svc, sp.port)
        return RouteTable(by_destination=self.index(routes), clusters=dict(self.clusters),
                          issues=tuple(self.issues), version=version,
                          rejected=frozenset(self.rejected))

    def index(self, routes: dict[tuple[str, str, int], ServiceRoutes],
              ) -> dict[tuple[str, int], ServiceRoutes]:
        by_dest: dict[tuple[str, int], ServiceRoutes] = {}
        short: dict[tuple[str, int], list[tuple[str, ServiceRoutes]]] = defaultdict(list)
        for (ns, name, port), r in routes.items():
            svc = self.catalog.by_key[(ns, name)]
            if isinstance(svc, ExternalServiceInfo):
                # A ServiceEntry host is reached by its own name and addresses only.
                for alias in (svc.hostname, *svc.vips):
                    by_dest[(alias, port)] = r
                continue
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

    def default_routes(self, svc: ServiceInfo, port: int) -> ServiceRoutes:
        ref = ObjectRef("Service", svc.namespace, svc.name)
        backend = WeightedBackend(name=svc.name, weight=1, cluster=self.cluster(svc, port, None))
        rule = RouteRule(source=ref, route_name=f"{svc.namespace}/{svc.name}/default", index=0,
                         backends=(backend,), cumulative=(1,))
        return ServiceRoutes(kind=RoutesKind.DEFAULT, host=svc.hostname, port=port,
                             service_namespace=svc.namespace,
                             rest=(Candidate(RequestMatch(), rule),))

