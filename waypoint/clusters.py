"""Per-cluster live state: endpoint picker, circuit breaker and connection pool.

Theory of operation.  The route table names clusters (a service port, maybe a
subset); this module keeps, per cluster name, the long-lived objects the request
path needs: an :class:`~waypoint.resilience.EndpointPicker` (load balancing,
locality, outlier detection), a :class:`~waypoint.resilience.CircuitBreaker` and a
:class:`~waypoint.upstream.ConnectionPool`.  A discovery update calls
:meth:`Clusters.update`: existing clusters keep their objects and get the new
hosts through ``set_hosts`` (so outlier and least-request state survives), new
clusters are created, vanished ones dropped (their idle connections closed).
Requests in flight keep the :class:`ClusterState` they started with.

Endpoints come from the discovery snapshot (:func:`snapshot_endpoints`) or, in
bench mode, from a static list.  A cluster of a ServiceEntry host gets
:class:`~waypoint.egress.ExternalEndpoint` values (:func:`egress_endpoints`), which
every pool's :class:`~waypoint.egress.EgressTransport` dials outside the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import trio

from common.logging import get_logger
from common.model import Snapshot
from common.service_entries import ExternalService, entry_index, is_ip
from waypoint.egress import EgressTransport, ExternalEndpoint
from waypoint.resilience import CircuitBreaker, EndpointPicker, Host, Locality
from waypoint.routing.model import Cluster, RouteTable
from waypoint.tls_origination import origination_for
from waypoint.upstream import ConnectionPool, EndpointInfo, Transport

_log = get_logger("waypoint.clusters")

_NO_LABELS: Mapping[str, str] = MappingProxyType({})
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint of a cluster as discovery describes it."""

    info: EndpointInfo
    weight: int = 1
    locality: Locality = field(default_factory=Locality)
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    workload: str = UNKNOWN
    version: str = UNKNOWN

    @property
    def address(self) -> str:
        ip = self.info.ip
        return f"[{ip}]:{self.info.port}" if ":" in ip else f"{ip}:{self.info.port}"


EndpointSource = Callable[[Cluster], list[EndpointSpec]]


class ClusterState:
    """The live objects of one cluster."""

    def __init__(self, cluster: Cluster, endpoints: Iterable[EndpointSpec],
                 transport: Transport, *, client_locality: Locality | None = None,
                 client_labels: Mapping[str, str] | None = None) -> None:
        self.cluster = cluster
        res = cluster.resilience
        self.breaker = CircuitBreaker(res.connection_pool)
        self.pool = ConnectionPool(self.breaker, EgressTransport(transport))
        self._client_locality = client_locality
        self._client_labels = client_labels
        self.endpoints: dict[str, EndpointSpec] = {}
        self.picker = EndpointPicker((), res.load_balancer, res.outlier_detection,
                                     client_locality=client_locality,
                                     client_labels=client_labels, cluster=cluster.name)
        self.next_sweep = 0.0
        self.set_endpoints(endpoints)

    def set_endpoints(self, endpoints: Iterable[EndpointSpec]) -> None:
        specs = {spec.address: spec for spec in endpoints}
        self.endpoints = specs
        self.picker.set_hosts(Host(address, weight=spec.weight, locality=spec.locality,
                                   labels=spec.labels) for address, spec in specs.items())

    def reconfigure(self, cluster: Cluster) -> None:
        """New settings for the same cluster name: limits apply at once; a changed load
        balancer or outlier policy starts a new picker (host state cannot carry over)."""
        old = self.cluster.resilience
        self.cluster = cluster
        res = cluster.resilience
        self.breaker.settings = res.connection_pool
        if res.load_balancer != old.load_balancer or res.outlier_detection != old.outlier_detection:
            self.picker = EndpointPicker((), res.load_balancer, res.outlier_detection,
                                         client_locality=self._client_locality,
                                         client_labels=self._client_labels, cluster=cluster.name)
            self.set_endpoints(self.endpoints.values())

    def set_client(self, locality: Locality, labels: Mapping[str, str]) -> None:
        """The waypoint's own locality changed (learnt from discovery): a new picker, as
        the priority levels are ranked relative to it."""
        self._client_locality = locality
        self._client_labels = labels
        res = self.cluster.resilience
        self.picker = EndpointPicker((), res.load_balancer, res.outlier_detection,
                                     client_locality=locality, client_labels=labels,
                                     cluster=self.cluster.name)
        self.set_endpoints(self.endpoints.values())

    def sweep(self, now: float) -> None:
        """Run outlier detection's interval work when it is due."""
        outlier = self.cluster.resilience.outlier_detection
        if outlier is not None and now >= self.next_sweep:
            self.picker.sweep(now)
            self.next_sweep = now + outlier.interval


class Clusters:
    """Every cluster of the current route table, by name."""

    def __init__(self, transport: Transport, *, client_locality: Locality | None = None,
                 client_labels: Mapping[str, str] | None = None) -> None:
        self.transport = transport
        self.client_locality = client_locality
        self.client_labels = client_labels
        self.by_name: dict[str, ClusterState] = {}
        self._source: EndpointSource = lambda cluster: []

    def get(self, cluster: Cluster) -> ClusterState:
        """The state of ``cluster``, created on first use (mirrors to clusters no rule
        forwards to, tables swapped in without :meth:`update`)."""
        state = self.by_name.get(cluster.name)
        if state is None:
            state = self.by_name[cluster.name] = ClusterState(
                cluster, self._source(cluster), self.transport,
                client_locality=self.client_locality, client_labels=self.client_labels)
        return state

    async def update(self, table: RouteTable, source: EndpointSource) -> None:
        """Follow a new route table and endpoint set; close idle connections of the gone."""
        self._source = source
        gone = set(self.by_name) - set(table.clusters)
        for name, cluster in table.clusters.items():
            state = self.by_name.get(name)
            if state is None:
                self.get(cluster)
                continue
            if cluster != state.cluster:
                state.reconfigure(cluster)
            before = state.endpoints
            state.set_endpoints(source(cluster))
            # Idle connections survive only to endpoints reached the same way as before:
            # a changed identity or TLS origination needs a new connection.
            keep = {address for address, spec in state.endpoints.items()
                    if (old := before.get(address)) is not None and old.info == spec.info}
            await state.pool.close_idle(keep=keep)
        for name in gone:
            state = self.by_name.pop(name)
            await state.pool.close_idle()

    def set_client(self, locality: Locality, labels: Mapping[str, str]) -> None:
        """Where the waypoint itself runs: locality-aware picks prefer hosts near it."""
        if locality == self.client_locality and labels == self.client_labels:
            return
        self.client_locality = locality
        self.client_labels = labels
        for state in self.by_name.values():
            state.set_client(locality, labels)

    async def run_sweeps(self, period: float = 1.0) -> None:
        """Outlier-detection intervals for every cluster, until cancelled."""
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for state in list(self.by_name.values()):
                state.sweep(now)


def _locality(snapshot_locality: object) -> Locality:
    region = getattr(snapshot_locality, "region", "")
    zone = getattr(snapshot_locality, "zone", "")
    subzone = getattr(snapshot_locality, "subzone", "")
    return Locality(region, zone, subzone)


def own_workload(snapshot: Snapshot, pod_ip: str | None
                 ) -> tuple[Locality, Mapping[str, str]] | None:
    """Locality and labels of the waypoint's own pod (found by its IP), None while the
    snapshot does not know it.  Istio's waypoint, an Envoy, is likewise placed by its node."""
    workload = snapshot.workloads_by_ip.get(pod_ip) if pod_ip else None
    if workload is None:
        return None
    return _locality(workload.locality), workload.labels


def snapshot_endpoints(snapshot: Snapshot, cluster: Cluster) -> list[EndpointSpec]:
    """The ready endpoints of ``cluster`` in ``snapshot`` (subset labels applied)."""
    service = snapshot.services_by_key.get((cluster.service_namespace, cluster.service_name))
    if service is None:
        entry = entry_index(snapshot).by_key.get((cluster.service_namespace,
                                                   cluster.service_name))
        return egress_endpoints(snapshot, entry, cluster) if entry is not None else []
    port = service.ports_by_number.get(cluster.port)
    subset = cluster.subset_labels
    out: list[EndpointSpec] = []
    for ep in service.ready_endpoints:
        workload = (snapshot.workloads_by_uid.get(ep.workload_uid)
                    if ep.workload_uid is not None else None)
        if workload is None:
            workload = snapshot.workloads_by_ip.get(ep.ip)
        labels = workload.labels if workload is not None else _NO_LABELS
        if subset and any(labels.get(k) != v for k, v in subset.items()):
            continue
        target = ep.target_ports.get(cluster.port)
        if target is None and port is not None:
            if isinstance(port.target_port, int):
                target = port.target_port
            elif workload is not None:
                target = workload.named_ports.get(port.target_port)
        if target is None:
            target = cluster.port
        info = EndpointInfo(ep.ip, target,
                            identity=workload.identity if workload is not None else None,
                            hbone=workload is not None and workload.captured)
        out.append(EndpointSpec(
            info, locality=_locality(ep.locality), labels=labels,
            workload=(labels.get("app") or (workload.name if workload else UNKNOWN)),
            version=labels.get("version", UNKNOWN)))
    return out


def egress_endpoints(snapshot: Snapshot, entry: ExternalService, cluster: Cluster
                     ) -> list[EndpointSpec]:
    """The endpoints of a ServiceEntry host's cluster (see :mod:`waypoint.egress`)."""
    port = entry.port(cluster.port)
    if port is None:
        return []
    origination = origination_for(cluster.tls_mode, snapshot.destination_rules, entry.host,
                                  cluster.port)
    subset = cluster.subset_labels
    out: list[EndpointSpec] = []
    if entry.endpoints and entry.resolution != "NONE":
        for ep in entry.endpoints:
            if subset and any(ep.labels.get(k) != v for k, v in subset.items()):
                continue
            info = ExternalEndpoint(ep.address, ep.port_for(port), resolve=not ep.is_ip,
                                    origination=origination)
            out.append(EndpointSpec(info, weight=ep.weight, locality=Locality.parse(ep.locality),
                                    labels=ep.labels, workload=entry.name,
                                    version=ep.labels.get("version", UNKNOWN)))
        return out
    if subset:
        return []  # only endpoints carry labels
    if entry.resolution in ("DNS", "DNS_ROUND_ROBIN"):
        targets = [(entry.host, True)]
    else:  # NONE: the entry's own addresses stand for the original destination
        targets = [(a, False) for a in entry.addresses if is_ip(a)]
    return [EndpointSpec(ExternalEndpoint(address, port.target, resolve=resolve,
                                          origination=origination), workload=entry.name)
            for address, resolve in targets]


def static_endpoints(table: Mapping[tuple[str, str, int], list[EndpointSpec]]
                     ) -> EndpointSource:
    """An endpoint source from a fixed list keyed by (namespace, service, port);
    subset labels narrow it like discovery does."""
    def source(cluster: Cluster) -> list[EndpointSpec]:
        specs = table.get((cluster.service_namespace, cluster.service_name, cluster.port), [])
        subset = cluster.subset_labels
        return [s for s in specs
                if not subset or all(s.labels.get(k) == v for k, v in subset.items())]
    return source
