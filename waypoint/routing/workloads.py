"""Workload-addressed traffic through a waypoint (``istio.io/waypoint-for: workload|all``).

Theory of operation.  A client that dials a pod IP directly, where the pod (or its
namespace) names a waypoint with ``istio.io/use-waypoint`` and that waypoint accepts
workload traffic, is sent by its ztunnel to the waypoint with the pod's ``ip:port``
as the HBONE ``:authority``.  Istio's waypoint dispatches on that destination
address: a VIP of a service it serves goes to the service's routes; a pod IP of a
workload that uses it goes to the *direct* chain, which:

* applies the L7 authorization policies that target the waypoint itself (the
  Gateway); policies targeting a Service do not apply, there is no service;
* does not consult the route table, so no Host header, HTTPRoute or VirtualService
  can send the request elsewhere;
* forwards on one default route to the ``encap`` cluster, which tunnels to the
  original destination (HBONE to the pod at ``podIP:15008``, ``:authority``
  ``podIP:port``), with the inbound route defaults: no timeout, no retries;
* reports telemetry with the destination workload and no destination service.

A pod IP known to the mesh whose pod does not use this waypoint (for workload
traffic) matches no chain in Istio's waypoint; here it is answered 404 ``NR``,
again without a Host-header lookup.

This module is the sans-I/O half: :func:`workload_index` builds, per snapshot, the
dict that the request path hits once (:class:`WorkloadIndex`), and
:class:`PodTarget` describes one pod (for a served one: its cluster and route
decision for a port).  :mod:`waypoint.direct` keeps the live connection pools.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from common.identity import SpiffeId
from common.metrics import UNKNOWN, workload_name
from common.model import Snapshot, WaypointRef
from waypoint.resilience.config import NO_RETRY, RouteResilience
from waypoint.routing.match import Outcome, RouteDecision
from waypoint.routing.model import Cluster

__all__ = ["DIRECT_RESILIENCE", "EMPTY_WORKLOADS", "ENCAP_CLUSTER", "PodTarget",
           "WorkloadIndex", "workload_index"]

#: Istio's name for the waypoint cluster that tunnels to the original destination.
ENCAP_CLUSTER = "encap"

#: The inbound default route (Istio's ``BuildDefaultHTTPInboundRoute``): no timeout and
#: no retry policy, unlike the outbound default of two retries.
DIRECT_RESILIENCE = RouteResilience(retries=NO_RETRY)

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PodTarget:
    """A pod IP as the waypoint sees it.

    ``served``: the pod uses this waypoint for workload traffic, so requests to it are
    forwarded; otherwise they are answered 404.  ``hbone``: the pod is captured, so
    the waypoint tunnels to its node's ztunnel (else plain TCP to it).
    """

    ip: str
    namespace: str
    name: str
    served: bool
    workload: str = UNKNOWN
    version: str = UNKNOWN
    identity: SpiffeId | None = None
    hbone: bool = False
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)

    def cluster(self, port: int) -> Cluster:
        """The ``encap`` cluster narrowed to this pod and port (its own breaker and pool)."""
        return Cluster(name=ENCAP_CLUSTER, host=self.ip, port=port,
                       service_namespace=self.namespace, service_name="")

    def decision(self, cluster: Cluster) -> RouteDecision:
        """Forward, unchanged, on the default route (no rule, no header operations)."""
        return RouteDecision(outcome=Outcome.FORWARD, cluster=cluster,
                             resilience=DIRECT_RESILIENCE)


@dataclass(frozen=True, slots=True)
class WorkloadIndex:
    """Pod IP -> :class:`PodTarget`, for every pod IP of the mesh (one dict hit per request).

    Empty (and false) when the snapshot knows no pods, so the request path skips it.
    """

    by_ip: Mapping[str, PodTarget] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_ip)

    @property
    def served(self) -> list[str]:
        """The pod IPs this waypoint forwards workload traffic to, sorted."""
        return sorted(ip for ip, t in self.by_ip.items() if t.served)


EMPTY_WORKLOADS = WorkloadIndex(MappingProxyType({}))


def workload_index(snapshot: Snapshot, waypoint: WaypointRef) -> WorkloadIndex:
    """The pods of ``snapshot`` as ``waypoint`` sees them.

    A pod is served when its ``waypoint`` is this one: discovery sets that only when
    the waypoint exists and its ``istio.io/waypoint-for`` is ``workload`` or ``all``.
    Waypoint pods themselves are left out (traffic to them is never pod-addressed
    through a waypoint).
    """
    by_ip: dict[str, PodTarget] = {}
    for w in snapshot.workloads_by_uid.values():
        if w.is_waypoint or not w.ips:
            continue
        served = w.waypoint == waypoint
        for ip in w.ips:
            if served:
                by_ip[ip] = PodTarget(ip, w.namespace, w.name, True,
                                      workload_name(w.name, w.labels),
                                      w.labels.get("version", UNKNOWN), w.identity,
                                      w.captured, w.labels)
            else:
                by_ip.setdefault(ip, PodTarget(ip, w.namespace, w.name, False))
    return WorkloadIndex(by_ip)
