"""Shared state and services of one translation: issues, parsing, clusters, DestinationRules.

The route translators (:mod:`waypoint.routing.gateway_routes`,
:mod:`waypoint.routing.istio_routes`) build on :class:`Context`; the
orchestration is in :mod:`waypoint.routing.translate`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.api import istio_networking as nw
from common.api.base import field_errors
from common.errors import ConfigError
from common.logging import get_logger
from waypoint.resilience.config import ClusterResilience
from waypoint.routing.catalog import ApiObject, Catalog, ServiceInfo
from waypoint.routing.model import (
    Candidate,
    Cluster,
    ConfigIssue,
    HeaderOps,
    ObjectRef,
    WeightedBackend,
)
from waypoint.routing.policies import CompiledDestinationRule, compile_destination_rule

HTTP_ROUTE = "HTTPRoute"
VIRTUAL_SERVICE = "VirtualService"
DESTINATION_RULE = "DestinationRule"
SERVICE_ENTRY = "ServiceEntry"

_T = TypeVar("_T", bound=BaseModel)
_log = get_logger("waypoint.routing")


#: Fields the models accept (Istio and the Gateway API define them) that the waypoint does not
#: act on yet, as ``Model.wireName``; setting one gives a warning so nobody believes it works.
IGNORED_FIELDS = frozenset({
    "VirtualServiceSpec.tls", "VirtualServiceSpec.tcp", "VirtualServiceSpec.exportTo",
    "DestinationRuleSpec.exportTo", "TCPSettings.tcpKeepalive",
    "TCPSettings.maxConnectionDuration", "HTTPSettings.h2UpgradePolicy",
    "HTTPSettings.useClientProtocol", "LoadBalancerSettings.warmupDurationSecs",
    "ClientTLSSettings.clientCertificate",
    "ClientTLSSettings.privateKey", "ClientTLSSettings.subjectAltNames",
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


class InvalidSpec(ConfigError):
    """An object that cannot be translated; ``field`` says where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field



class Context:
    """What every part of one translation shares: catalogue, served set, issues, clusters."""

    def __init__(self, catalog: Catalog, served: set[tuple[str, str]],
                 home_namespace: str | None) -> None:
        self.catalog = catalog
        self.served = served
        self.home = home_namespace
        self.issues: list[ConfigIssue] = []
        self.issue_set: set[ConfigIssue] = set()
        self.rejected: set[ObjectRef] = set()
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

    def reject(self, ref: ObjectRef, field: str, message: str) -> None:
        """Record that ``ref`` is invalid as a whole and left out of the table.

        Only problems with the object itself count (what the API server's validation
        would refuse); a reference that does not resolve keeps the object.
        """
        self.issue(ref, field, message)
        self.rejected.add(ref)

    def parse(self, obj: ApiObject, model: type[_T]) -> _T | None:
        try:
            spec = model.model_validate(dict(obj.spec))
        except ValidationError as exc:
            for field, message in field_errors(exc):
                self.reject(obj.ref, field, message)
            return None
        for field in ignored_fields(spec):
            self.issue(obj.ref, field, "not supported by the waypoint yet; ignored", "warning")
        return spec

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
            self.reject(obj.ref, "spec", str(exc))
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


def cumulative(backends: tuple[WeightedBackend, ...]) -> tuple[int, ...]:
    total = 0
    out = []
    for b in backends:
        total += b.weight
        out.append(total)
    return tuple(out)


def reweight(backend: WeightedBackend, weight: int) -> WeightedBackend:
    return dataclasses.replace(backend, weight=weight)


def after_rule_ops(backends: tuple[WeightedBackend, ...], request: HeaderOps,
                    response: HeaderOps) -> tuple[WeightedBackend, ...]:
    """Backends whose header operations are the rule's followed by their own."""
    return tuple(dataclasses.replace(b, request_headers=request.then(b.request_headers),
                                     response_headers=response.then(b.response_headers))
                 for b in backends)


