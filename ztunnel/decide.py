"""ztunnel's per-connection decisions, sans I/O: where an outbound connection goes, whether
an inbound one is let in.

Outbound (DESIGN.md section 2), for a connection from ``source`` to ``dst_ip:dst_port``:

1. ``dst_ip`` is a Service VIP.  The service uses a waypoint and the source is not that
   waypoint: HBONE to a waypoint pod, ``:authority`` the VIP and port
   (:class:`ViaWaypoint`).  Otherwise pick a ready endpoint, uniformly (``rng``), or, when
   the Service prefers close endpoints (``trafficDistribution: PreferClose``: Istio's
   FAILOVER load balancing), one in the source's zone, else its region, else any; map
   the service port to the endpoint's target port and continue with step 2 for that
   endpoint.  No ready endpoint: :class:`Refused`.
2. ``dst_ip`` is a pod (directly or picked in step 1).  The connection was addressed to
   the pod itself (not picked in step 1), the pod uses a workload waypoint
   (``istio.io/waypoint-for`` ``workload`` or ``all``; discovery leaves
   ``Workload.waypoint`` unset otherwise) and the source is not that waypoint: HBONE to
   the waypoint, ``:authority`` the pod IP and port.  Service-addressed traffic never
   takes a pod's waypoint: Istio's ztunnel uses only the service's (step 1), so a
   ``waypoint-for: workload`` waypoint sees pod-addressed traffic only.  The pod is
   captured (in the mesh): HBONE to it at ``podIP:15008`` (:class:`ToWorkload`).
   Otherwise plain TCP to it (:class:`Passthrough`).
3. A ServiceEntry address (explicit or auto-allocated) on one of the entry's ports.
   The entry uses a waypoint (``istio.io/use-waypoint`` on it or its namespace), the port
   is one the waypoint can serve (HTTP, HTTP2, gRPC, unset) and the source is not that
   waypoint: HBONE to the waypoint, ``:authority`` the address and port, as for a
   Service (the waypoint routes and dials the external endpoint).  Otherwise, with
   ``endpoints`` (``resolution: STATIC``, or DNS names): :class:`Passthrough` to one of
   them (``rng`` decides, by ``weight``) on its port for the entry's port name, else the
   port's ``targetPort``.  An auto-allocated address of a ``resolution: DNS`` entry
   without endpoints: :class:`Passthrough` that resolves the entry's host at connect
   time (``resolve``).  Anything else: the address dialled.
4. Anything else is outside the mesh: :class:`Passthrough` to the original address,
   unless the source's outbound traffic policy is ``REGISTRY_ONLY`` (namespace label
   ``pyambient.io/outbound-traffic-policy``) and the address is no ServiceEntry's:
   :class:`Refused` with a reason naming the fix.

A connection never goes through the same waypoint twice: a waypoint's own outbound
traffic skips the hop to itself.

Inbound, for a connection arriving for ``local`` (one of this node's pods): the
authority must be the pod's own IP (400 otherwise), plaintext is refused when
PeerAuthentication says STRICT (401), and L4 AuthorizationPolicy decides (401 on deny).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TypeVar

from common.authz.evaluate import check_connection
from common.authz.model import Decision, RequestContext
from common.identity import SpiffeId
from common.model import (
    EMPTY_LOCALITY,
    HBONE_PORT,
    Endpoint,
    Locality,
    Service,
    Snapshot,
    Waypoint,
    WaypointEndpoint,
    WaypointRef,
    Workload,
)
from common.service_entries import (
    EntryEndpoint,
    ExternalService,
    dns_hosts_by_address,
    entry_index,
    registered_addresses,
)

__all__ = [
    "Allow", "Deny", "Inbound", "Outbound", "Passthrough", "Refused", "ToWorkload",
    "ViaWaypoint", "decide_inbound", "decide_outbound", "format_authority",
]


@dataclass(frozen=True, slots=True)
class ViaWaypoint:
    """HBONE to ``hbone_addr`` (a waypoint pod's 15008), CONNECT to ``authority``.

    ``workload`` is set when the waypoint was chosen for the destination pod (a
    workload waypoint) rather than for the service.
    """

    hbone_addr: tuple[str, int]
    authority: str
    expected: frozenset[SpiffeId]
    waypoint: Waypoint
    service: Service | None = None
    workload: Workload | None = None


@dataclass(frozen=True, slots=True)
class ToWorkload:
    """HBONE to the destination pod's node ztunnel (``podIP:15008``), CONNECT to ``authority``."""

    hbone_addr: tuple[str, int]
    authority: str
    expected: frozenset[SpiffeId]
    workload: Workload
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to ``addr``: the destination is not in the mesh."""

    addr: tuple[str, int]
    reason: str
    service: Service | None = None
    workload: Workload | None = None
    #: A ServiceEntry host (``resolution: DNS``) to resolve and dial instead of ``addr``,
    #: its auto-allocated VIP.
    resolve: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """No way to serve the connection: reset it, log ``reason``."""

    reason: str
    service: Service | None = None


Outbound = ViaWaypoint | ToWorkload | Passthrough | Refused


@dataclass(frozen=True, slots=True)
class Allow:
    """Connect to ``workload`` on ``port``; ``decision`` carries dry-run and audit results."""

    workload: Workload
    port: int
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer ``status`` (400 bad target, 401 policy); ``policy`` names the deciding one."""

    status: int
    reason: str
    policy: str | None = None
    decision: Decision | None = None


Inbound = Allow | Deny


def format_authority(ip: str, port: int) -> str:
    """``ip:port``, with IPv6 in brackets (HBONE's ``:authority``)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- outbound ------------------------------------------------------------------------------


def decide_outbound(snapshot: Snapshot, source: Workload, dst_ip: str, dst_port: int,
                    rng: random.Random) -> Outbound:
    """Where a connection captured from ``source`` to ``dst_ip:dst_port`` goes."""
    service = snapshot.services_by_vip.get(dst_ip)
    if service is not None:
        return _to_service(snapshot, source, service, dst_ip, dst_port, rng)
    workload = snapshot.workloads_by_ip.get(dst_ip)
    if workload is not None:
        return _to_workload(snapshot, source, workload, dst_ip, dst_port, None, rng)
    entry = entry_index(snapshot).by_address.get(dst_ip)
    if entry is not None:
        decision = _to_entry(snapshot, source, entry, dst_ip, dst_port, rng)
        if decision is not None:
            return decision
    host = dns_entry_hosts(snapshot).get(dst_ip)
    if host is not None:
        return Passthrough((dst_ip, dst_port), f"ServiceEntry host {host} (resolution DNS)",
                           resolve=host)
    if registry_only(snapshot, source) and dst_ip not in _registered(snapshot):
        return Refused(registry_only_reason(source, dst_ip, dst_port))
    return Passthrough((dst_ip, dst_port), f"{dst_ip} is not a known service or pod: "
                       f"outside the mesh")


# --- outbound traffic policy ---------------------------------------------------------------

#: Label of a Namespace (the source's, else the mesh root namespace ``istio-system``)
#: selecting Istio's ``outboundTrafficPolicy.mode``: ``ALLOW_ANY`` (default) or
#: ``REGISTRY_ONLY`` (only services, pods and ServiceEntry addresses are reachable).
OUTBOUND_POLICY_LABEL = "pyambient.io/outbound-traffic-policy"
REGISTRY_ONLY = "REGISTRY_ONLY"
MESH_ROOT_NAMESPACE = "istio-system"
_registered_cache: tuple[object, frozenset[str]] = ((), frozenset())


def registry_only(snapshot: Snapshot, source: Workload) -> bool:
    labels = snapshot.namespaces.get(source.namespace) or {}
    mode = labels.get(OUTBOUND_POLICY_LABEL)
    if mode is None:
        mode = (snapshot.namespaces.get(MESH_ROOT_NAMESPACE) or {}).get(OUTBOUND_POLICY_LABEL)
    return mode == REGISTRY_ONLY


def registry_only_reason(source: Workload, dst_ip: str, dst_port: int) -> str:
    return (f"REGISTRY_ONLY: {format_authority(dst_ip, dst_port)} is not a service, pod or "
            f"ServiceEntry address known to the mesh, and the outbound traffic policy of "
            f"namespace {source.namespace} allows only registered destinations: add a "
            f"ServiceEntry for it, or set {OUTBOUND_POLICY_LABEL}=ALLOW_ANY")


_dns_cache: tuple[object, Mapping[str, str]] = ((), {})


def dns_entry_hosts(snapshot: Snapshot) -> Mapping[str, str]:
    """Auto-allocated ServiceEntry VIP -> its host (``resolution: DNS``), cached per tuple."""
    global _dns_cache
    source, found = _dns_cache
    if source is not snapshot.service_entries:
        found = dns_hosts_by_address(snapshot.service_entries)
        _dns_cache = (snapshot.service_entries, found)
    return found


def _registered(snapshot: Snapshot) -> frozenset[str]:
    """ServiceEntry addresses, recomputed only when the snapshot's entries changed."""
    global _registered_cache
    source, found = _registered_cache
    if source is not snapshot.service_entries:
        found = registered_addresses(snapshot.service_entries)
        _registered_cache = (snapshot.service_entries, found)
    return found


def _to_entry(snapshot: Snapshot, source: Workload, entry: ExternalService, dst_ip: str,
              dst_port: int, rng: random.Random) -> Outbound | None:
    """A connection to a ServiceEntry address; None: not one of the entry's ports (the
    generic rules decide)."""
    port = entry.port(dst_port)
    if port is None:
        return None
    ref = entry.waypoint
    if ref is not None and port.waypoint_capable and (source.gateway is None
                                                      or source.gateway != ref):
        return _via_waypoint(snapshot, source, ref, format_authority(dst_ip, dst_port), rng,
                             None, None)
    what = f"ServiceEntry {entry.namespace}/{entry.name} host {entry.host}"
    if entry.endpoints and entry.resolution in ("STATIC", "DNS", "DNS_ROUND_ROBIN"):
        endpoint = _pick_weighted(entry.endpoints, rng)
        target = endpoint.port_for(port)
        if endpoint.is_ip:
            return Passthrough((endpoint.address, target),
                               f"{what} (resolution {entry.resolution}): endpoint "
                               f"{format_authority(endpoint.address, target)}")
        return Passthrough((dst_ip, target), f"{what}: endpoint {endpoint.address} "
                           "(resolved at connect time)", resolve=endpoint.address)
    if entry.resolution == "DNS" and entry.auto_allocated:
        return Passthrough((dst_ip, port.target), f"{what} (resolution DNS)",
                           resolve=entry.host)
    return None


def _pick_weighted(endpoints: tuple[EntryEndpoint, ...], rng: random.Random) -> EntryEndpoint:
    if len(endpoints) == 1:
        return endpoints[0]
    total = sum(e.weight for e in endpoints)
    point = rng.randrange(total)
    for endpoint in endpoints:
        point -= endpoint.weight
        if point < 0:
            return endpoint
    return endpoints[-1]


def _to_service(snapshot: Snapshot, source: Workload, service: Service, vip: str, port: int,
                rng: random.Random) -> Outbound:
    svc_port = service.ports_by_number.get(port)
    if svc_port is None:
        known = ", ".join(str(p.port) for p in service.ports) or "none"
        return Refused(f"service {service.namespace}/{service.name} has no port {port} "
                       f"(its ports: {known})", service)
    ref = service.waypoint
    if ref is not None and (source.gateway is None or source.gateway != ref):
        return _via_waypoint(snapshot, source, ref, format_authority(vip, port), rng, service,
                             None)
    endpoint = _pick(service.ready_endpoints, service.ready_by_zone, service.ready_by_region,
                     source.locality if service.prefer_close else EMPTY_LOCALITY, rng)
    if endpoint is None:
        state = (f"{len(service.endpoints)} endpoints, none ready" if service.endpoints
                 else "no endpoints")
        return Refused(f"service {service.namespace}/{service.name} has no ready endpoints "
                       f"({state}): check that its pods are running and pass readiness",
                       service)
    workload = _endpoint_workload(snapshot, endpoint)
    target = endpoint.target_ports.get(port)
    if target is None:
        target = _resolve_target(svc_port.target_port, workload)
        if target is None:
            return Refused(f"service {service.namespace}/{service.name} port {port} targets "
                           f"port {svc_port.target_port!r}, which pod at {endpoint.ip} does "
                           f"not declare", service)
    if workload is None:
        return Passthrough((endpoint.ip, target), f"endpoint {endpoint.ip} of service "
                           f"{service.namespace}/{service.name} is not a known pod", service)
    return _to_workload(snapshot, source, workload, endpoint.ip, target, service, rng)


def _to_workload(snapshot: Snapshot, source: Workload, workload: Workload, ip: str, port: int,
                 service: Service | None, rng: random.Random) -> Outbound:
    ref = workload.waypoint
    if ref is not None and service is None and source.gateway != ref:
        return _via_waypoint(snapshot, source, ref, format_authority(ip, port), rng, None,
                             workload)
    if workload.captured:
        return ToWorkload((ip, HBONE_PORT), format_authority(ip, port),
                          frozenset((workload.identity,)), workload, service)
    return Passthrough((ip, port), f"pod {workload.namespace}/{workload.name} is not in the "
                       f"mesh", service, workload)


def _via_waypoint(snapshot: Snapshot, source: Workload, ref: WaypointRef, authority: str,
                  rng: random.Random, service: Service | None, workload: Workload | None
                  ) -> Outbound:
    waypoint = snapshot.waypoints_by_ref.get(ref)
    if waypoint is None:  # translation only sets refs to existing waypoints; be safe anyway
        return Refused(f"waypoint {ref.namespace}/{ref.name} is not known", service)
    endpoint = _pick(waypoint.endpoints, waypoint.ready_by_zone, waypoint.ready_by_region,
                     source.locality, rng)
    if endpoint is None:
        return Refused(f"waypoint {ref.namespace}/{ref.name} has no ready pods: check its "
                       f"Deployment (ambientctl waypoint status)", service)
    return ViaWaypoint((endpoint.ip, HBONE_PORT), authority, frozenset((waypoint.identity,)),
                       waypoint, service, workload)


E = TypeVar("E", Endpoint, WaypointEndpoint)


def _pick(ready: tuple[E, ...], by_zone: Mapping[tuple[str, str], tuple[E, ...]],
        by_region: Mapping[str, tuple[E, ...]], locality: Locality,
        rng: random.Random) -> E | None:
    """A ready endpoint: same zone, else same region, else any; uniform among equals."""
    if not ready:
        return None
    candidates = ready
    if locality.region:
        if locality.zone:
            candidates = by_zone.get((locality.region, locality.zone)) or \
                by_region.get(locality.region) or ready
        else:
            candidates = by_region.get(locality.region) or ready
    if len(candidates) == 1:
        return candidates[0]
    return candidates[rng.randrange(len(candidates))]


def _endpoint_workload(snapshot: Snapshot, endpoint: Endpoint) -> Workload | None:
    if endpoint.workload_uid is not None:
        found = snapshot.workloads_by_uid.get(endpoint.workload_uid)
        if found is not None:
            return found
    return snapshot.workloads_by_ip.get(endpoint.ip)


def _resolve_target(target: int | str, workload: Workload | None) -> int | None:
    if isinstance(target, int):
        return target
    if workload is None:
        return None
    return workload.named_ports.get(target)


# --- inbound -------------------------------------------------------------------------------


def decide_inbound(snapshot: Snapshot, local: Workload, authority_ip: str, authority_port: int,
                   peer: SpiffeId | None, source_ip: str, plaintext: bool) -> Inbound:
    """Whether a connection for ``authority_ip:authority_port`` may reach ``local``.

    ``peer`` is the client certificate's identity (None on the plaintext port),
    ``source_ip`` the original client's address.
    """
    if authority_ip not in local.ips:
        ips = ", ".join(local.ips) or "none"
        return Deny(400, f"authority {format_authority(authority_ip, authority_port)} is not "
                    f"an address of pod {local.namespace}/{local.name} (its IPs: {ips})")
    if plaintext and not snapshot.peer_authentication.mode_for(
            local.authz_ref, authority_port).accepts_plaintext:
        return Deny(401, f"plaintext connection to {local.namespace}/{local.name} port "
                    f"{authority_port} refused: PeerAuthentication mode is STRICT")
    try:
        ctx = RequestContext(source_identity=peer, source_ip=ip_address(source_ip),
                             destination_ip=ip_address(authority_ip),
                             destination_port=authority_port)
    except ValueError:
        return Deny(400, f"source address {source_ip!r} is not an IP address")
    decision = check_connection(snapshot.ztunnel_policies, local.authz_ref, ctx)
    if not decision.allowed:
        return Deny(401, decision.describe(), decision.policy, decision)
    return Allow(local, authority_port, decision)
