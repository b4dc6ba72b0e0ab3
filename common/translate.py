"""API objects -> :class:`~common.model.Snapshot`, incrementally.

Theory of operation.  :class:`MeshTranslator` keeps the newest API object of every
kind it reads and, next to it, what each object translated into (a Workload per Pod,
a Service per Service with its EndpointSlices, a Waypoint per waypoint Gateway).  An
informer event only stores the object and marks what depends on it as dirty;
:meth:`MeshTranslator.snapshot` re-translates the dirty pieces, patches the indexes
they touch and copies the indexes into a new immutable snapshot.  One pod changing in
a mesh of ten thousand costs one pod's translation and a few dict copies.

Dependencies (what an object change marks dirty):

* Pod: its workload; the waypoint it serves (label ``gateway.networking.k8s.io/gateway-name``).
* Namespace (labels changed): its pods and services (enrolment, ``istio.io/use-waypoint``).
* Node (labels changed): the pods on it, every service and waypoint (endpoint locality).
* Service: itself; the waypoint of the same name (its VIP).
* EndpointSlice: its service (label ``kubernetes.io/service-name``).
* Gateway: its waypoint; when the waypoint appears, disappears or changes
  ``istio.io/waypoint-for``, the pods and services that name it.
* AuthorizationPolicy / PeerAuthentication: recompiled as a whole (they are few).
* HTTPRoute / VirtualService / DestinationRule / ServiceEntry: kept raw for the waypoint.

Errors are per object: an object that cannot be translated becomes an
:class:`~common.model.Issue` and is left out; nothing here raises for bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from common.api.base import field_errors
from common.api.gateway import GatewaySpec
from common.authz.compile import (
    DEFAULT_ROOT_NAMESPACE,
    PolicyObject,
    compile_authorization_policies,
)
from common.authz.index import WaypointPolicies, ZtunnelPolicies
from common.authz.model import PolicyIssue, ServiceRef, WorkloadRef
from common.authz.peer import PeerAuthenticationConfig, compile_peer_authentications
from common.errors import IdentityError
from common.identity import SpiffeId
from common.kube.objects import (
    EndpointSlice,
    Gateway,
    KubeObject,
    Node,
    Pod,
    Resource,
)
from common.kube.objects import Service as KubeService
from common.kube.watch import Change, Resync
from common.logging import get_logger
from common.model import (
    DEFAULT_DOMAIN,
    DEFAULT_TRUST_DOMAIN,
    EMPTY_LOCALITY,
    Endpoint,
    Issue,
    Locality,
    Service,
    ServicePort,
    Severity,
    Snapshot,
    TrafficType,
    Waypoint,
    WaypointEndpoint,
    WaypointRef,
    Workload,
)
from common.service_entries import allocate_addresses

__all__ = ["KINDS", "NETNS_ANNOTATION", "MeshTranslator", "translate"]

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
SERVICE_NAME = "kubernetes.io/service-name"
NETNS_ANNOTATION = "pyambient.io/netns"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
WAYPOINT_CLASS = "istio-waypoint"
AMBIENT = "ambient"
NONE = "none"

#: Every kind the translator reads, in the order discovery should list them.
KINDS: tuple[str, ...] = (
    "Namespace", "Node", "Gateway", "Pod", "Service", "EndpointSlice", "AuthorizationPolicy",
    "PeerAuthentication", "HTTPRoute", "VirtualService", "DestinationRule", "ServiceEntry",
)
_POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
_ROUTE_KINDS = ("HTTPRoute", "VirtualService", "DestinationRule", "ServiceEntry")
# The MeshTranslator attributes a snapshot publishes.
_INDEXES = ("_by_ip", "_by_uid", "_by_node", "_svc_by_vip", "_svc_by_host", "_services",
            "_waypoints", "_namespaces")

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
T = TypeVar("T")
_log = get_logger("translate")
_TERMINAL_PHASES = ("Succeeded", "Failed")


def _key(obj: Resource) -> Key:
    return (obj.metadata.namespace or "", obj.metadata.name)


def _issue(kind: str, key: Key, severity: Severity, reason: str, message: str) -> Issue:
    return Issue(kind, key[0], key[1], severity, reason, message)


def _node_locality(node: Resource | None) -> Locality:
    if not isinstance(node, Node):
        return EMPTY_LOCALITY
    labels = node.metadata.labels
    region, zone, subzone = (labels.get(REGION_LABEL, ""), labels.get(ZONE_LABEL, ""),
                             labels.get(SUBZONE_LABEL, ""))
    if not (region or zone or subzone):
        return EMPTY_LOCALITY
    return Locality(region, zone, subzone)


def _pod_ready(pod: Pod) -> bool:
    """Running with an IP, and not failing readiness (when the kubelet reports it)."""
    status = pod.status
    if status.phase != "Running" or not status.pod_ip:
        return False
    for cond in status.conditions or ():
        if cond.type == "Ready":
            return cond.status == "True"
    return True


def _pod_ips(pod: Pod) -> tuple[str, ...]:
    ips = [p.ip for p in pod.status.pod_ips or () if p.ip]
    if pod.status.pod_ip and pod.status.pod_ip not in ips:
        ips.insert(0, pod.status.pod_ip)
    return tuple(ips)


@dataclass(frozen=True, slots=True)
class _WaypointUse:
    """What an object asked for with ``istio.io/use-waypoint`` and where the label was."""

    ref: WaypointRef | None   # None: no label anywhere, or ``none``
    on_object: bool           # the label is on the pod/service itself (not its namespace)


def _waypoint_use(labels: Mapping[str, str], namespace: str,
                  ns_labels: Mapping[str, str]) -> _WaypointUse:
    """The waypoint an object names: its own label first, else its namespace's."""
    for source, on_object in ((labels, True), (ns_labels, False)):
        name = source.get(USE_WAYPOINT)
        if name is None:
            continue
        if name == NONE or not name:
            return _WaypointUse(None, on_object)
        return _WaypointUse(WaypointRef(source.get(USE_WAYPOINT_NAMESPACE) or namespace, name),
                            on_object)
    return _WaypointUse(None, False)


def _group(endpoints: Iterable[Any]) -> tuple[dict[tuple[str, str], tuple[Any, ...]],
                                              dict[str, tuple[Any, ...]]]:
    """Endpoints by (region, zone) and by region, for locality-preferring picks."""
    by_zone: dict[tuple[str, str], list[Any]] = {}
    by_region: dict[str, list[Any]] = {}
    for ep in endpoints:
        loc: Locality = ep.locality
        if loc.region:
            by_region.setdefault(loc.region, []).append(ep)
            if loc.zone:
                by_zone.setdefault((loc.region, loc.zone), []).append(ep)
    return ({k: tuple(v) for k, v in by_zone.items()},
            {k: tuple(v) for k, v in by_region.items()})


#: Istio's annotation for a Service's traffic distribution, read when the Service has no
#: ``spec.trafficDistribution`` (the field is newer than the annotation).
TRAFFIC_DISTRIBUTION_ANNOTATION = "networking.istio.io/traffic-distribution"
_CLOSE = frozenset({"preferclose", "prefersamezone"})


def _prefer_close(svc: KubeService) -> bool:
    """Whether the Service asks ztunnel to keep traffic in the client's zone, as istiod
    reads it: the spec field when set, else the annotation (case-insensitive)."""
    field_value = (svc.spec.model_extra or {}).get("trafficDistribution")
    if isinstance(field_value, str) and field_value:
        return field_value.lower() in _CLOSE
    annotation = svc.metadata.annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION, "")
    return annotation.lower() in _CLOSE


class MeshTranslator:
    """The translation state of one discovery client; feed it events, take snapshots.

    Not thread-safe and not meant to be shared: one task applies events and builds
    snapshots; the snapshots it returns are immutable and can go anywhere.
    """

    def __init__(self, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 domain: str = DEFAULT_DOMAIN,
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.trust_domain = trust_domain
        self.domain = domain
        self.root_namespace = root_namespace
        self.version = 0
        # Newest API objects, per kind.
        self._objects: dict[str, dict[Key, Resource]] = {kind: {} for kind in KINDS}
        # Reverse dependencies.
        self._pods_by_ns: dict[str, set[Key]] = {}
        self._pods_by_node: dict[str, set[Key]] = {}
        self._services_by_ns: dict[str, set[Key]] = {}
        self._slices_by_service: dict[Key, set[Key]] = {}
        self._gateway_pods: dict[WaypointRef, set[Key]] = {}
        self._waypoint_users_pod: dict[WaypointRef, set[Key]] = {}
        self._waypoint_users_svc: dict[WaypointRef, set[Key]] = {}
        self._pod_asked: dict[Key, WaypointRef] = {}
        self._svc_asked: dict[Key, WaypointRef] = {}
        # Translated pieces.
        self._workloads: dict[Key, Workload] = {}
        self._services: dict[Key, Service] = {}
        self._waypoints: dict[WaypointRef, Waypoint] = {}
        self._issues: dict[tuple[str, Key], tuple[Issue, ...]] = {}
        self._ztunnel_policies = ZtunnelPolicies(root_namespace)
        self._waypoint_policies = WaypointPolicies()
        self._peer_auth = PeerAuthenticationConfig(root_namespace, (), ())
        self._policy_issues: tuple[Issue, ...] = ()
        self._raw: dict[str, tuple[KubeObject, ...]] = {kind: () for kind in _ROUTE_KINDS}
        # Indexes, patched as pieces change.
        self._ip_claims: dict[str, dict[Key, None]] = {}
        self._by_ip: dict[str, Workload] = {}
        self._by_uid: dict[str, Workload] = {}
        self._node_members: dict[str, dict[str, None]] = {}
        self._by_node: dict[str, tuple[str, ...]] = {}
        self._vip_claims: dict[str, dict[Key, None]] = {}
        self._svc_by_vip: dict[str, Service] = {}
        self._svc_by_host: dict[str, Service] = {}
        self._namespaces: dict[str, Mapping[str, str]] = {}
        # Work to do at the next snapshot.
        self._dirty_pods: set[Key] = set()
        self._dirty_services: set[Key] = set()
        self._dirty_waypoints: set[WaypointRef] = set()
        self._dirty_nodes: set[str] = set()
        self._dirty_node_lists: set[str] = set()
        self._dirty_kinds: set[str] = set()
        self._namespace_issues_dirty = False
        # The indexes as the last snapshot published them (shared while unchanged).
        self._published: dict[str, dict[Any, Any]] = {}

    # -- events ---------------------------------------------------------------------------

    def apply(self, kind: str, event: Resync[Any] | Change[Any]) -> None:
        """Apply one informer event for ``kind`` (a Kind name from :data:`KINDS`)."""
        if isinstance(event, Resync):
            self.replace(kind, event.objects)
        elif event.type == "DELETED":
            self.delete(kind, event.object)
        else:
            self.upsert(kind, event.object)

    def replace(self, kind: str, objects: Iterable[Resource]) -> None:
        """The complete current list of ``kind`` (after a list or re-list)."""
        fresh = {_key(obj): obj for obj in objects}
        for key in [k for k in self._objects[kind] if k not in fresh]:
            self._remove(kind, key)
        for obj in fresh.values():
            self.upsert(kind, obj)

    def upsert(self, kind: str, obj: Resource) -> None:
        key = _key(obj)
        store = self._objects[kind]
        old = store.get(key)
        rv = obj.metadata.resource_version
        if old is not None and rv and old.metadata.resource_version == rv:
            return  # a re-list after a reconnect hands back what we have
        store[key] = obj
        self._changed(kind, key, old, obj)

    def delete(self, kind: str, obj: Resource) -> None:
        self._remove(kind, _key(obj))

    def _remove(self, kind: str, key: Key) -> None:
        old = self._objects[kind].pop(key, None)
        if old is not None:
            self._changed(kind, key, old, None)

    def _changed(self, kind: str, key: Key, old: Resource | None, new: Resource | None) -> None:
        if kind == "Pod":
            self._pod_changed(key, old, new)
        elif kind == "Namespace":
            self._namespace_changed(key[1], old, new)
        elif kind == "Node":
            if _node_locality(old) != _node_locality(new) or old is None or new is None:
                self._dirty_nodes.add(key[1])
        elif kind == "Service":
            self._dirty_services.add(key)
            self._dirty_waypoints.add(WaypointRef(*key))
            _move(self._services_by_ns, key[0], key, present=new is not None)
        elif kind == "EndpointSlice":
            for obj in (old, new):
                if obj is not None:
                    self._slice_changed(key, obj, present=obj is new)
        elif kind == "Gateway":
            self._dirty_waypoints.add(WaypointRef(*key))
        else:
            self._dirty_kinds.add(kind)

    def _pod_changed(self, key: Key, old: Resource | None, new: Resource | None) -> None:
        self._dirty_pods.add(key)
        _move(self._pods_by_ns, key[0], key, present=new is not None)
        for obj, present in ((old, False), (new, True)):
            if not isinstance(obj, Pod):
                continue
            node = obj.spec.node_name or ""
            _move(self._pods_by_node, node, key, present=present)
            gateway = obj.metadata.labels.get(GATEWAY_NAME)
            if gateway:
                ref = WaypointRef(key[0], gateway)
                _move(self._gateway_pods, ref, key, present=present)
                self._dirty_waypoints.add(ref)

    def _namespace_changed(self, name: str, old: Resource | None, new: Resource | None) -> None:
        old_labels = old.metadata.labels if old is not None else None
        new_labels = new.metadata.labels if new is not None else None
        if old_labels == new_labels:
            return
        self._dirty_pods.update(self._pods_by_ns.get(name, ()))
        self._dirty_services.update(self._services_by_ns.get(name, ()))
        self._namespace_issues_dirty = True

    def _slice_changed(self, key: Key, obj: Resource, present: bool) -> None:
        service = obj.metadata.labels.get(SERVICE_NAME)
        if service:
            svc_key = (key[0], service)
            _move(self._slices_by_service, svc_key, key, present=present)
            self._dirty_services.add(svc_key)

    # -- snapshot -------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True when events arrived that the last snapshot does not reflect yet."""
        return bool(self._dirty_pods or self._dirty_services or self._dirty_waypoints
                    or self._dirty_nodes or self._dirty_kinds or self._namespace_issues_dirty)

    def snapshot(self) -> Snapshot:
        """Translate what changed since the last call and return a new snapshot."""
        for node in self._dirty_nodes:
            self._dirty_pods.update(self._pods_by_node.get(node, ()))
        if self._dirty_nodes:
            self._dirty_services.update(self._objects["Service"])
            self._dirty_waypoints.update(WaypointRef(*k) for k in self._objects["Gateway"])
            self._dirty_nodes.clear()
        touched: set[str] = set()
        if self._dirty_waypoints:
            touched.add("_waypoints")
        self._rebuild_waypoints()
        if self._dirty_pods:
            touched.update(("_by_ip", "_by_uid"))
        self._rebuild_workloads()
        if self._dirty_node_lists:
            touched.add("_by_node")
        self._rebuild_node_lists()
        if self._dirty_services:
            touched.update(("_svc_by_vip", "_svc_by_host", "_services"))
        self._rebuild_services()
        if self._namespace_issues_dirty:
            touched.add("_namespaces")
            self._rebuild_namespaces()
        if self._dirty_kinds & set(_POLICY_KINDS):
            self._rebuild_policies()
        for kind in _ROUTE_KINDS:
            if kind in self._dirty_kinds:
                store = self._objects[kind]
                raw = tuple(obj for k in sorted(store)
                            if isinstance(obj := store[k], KubeObject))
                # ServiceEntry hosts without addresses get VIPs (common.service_entries).
                self._raw[kind] = allocate_addresses(raw) if kind == "ServiceEntry" else raw
        ix = {name: self._published_index(name, name in touched) for name in _INDEXES}
        self._dirty_kinds.clear()
        self.version += 1
        issues = [i for group in self._issues.values() for i in group]
        issues.extend(self._policy_issues)
        issues.sort(key=lambda i: (i.kind, i.namespace, i.name, i.message))
        return Snapshot(
            version=self.version, trust_domain=self.trust_domain, domain=self.domain,
            workloads_by_ip=ix["_by_ip"], workloads_by_uid=ix["_by_uid"],
            workloads_by_node=ix["_by_node"], services_by_vip=ix["_svc_by_vip"],
            services_by_host=ix["_svc_by_host"], services_by_key=ix["_services"],
            waypoints_by_ref=ix["_waypoints"], namespaces=ix["_namespaces"],
            ztunnel_policies=self._ztunnel_policies, waypoint_policies=self._waypoint_policies,
            peer_authentication=self._peer_auth,
            http_routes=self._raw["HTTPRoute"], virtual_services=self._raw["VirtualService"],
            destination_rules=self._raw["DestinationRule"],
            service_entries=self._raw["ServiceEntry"], issues=tuple(issues))

    def _published_index(self, name: str, touched: bool) -> dict[Any, Any]:
        """The snapshot's copy of index ``name``: the previous one when it did not change.

        Snapshots share unchanged indexes (they are never written once published), so a
        pod event copies the workload indexes only.  ``dict.copy`` rather than ``dict()``:
        it clones the hash table in one piece even after deletions left holes in it,
        where ``dict()`` re-inserts every entry.
        """
        found = self._published.get(name)
        if found is None or touched:
            found = self._published[name] = getattr(self, name).copy()
        return found

    def _set_issues(self, kind: str, key: Key, issues: list[Issue]) -> None:
        if issues:
            self._issues[(kind, key)] = tuple(issues)
        else:
            self._issues.pop((kind, key), None)

    # -- waypoints ------------------------------------------------------------------------

    def _rebuild_waypoints(self) -> None:
        for ref in self._dirty_waypoints:
            key = (ref.namespace, ref.name)
            old = self._waypoints.get(ref)
            issues: list[Issue] = []
            gateway = self._objects["Gateway"].get(key)
            new = (_guarded("Gateway", key, issues, self._waypoint, ref, gateway)
                   if isinstance(gateway, Gateway) else None)
            self._set_issues("Gateway", key, issues)
            if new is None:
                self._waypoints.pop(ref, None)
            else:
                self._waypoints[ref] = new
            old_type = old.traffic_type if old is not None else None
            if old_type != (new.traffic_type if new is not None else None):
                self._dirty_pods.update(self._waypoint_users_pod.get(ref, ()))
                self._dirty_services.update(self._waypoint_users_svc.get(ref, ()))
                self._dirty_services.add(key)
                self._namespace_issues_dirty = True
        self._dirty_waypoints.clear()

    def _waypoint(self, ref: WaypointRef, gateway: Gateway, issues: list[Issue]
                  ) -> Waypoint | None:
        key = (ref.namespace, ref.name)
        if gateway.spec.get("gatewayClassName") != WAYPOINT_CLASS:
            return None  # an ingress or another class: not ours
        try:
            spec = GatewaySpec.model_validate(gateway.spec)
        except ValidationError as exc:
            detail = "; ".join(f"{path}: {msg}" for path, msg in field_errors(exc))
            issues.append(_issue("Gateway", key, Severity.ERROR, "InvalidSpec",
                                 f"{detail}. The waypoint is not used."))
            return None
        if not any(lst.port == 15008 and lst.protocol == "HBONE" for lst in spec.listeners):
            issues.append(_issue("Gateway", key, Severity.ERROR, "InvalidSpec",
                                 "a waypoint needs a listener with port 15008 and protocol "
                                 "HBONE (name it 'mesh'); the waypoint is not used"))
            return None
        label = gateway.metadata.labels.get(WAYPOINT_FOR, TrafficType.SERVICE.value)
        try:
            traffic = TrafficType(label)
        except ValueError:
            issues.append(_issue("Gateway", key, Severity.WARNING, "UnsupportedValue",
                                 f"label {WAYPOINT_FOR}={label!r} is not one of service, "
                                 f"workload, all, none; using service"))
            traffic = TrafficType.SERVICE
        nodes = self._objects["Node"]
        endpoints: list[WaypointEndpoint] = []
        account = ""
        pods = self._objects["Pod"]
        for pod_key in sorted(self._gateway_pods.get(ref, ())):
            pod = pods.get(pod_key)
            if not isinstance(pod, Pod) or not _pod_ready(pod) or pod.spec.host_network:
                continue
            node = pod.spec.node_name or ""
            endpoints.append(WaypointEndpoint(
                pod.status.pod_ip or "", node, _node_locality(nodes.get(("", node))),
                pod.metadata.uid or f"{pod_key[0]}/{pod_key[1]}"))
            account = account or pod.spec.service_account_name or "default"
        try:
            identity = SpiffeId(self.trust_domain, ref.namespace, account or ref.name)
        except IdentityError as exc:
            issues.append(_issue("Gateway", key, Severity.ERROR, "InvalidSpec",
                                 f"cannot name the waypoint's identity: {exc}"))
            return None
        svc = self._objects["Service"].get(key)
        vips = _vips(svc) if isinstance(svc, KubeService) else ()
        by_zone, by_region = _group(endpoints)
        return Waypoint(ref.namespace, ref.name, traffic, identity, tuple(endpoints), vips,
                        by_zone, by_region)

    def _usable_waypoint(self, use: _WaypointUse, for_services: bool) -> WaypointRef | None:
        if use.ref is None:
            return None
        waypoint = self._waypoints.get(use.ref)
        if waypoint is None:
            return None
        ok = (waypoint.traffic_type.serves_services if for_services
              else waypoint.traffic_type.serves_workloads)
        return use.ref if ok else None

    def _track_use(self, users: dict[WaypointRef, set[Key]], asked: dict[Key, WaypointRef],
                   key: Key, ref: WaypointRef | None) -> None:
        old = asked.get(key)
        if old == ref:
            return
        if old is not None:
            _move(users, old, key, present=False)
            del asked[key]
        if ref is not None:
            _move(users, ref, key, present=True)
            asked[key] = ref

    def _use_issue(self, kind: str, key: Key, use: _WaypointUse, for_services: bool,
                   issues: list[Issue]) -> None:
        """Warn when an object's own ``use-waypoint`` label cannot be honoured."""
        if use.ref is None or not use.on_object:
            return
        waypoint = self._waypoints.get(use.ref)
        name = f"{use.ref.namespace}/{use.ref.name}"
        if waypoint is None:
            issues.append(_issue(kind, key, Severity.WARNING, "WaypointNotFound",
                                 f"{USE_WAYPOINT} names waypoint {name}, which does not exist "
                                 f"(or is not a valid waypoint); traffic bypasses it"))
            return
        wanted = "service" if for_services else "workload"
        ok = (waypoint.traffic_type.serves_services if for_services
              else waypoint.traffic_type.serves_workloads)
        if not ok:
            issues.append(_issue(kind, key, Severity.WARNING, "WaypointTypeMismatch",
                                 f"waypoint {name} has {WAYPOINT_FOR}="
                                 f"{waypoint.traffic_type.value}, so it does not take {wanted} "
                                 f"traffic; set it to {wanted} or all"))

    # -- workloads ------------------------------------------------------------------------

    def _rebuild_workloads(self) -> None:
        pods = self._objects["Pod"]
        for key in self._dirty_pods:
            old = self._workloads.pop(key, None)
            pod = pods.get(key)
            issues: list[Issue] = []
            new = (_guarded("Pod", key, issues, self._workload, key, pod)
                   if isinstance(pod, Pod) else None)
            if not isinstance(pod, Pod):
                self._track_use(self._waypoint_users_pod, self._pod_asked, key, None)
            self._set_issues("Pod", key, issues)
            if new is not None:
                self._workloads[key] = new
            self._reindex_workload(key, old, new)
        self._dirty_pods.clear()

    def _workload(self, key: Key, pod: Pod, issues: list[Issue]) -> Workload | None:
        ns, name = key
        ns_labels = self._ns_labels(ns)
        labels = dict(pod.metadata.labels)
        use = _waypoint_use(labels, ns, ns_labels)
        self._track_use(self._waypoint_users_pod, self._pod_asked, key, use.ref)
        if pod.status.phase in _TERMINAL_PHASES:
            return None  # its IP may already belong to another pod
        account = pod.spec.service_account_name or "default"
        try:
            identity = SpiffeId(self.trust_domain, ns, account)
        except IdentityError as exc:
            issues.append(_issue("Pod", key, Severity.ERROR, "InvalidIdentity",
                                 f"cannot name the pod's identity: {exc}"))
            return None
        gateway_name = labels.get(GATEWAY_NAME)
        gateway = WaypointRef(ns, gateway_name) if gateway_name else None
        mode = labels.get(DATAPLANE_MODE)
        captured = (gateway is None and not pod.spec.host_network
                    and (mode == AMBIENT
                         or (mode != NONE and ns_labels.get(DATAPLANE_MODE) == AMBIENT)))
        self._use_issue("Pod", key, use, False, issues)
        node = pod.spec.node_name or ""
        named_ports = {p.name: p.container_port for c in pod.spec.containers
                       for p in c.ports or () if p.name}
        return Workload(
            uid=pod.metadata.uid or f"{ns}/{name}", name=name, namespace=ns, node=node,
            service_account=account, identity=identity, ips=_pod_ips(pod), labels=labels,
            locality=_node_locality(self._objects["Node"].get(("", node))),
            captured=captured, waypoint=self._usable_waypoint(use, False),
            netns=pod.metadata.annotations.get(NETNS_ANNOTATION), ready=_pod_ready(pod),
            gateway=gateway, named_ports=named_ports,
            authz_ref=WorkloadRef(ns, labels, name))

    def _reindex_workload(self, key: Key, old: Workload | None, new: Workload | None) -> None:
        if old is not None:
            if self._by_uid.get(old.uid) is old:
                del self._by_uid[old.uid]
            self._node_member(old.node, old.uid, present=False)
        if new is not None:
            self._by_uid[new.uid] = new
            self._node_member(new.node, new.uid, present=True)
        pod = self._objects["Pod"].get(key)
        host_network = isinstance(pod, Pod) and bool(pod.spec.host_network)
        old_ips = old.ips if old is not None else ()
        new_ips = new.ips if new is not None and not host_network else ()
        for ip in old_ips:
            if ip not in new_ips:
                claims = self._ip_claims.get(ip)
                if claims is not None:
                    claims.pop(key, None)
                self._settle_ip(ip)
        for ip in new_ips:
            self._ip_claims.setdefault(ip, {})[key] = None
            self._settle_ip(ip)

    def _settle_ip(self, ip: str) -> None:
        """Point ``ip`` at the best of the pods that claim it (ready first, then by name)."""
        claims = self._ip_claims.get(ip)
        best: Workload | None = None
        for key in sorted(claims or ()):
            wl = self._workloads.get(key)
            if wl is not None and (best is None or (wl.ready and not best.ready)):
                best = wl
        if best is None:
            self._ip_claims.pop(ip, None)
            self._by_ip.pop(ip, None)
        else:
            self._by_ip[ip] = best

    def _node_member(self, node: str, uid: str, present: bool) -> None:
        if not node:
            return  # not scheduled yet: no node's ztunnel is concerned
        members = self._node_members.setdefault(node, {})
        if present:
            members[uid] = None
        else:
            members.pop(uid, None)
        self._dirty_node_lists.add(node)

    def _rebuild_node_lists(self) -> None:
        """The per-node uid tuples, once per snapshot for the nodes whose pods changed."""
        for node in self._dirty_node_lists:
            members = self._node_members.get(node)
            if members:
                self._by_node[node] = tuple(sorted(members))
            else:
                self._node_members.pop(node, None)
                self._by_node.pop(node, None)
        self._dirty_node_lists.clear()

    # -- services -------------------------------------------------------------------------

    def _rebuild_services(self) -> None:
        services = self._objects["Service"]
        for key in self._dirty_services:
            old = self._services.pop(key, None)
            svc = services.get(key)
            issues: list[Issue] = []
            new = (_guarded("Service", key, issues, self._service, key, svc)
                   if isinstance(svc, KubeService) else None)
            if new is None:
                self._track_use(self._waypoint_users_svc, self._svc_asked, key, None)
            self._set_issues("Service", key, issues)
            if new is not None:
                self._services[key] = new
            self._reindex_service(key, old, new)
        self._dirty_services.clear()

    def _service(self, key: Key, svc: KubeService, issues: list[Issue]) -> Service:
        ns, name = key
        labels = dict(svc.metadata.labels)
        # A waypoint's Service is named like its Gateway (as Istio and ambientctl create it).
        own = WaypointRef(ns, name)
        waypoint_of = own if own in self._waypoints else None
        if waypoint_of is not None:
            use = _WaypointUse(None, False)
        else:
            use = _waypoint_use(labels, ns, self._ns_labels(ns))
            self._use_issue("Service", key, use, True, issues)
        self._track_use(self._waypoint_users_svc, self._svc_asked, key, use.ref)
        ports = tuple(_service_port(p.port, p.target_port, p.protocol, p.app_protocol, p.name)
                      for p in svc.spec.ports)
        endpoints = self._endpoints(key, ports)
        ready = tuple(ep for ep in endpoints if ep.ready)
        by_zone, by_region = _group(ready)
        return Service(
            namespace=ns, name=name, hostname=f"{name}.{ns}.svc.{self.domain}",
            vips=_vips(svc), ports=ports, endpoints=endpoints,
            waypoint=self._usable_waypoint(use, True), labels=labels, waypoint_of=waypoint_of,
            ref=ServiceRef(ns, name), ports_by_number={p.port: p for p in ports},
            ready_endpoints=ready, ready_by_zone=by_zone, ready_by_region=by_region,
            prefer_close=_prefer_close(svc))

    def _endpoints(self, key: Key, ports: tuple[ServicePort, ...]) -> tuple[Endpoint, ...]:
        slices = self._objects["EndpointSlice"]
        nodes = self._objects["Node"]
        seen: dict[str, Endpoint] = {}
        for slice_key in sorted(self._slices_by_service.get(key, ())):
            sl = slices.get(slice_key)
            if not isinstance(sl, EndpointSlice):
                continue
            numbers = {(p.name or ""): p.port for p in sl.ports or () if p.port}
            targets = {p.port: numbers[p.name or ""] for p in ports
                       if (p.name or "") in numbers}
            for ep in sl.endpoints:
                ready = ep.conditions.ready is not False and not ep.conditions.terminating
                node = ep.node_name
                locality = _node_locality(nodes.get(("", node))) if node else EMPTY_LOCALITY
                if locality is EMPTY_LOCALITY and ep.zone:
                    locality = Locality(zone=ep.zone)
                ref = ep.target_ref
                uid = ref.uid if ref is not None and ref.kind == "Pod" and ref.uid else None
                for ip in ep.addresses:
                    known = seen.get(ip)
                    if known is None or (ready and not known.ready):
                        seen[ip] = Endpoint(ip, ready, uid, node, locality, targets)
        return tuple(seen.values())

    def _reindex_service(self, key: Key, old: Service | None, new: Service | None) -> None:
        if old is not None:
            for host in self._hosts(old):
                if self._svc_by_host.get(host) is old:
                    del self._svc_by_host[host]
            for vip in old.vips:
                claims = self._vip_claims.get(vip)
                if claims is not None:
                    claims.pop(key, None)
                self._settle_vip(vip)
        if new is not None:
            for host in self._hosts(new):
                self._svc_by_host[host] = new
            for vip in new.vips:
                self._vip_claims.setdefault(vip, {})[key] = None
                self._settle_vip(vip)

    def _settle_vip(self, vip: str) -> None:
        claims = self._vip_claims.get(vip)
        if not claims:
            self._vip_claims.pop(vip, None)
            self._svc_by_vip.pop(vip, None)
            return
        self._svc_by_vip[vip] = self._services[min(claims)]

    @staticmethod
    def _hosts(svc: Service) -> tuple[str, ...]:
        short = f"{svc.name}.{svc.namespace}"
        return (svc.hostname, short, f"{short}.svc")

    # -- namespaces, policies -------------------------------------------------------------

    def _ns_labels(self, ns: str) -> Mapping[str, str]:
        obj = self._objects["Namespace"].get(("", ns))
        return obj.metadata.labels if obj is not None else {}

    def _rebuild_namespaces(self) -> None:
        self._namespaces = {}
        for key, obj in self._objects["Namespace"].items():
            labels = dict(obj.metadata.labels)
            self._namespaces[key[1]] = labels
            issues: list[Issue] = []
            use = _waypoint_use(labels, key[1], {})
            if use.ref is not None and use.ref not in self._waypoints:
                issues.append(_issue("Namespace", key, Severity.WARNING, "WaypointNotFound",
                                     f"{USE_WAYPOINT} names waypoint {use.ref.namespace}/"
                                     f"{use.ref.name}, which does not exist (or is not a valid "
                                     f"waypoint); traffic bypasses it"))
            self._set_issues("Namespace", key, issues)
        for kind, key in [k for k in self._issues if k[0] == "Namespace"]:
            if key[1] not in self._namespaces:
                del self._issues[(kind, key)]
        self._namespace_issues_dirty = False

    def _rebuild_policies(self) -> None:
        authz = compile_authorization_policies(
            (_policy_object(o) for o in self._sorted("AuthorizationPolicy")),
            root_namespace=self.root_namespace)
        peer = compile_peer_authentications(
            (_policy_object(o) for o in self._sorted("PeerAuthentication")),
            root_namespace=self.root_namespace)
        self._ztunnel_policies = authz.ztunnel
        self._waypoint_policies = authz.waypoint
        self._peer_auth = peer
        self._policy_issues = tuple(_from_policy_issue(i) for i in (*authz.issues, *peer.issues))

    def _sorted(self, kind: str) -> list[Resource]:
        store = self._objects[kind]
        return [store[k] for k in sorted(store)]


def _guarded(kind: str, key: Key, issues: list[Issue],
             translate_one: Callable[..., T | None], *args: Any) -> T | None:
    """``translate_one(*args, issues)``; an unexpected exception leaves only this object out."""
    try:
        return translate_one(*args, issues)
    except Exception as exc:
        # Bad input is reported as issues and never raises: reaching here is a bug, and it
        # must cost one object, not the whole snapshot.
        _log.exception("object_translation_failed", kind=kind, namespace=key[0], name=key[1])
        issues.append(_issue(kind, key, Severity.ERROR, "InternalError",
                             f"translation failed ({type(exc).__name__}: {exc}); the object "
                             f"is left out, please report this"))
        return None


def _move(index: dict[Any, set[Key]], bucket: Any, key: Key, present: bool) -> None:
    """Add ``key`` to (or drop it from) ``index[bucket]``, dropping empty buckets."""
    if present:
        index.setdefault(bucket, set()).add(key)
        return
    members = index.get(bucket)
    if members is not None:
        members.discard(key)
        if not members:
            del index[bucket]


def _vips(svc: KubeService) -> tuple[str, ...]:
    ips = svc.spec.cluster_ips or ([svc.spec.cluster_ip] if svc.spec.cluster_ip else [])
    return tuple(ip for ip in ips if ip and ip != "None")


def _service_port(port: int, target: int | str | None, protocol: str | None,
                  app_protocol: str | None, name: str | None) -> ServicePort:
    if target is None or target == "" or target == 0:
        resolved: int | str = port
    elif isinstance(target, str) and target.isdigit():
        resolved = int(target)
    else:
        resolved = target
    return ServicePort(port, resolved, protocol or "TCP", app_protocol, name)


def _policy_object(obj: Resource) -> PolicyObject:
    spec = obj.spec if isinstance(obj, KubeObject) else {}
    return PolicyObject(namespace=obj.metadata.namespace or "", name=obj.metadata.name,
                        spec=spec, annotations=obj.metadata.annotations,
                        creation_timestamp=obj.metadata.creation_timestamp or "")


def _from_policy_issue(issue: PolicyIssue) -> Issue:
    return Issue(issue.kind, issue.namespace, issue.name, Severity(issue.severity.value),
                 issue.reason, issue.message)


def translate(objects: Iterable[Resource], *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
              domain: str = DEFAULT_DOMAIN, root_namespace: str = DEFAULT_ROOT_NAMESPACE
              ) -> Snapshot:
    """One snapshot from a collection of API objects of any of :data:`KINDS` (others ignored)."""
    translator = MeshTranslator(trust_domain=trust_domain, domain=domain,
                                root_namespace=root_namespace)
    for obj in objects:
        if obj.kind in KINDS:
            translator.upsert(obj.kind, obj)
    return translator.snapshot()
