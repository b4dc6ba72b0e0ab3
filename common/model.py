"""The mesh as the data plane sees it: one immutable snapshot, indexed for per-connection lookups.

Theory of operation.  :mod:`common.translate` turns API objects into a
:class:`Snapshot`; :mod:`common.discovery` publishes a new one whenever the objects
change, and components swap it in with one attribute read.  Nothing here changes
after construction: the dict fields are built once and never written again, so a
connection can hold on to the snapshot it started with while a newer one is
published.  (They are plain dicts rather than read-only proxies because every
lookup on the request path goes through them and a proxy costs an extra call.)

Every lookup a connection makes is one or two dict hits whose cost does not depend on
the size of the mesh: workload by IP, service by VIP or host name, waypoint by
reference, endpoints of a service by locality.

Names follow Istio ambient: a *workload* is a pod, a *waypoint* is a Gateway of class
``istio-waypoint`` together with the pods that serve it, a workload is *captured*
when ztunnel intercepts its traffic (it is enrolled in ambient mode).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.authz.index import WaypointPolicies, ZtunnelPolicies
from common.authz.model import GatewayRef, ServiceRef, WorkloadRef
from common.authz.peer import PeerAuthenticationConfig
from common.identity import SpiffeId
from common.kube.objects import KubeObject

__all__ = [
    "DEFAULT_DOMAIN", "DEFAULT_TRUST_DOMAIN", "EMPTY_LOCALITY", "HBONE_PORT", "Endpoint",
    "Issue", "Locality", "Service", "ServicePort", "Severity", "Snapshot", "TrafficType",
    "Waypoint", "WaypointEndpoint", "WaypointRef", "Workload", "empty_snapshot",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_DOMAIN = "cluster.local"
HBONE_PORT = 15008

#: A waypoint is named by its Gateway object (namespace, name).
WaypointRef = GatewayRef


@dataclass(frozen=True, slots=True)
class Locality:
    """Where a node is: ``topology.kubernetes.io/region|zone``, ``topology.istio.io/subzone``."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    def __str__(self) -> str:
        return "/".join((self.region, self.zone, self.subzone)).rstrip("/")


EMPTY_LOCALITY = Locality()


class TrafficType(enum.Enum):
    """``istio.io/waypoint-for`` on a waypoint: which traffic it is meant to carry."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"

    @property
    def serves_services(self) -> bool:
        return self is TrafficType.SERVICE or self is TrafficType.ALL

    @property
    def serves_workloads(self) -> bool:
        return self is TrafficType.WORKLOAD or self is TrafficType.ALL


class Severity(enum.Enum):
    ERROR = "error"      # the object is left out of the snapshot (or part of it is)
    WARNING = "warning"  # the object is in, with the stated difference


@dataclass(frozen=True, slots=True)
class Issue:
    """A problem translating one object, for a log line and the object's status."""

    kind: str
    namespace: str
    name: str
    severity: Severity
    reason: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else \
            f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod.

    ``waypoint`` is set only when the named waypoint exists and accepts workload
    traffic; ``gateway`` is set on the pods that *are* a waypoint (they are never
    captured).  ``named_ports`` maps container port names to numbers, for Services
    whose ``targetPort`` is a name.  ``authz_ref`` is what L4 policy lookups hash,
    built once here.
    """

    uid: str
    name: str
    namespace: str
    node: str
    service_account: str
    identity: SpiffeId
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    locality: Locality
    captured: bool
    waypoint: WaypointRef | None
    netns: str | None
    ready: bool
    gateway: WaypointRef | None
    named_ports: Mapping[str, int] = field(repr=False)
    authz_ref: WorkloadRef = field(repr=False)

    @property
    def is_waypoint(self) -> bool:
        return self.gateway is not None

    @property
    def ip(self) -> str | None:
        """The primary pod IP (``status.podIP``)."""
        return self.ips[0] if self.ips else None


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service; ``target_port`` is a number or a container port name."""

    port: int
    target_port: int | str
    protocol: str = "TCP"
    app_protocol: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a Service (from an EndpointSlice).

    ``target_ports`` maps each service port number to the port on this endpoint, as
    the EndpointSlice resolved it (named target ports included); a port missing here
    is resolved at connection time from the pod's container ports.
    """

    ip: str
    ready: bool
    workload_uid: str | None = None
    node: str | None = None
    locality: Locality = EMPTY_LOCALITY
    target_ports: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes Service with its endpoints.

    ``waypoint`` is set only when the named waypoint exists and accepts service
    traffic.  ``waypoint_of`` is set on a waypoint's own Service: traffic to it is
    never sent to a waypoint.  The ``ready_*`` fields are the ready endpoints grouped
    by locality, so an endpoint pick that prefers the client's zone is a dict hit.
    ``prefer_close`` is set when the Service asks for traffic to stay close to its
    client (``spec.trafficDistribution`` ``PreferClose`` or ``PreferSameZone``, else the
    annotation ``networking.istio.io/traffic-distribution``): Istio's ztunnel then
    prefers the client's zone, then its region; otherwise it spreads over every ready
    endpoint.
    """

    namespace: str
    name: str
    hostname: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    waypoint: WaypointRef | None
    labels: Mapping[str, str]
    waypoint_of: WaypointRef | None
    ref: ServiceRef
    ports_by_number: Mapping[int, ServicePort] = field(repr=False)
    ready_endpoints: tuple[Endpoint, ...] = field(repr=False)
    ready_by_zone: Mapping[tuple[str, str], tuple[Endpoint, ...]] = field(repr=False)
    ready_by_region: Mapping[str, tuple[Endpoint, ...]] = field(repr=False)
    prefer_close: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class WaypointEndpoint:
    """A ready pod of a waypoint."""

    ip: str
    node: str
    locality: Locality
    workload_uid: str


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A Gateway of class ``istio-waypoint`` with an HBONE listener on 15008, and its pods.

    ``identity`` is what ztunnel expects the waypoint's certificate to carry: the
    service account of its ready pods, or (before any is ready) the account named
    like the Gateway, which is what ``ambientctl waypoint apply`` creates.
    """

    namespace: str
    name: str
    traffic_type: TrafficType
    identity: SpiffeId
    endpoints: tuple[WaypointEndpoint, ...]
    vips: tuple[str, ...]
    ready_by_zone: Mapping[tuple[str, str], tuple[WaypointEndpoint, ...]] = field(repr=False)
    ready_by_region: Mapping[str, tuple[WaypointEndpoint, ...]] = field(repr=False)

    @property
    def ref(self) -> WaypointRef:
        return WaypointRef(self.namespace, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything the data plane needs, at one resourceVersion-consistent moment.

    ``services_by_host`` holds ``<svc>.<ns>.svc.<domain>``, ``<svc>.<ns>.svc`` and
    ``<svc>.<ns>``; a bare ``<svc>`` depends on the client's namespace, see
    :meth:`service_for_name`.  ``workloads_by_node`` maps a node to the uids of its
    pods.  The route objects are kept as they came from the API, for the waypoint's
    route translator.
    """

    version: int
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    domain: str = DEFAULT_DOMAIN
    workloads_by_ip: Mapping[str, Workload] = field(default_factory=dict)
    workloads_by_uid: Mapping[str, Workload] = field(default_factory=dict)
    workloads_by_node: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    services_by_vip: Mapping[str, Service] = field(default_factory=dict)
    services_by_host: Mapping[str, Service] = field(default_factory=dict)
    services_by_key: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    waypoints_by_ref: Mapping[WaypointRef, Waypoint] = field(default_factory=dict)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ztunnel_policies: ZtunnelPolicies = field(
        default_factory=lambda: ZtunnelPolicies("istio-system"))
    waypoint_policies: WaypointPolicies = field(default_factory=WaypointPolicies)
    peer_authentication: PeerAuthenticationConfig = field(
        default_factory=lambda: PeerAuthenticationConfig("istio-system", (), ()))
    http_routes: tuple[KubeObject, ...] = ()
    virtual_services: tuple[KubeObject, ...] = ()
    destination_rules: tuple[KubeObject, ...] = ()
    service_entries: tuple[KubeObject, ...] = ()
    issues: tuple[Issue, ...] = ()

    def service_for_name(self, name: str, client_namespace: str) -> Service | None:
        """The Service a DNS name or Host header means to a client in ``client_namespace``.

        A bare name is relative to the client's namespace (the pod's DNS search path);
        a trailing dot and a port are ignored; case does not matter.
        """
        host = name.lower().rstrip(".")
        if ":" in host and not host.startswith("["):
            host = host.partition(":")[0]
        if "." not in host:
            host = f"{host}.{client_namespace}.svc.{self.domain}"
        return self.services_by_host.get(host)

    def workload_for_ip(self, ip: str) -> Workload | None:
        return self.workloads_by_ip.get(ip)

    def node_workloads(self, node: str) -> tuple[Workload, ...]:
        """The pods scheduled on ``node`` (for ztunnel: the ones it captures and certifies)."""
        by_uid = self.workloads_by_uid
        return tuple(by_uid[uid] for uid in self.workloads_by_node.get(node, ()))


def empty_snapshot(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Snapshot:
    """Version 0: nothing known yet (what a holder serves before the first list)."""
    return Snapshot(version=0, trust_domain=trust_domain)
