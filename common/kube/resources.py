"""The resource table: which kinds exist, and where each lives in the REST API.

One table serves the API server (which URLs it answers) and the client (which URL
to call for a kind), so the two cannot drift apart.  Lookups accept the names
kubectl accepts: the Kind, the plural, the singular and the short names, in any
case (``Pod``, ``pods``, ``pod``, ``po``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ResourceType:
    """One kind of API object and its REST coordinates."""

    kind: str
    group: str  # "" is the legacy core group served under /api/v1
    version: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    # Older versions served under the same storage, so Istio YAML written for
    # v1beta1 or v1alpha3 applies unchanged.
    alias_versions: tuple[str, ...] = ()
    # DNS-1123 label (63 chars, no dots) rather than subdomain, as Kubernetes requires
    # for names that become DNS labels.
    name_is_label: bool = False

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_version(self) -> str:
        return self.api_version_for(self.version)

    def api_version_for(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.version, *self.alias_versions)

    def collection_path(self, namespace: str | None = None, version: str | None = None) -> str:
        """URL path of the collection, across all namespaces when ``namespace`` is None."""
        base = (f"/apis/{self.group}/{version or self.version}" if self.group
                else f"/api/{version or self.version}")
        if self.namespaced and namespace is not None:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def object_path(self, name: str, namespace: str | None = None,
                    subresource: str | None = None) -> str:
        """URL path of one object (and optionally its subresource, e.g. ``status``)."""
        if self.namespaced and namespace is None:
            raise ValueError(f"{self.kind} is namespaced: give a namespace for {name!r}")
        path = f"{self.collection_path(namespace)}/{name}"
        return f"{path}/{subresource}" if subresource else path


def _core(kind: str, plural: str, namespaced: bool = True, *short: str,
          name_is_label: bool = False) -> ResourceType:
    return ResourceType(kind=kind, group="", version="v1", plural=plural, namespaced=namespaced,
                        short_names=short, name_is_label=name_is_label)


RESOURCES: tuple[ResourceType, ...] = (
    _core("Namespace", "namespaces", False, "ns", name_is_label=True),
    _core("Node", "nodes", False, "no"),
    _core("Pod", "pods", True, "po"),
    _core("Service", "services", True, "svc", name_is_label=True),
    _core("ServiceAccount", "serviceaccounts", True, "sa"),
    _core("Secret", "secrets", True),
    _core("Event", "events", True, "ev"),
    ResourceType(kind="EndpointSlice", group="discovery.k8s.io", version="v1",
                 plural="endpointslices", namespaced=True),
    ResourceType(kind="Deployment", group="apps", version="v1", plural="deployments",
                 namespaced=True, short_names=("deploy",)),
    ResourceType(kind="Gateway", group="gateway.networking.k8s.io", version="v1",
                 plural="gateways", namespaced=True, short_names=("gtw",),
                 alias_versions=("v1beta1",)),
    ResourceType(kind="HTTPRoute", group="gateway.networking.k8s.io", version="v1",
                 plural="httproutes", namespaced=True, alias_versions=("v1beta1",)),
    ResourceType(kind="VirtualService", group="networking.istio.io", version="v1",
                 plural="virtualservices", namespaced=True, short_names=("vs",),
                 alias_versions=("v1beta1", "v1alpha3")),
    ResourceType(kind="DestinationRule", group="networking.istio.io", version="v1",
                 plural="destinationrules", namespaced=True, short_names=("dr",),
                 alias_versions=("v1beta1", "v1alpha3")),
    ResourceType(kind="ServiceEntry", group="networking.istio.io", version="v1",
                 plural="serviceentries", namespaced=True, short_names=("se",),
                 alias_versions=("v1beta1", "v1alpha3")),
    ResourceType(kind="AuthorizationPolicy", group="security.istio.io", version="v1",
                 plural="authorizationpolicies", namespaced=True, short_names=("ap",),
                 alias_versions=("v1beta1",)),
    ResourceType(kind="PeerAuthentication", group="security.istio.io", version="v1",
                 plural="peerauthentications", namespaced=True, short_names=("pa",),
                 alias_versions=("v1beta1",)),
)

_BY_KIND: dict[str, ResourceType] = {rt.kind: rt for rt in RESOURCES}
_BY_NAME: dict[str, ResourceType] = {}
for _rt in RESOURCES:
    for _alias in (_rt.kind, _rt.plural, _rt.singular, *_rt.short_names):
        _BY_NAME[_alias.lower()] = _rt
        # kubectl also accepts "<plural>.<group>" (e.g. gateways.gateway.networking.k8s.io).
        if _rt.group:
            _BY_NAME[f"{_alias.lower()}.{_rt.group}"] = _rt


def by_kind(kind: str) -> ResourceType:
    """The resource type of an exact Kind (``Pod``); :class:`KeyError` when unknown."""
    return _BY_KIND[kind]


def lookup(name: str) -> ResourceType | None:
    """The resource type for any name kubectl accepts (``pods``, ``po``, ``Pod``), or None."""
    return _BY_NAME.get(name.lower())


def by_group_plural(group: str, version: str, plural: str) -> ResourceType | None:
    """The resource served at ``/apis/<group>/<version>/<plural>`` (group "" for /api/v1)."""
    rt = _BY_NAME.get(plural)
    if rt is None or rt.plural != plural or rt.group != group or version not in rt.versions:
        return None
    return rt


def group_versions() -> dict[str, tuple[str, ...]]:
    """Every named API group (not the core group) and the versions served, preferred first."""
    groups: dict[str, tuple[str, ...]] = {}
    for rt in RESOURCES:
        if rt.group:
            known = groups.get(rt.group, ())
            groups[rt.group] = known + tuple(v for v in rt.versions if v not in known)
    return groups
