"""Inputs of route translation: the services a waypoint serves and the API objects it reads.

Kept apart from the Kubernetes client types on purpose: the discovery layer
adapts its objects to :class:`ServiceInfo` and :class:`ApiObject`, and the
translator stays testable with plain values.  :class:`Catalog` indexes the
services and resolves host names the way Istio does (short names relative to
the referring object's namespace).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from waypoint.routing.model import ObjectRef

DEFAULT_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """One port of a Service (``name`` lets a ``sectionName`` parentRef select it)."""

    port: int
    name: str | None = None
    protocol: str = "TCP"
    app_protocol: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A Kubernetes Service as routing sees it."""

    name: str
    namespace: str
    ports: tuple[ServicePortInfo, ...]
    vips: tuple[str, ...] = ()
    domain: str = DEFAULT_DOMAIN

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{self.domain}"

    def port_by_number(self, number: int) -> ServicePortInfo | None:
        return next((p for p in self.ports if p.port == number), None)

    def port_by_name(self, name: str) -> ServicePortInfo | None:
        return next((p for p in self.ports if p.name == name), None)


@dataclass(frozen=True, slots=True)
class ApiObject:
    """An API object to translate: kind, identity, creation time (RFC 3339) and raw spec."""

    kind: str
    namespace: str
    name: str
    spec: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    creation_timestamp: str = ""

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.kind, self.namespace, self.name)

    @property
    def age_key(self) -> tuple[str, str, str]:
        """Sort key "oldest first, then namespace/name" (Gateway API and Istio tie-breaks)."""
        return (self.creation_timestamp, self.namespace, self.name)


class Catalog:
    """The services by namespace/name and by FQDN, with Istio-style host resolution."""

    def __init__(self, services: Iterable[ServiceInfo], domain: str = DEFAULT_DOMAIN) -> None:
        self.domain = domain
        self.by_key: dict[tuple[str, str], ServiceInfo] = {}
        self.by_host: dict[str, ServiceInfo] = {}
        for svc in services:
            self.by_key[(svc.namespace, svc.name)] = svc
            self.by_host[svc.hostname] = svc

    def get(self, namespace: str, name: str) -> ServiceInfo | None:
        return self.by_key.get((namespace, name))

    def resolve_host(self, host: str, namespace: str) -> str:
        """Istio's rule: a name without dots is ``<name>.<namespace>.svc.<domain>``.

        As a convenience ``<name>.<ns>`` and ``<name>.<ns>.svc`` resolve to a
        known service too (Istio would take them as FQDNs and match nothing).
        """
        host = host.lower()
        if host == "*" or "." not in host:
            return host if host == "*" else f"{host}.{namespace}.svc.{self.domain}"
        parts = host.split(".")
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
            svc = self.by_key.get((parts[1], parts[0]))
            if svc is not None:
                return svc.hostname
        return host

    def services_for_host(self, host: str) -> list[ServiceInfo]:
        """Services an (already resolved) host names: exact FQDN or ``*``-prefixed wildcard."""
        if host.startswith("*"):
            suffix = host[1:]
            return sorted((s for h, s in self.by_host.items() if h.endswith(suffix)),
                          key=lambda s: s.hostname)
        svc = self.by_host.get(host)
        return [svc] if svc is not None else []
