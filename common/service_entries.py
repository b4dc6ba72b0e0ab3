"""ServiceEntry addresses: auto-allocation, and the set of registered destinations.

Istio gives a ServiceEntry host without ``addresses`` a virtual IP from ``240.240.0.0/16``
(class E, never routed on the Internet), so a pod's DNS query gets an answer that
identifies the entry and the connection can be recognised at capture.  Here the
allocation is a pure function of the set of entries (sorted; the start slot hashed from
``namespace/name/host``, probing to the next free address on a collision), so every
ztunnel computes the same addresses without coordination, and an entry keeps its
address while the others change unless it collides.

:func:`allocate_addresses` returns the snapshot's copy: an entry with ``addresses``
stays as it is; one without (and ``resolution`` other than ``NONE``, non-wildcard
hosts) becomes one copy per host, each with its allocated address in
``spec.addresses`` (so the DNS proxy's zone answers it) and
``status.autoAllocated: true``.  :func:`registered_addresses` is what
``REGISTRY_ONLY`` accepts besides services and pods; :func:`dns_hosts_by_address` and
:func:`resolve_entry_host` let ztunnel dial what an auto-allocated VIP stands for.

:func:`entry_index` is the data plane's view of the entries (one :class:`ExternalService`
per host: ports, endpoints, and the waypoint it uses), indexed by address, host and
``(namespace, host)`` and computed once per snapshot.  An entry uses a waypoint the way a
Service does: ``istio.io/use-waypoint`` on the entry, else on its namespace (``none``
opts out), and only a waypoint that exists and takes service traffic.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import trio
from pydantic import ValidationError

from common.api.istio_networking import ServiceEntrySpec
from common.errors import NameResolutionError
from common.kube.objects import KubeObject
from common.model import Snapshot, WaypointRef

# The labels common.translate reads for Services and Pods (not imported: that module
# imports this one).
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
#: Port protocols a waypoint can serve (it parses HTTP); an entry port of another
#: protocol (TLS, HTTPS, TCP, ...) is passed through by ztunnel even when the entry uses a
#: waypoint, since the waypoint cannot yet pass such bytes on to an external endpoint.
WAYPOINT_PROTOCOLS = frozenset({"", "HTTP", "HTTP2", "GRPC", "GRPC-WEB"})

AUTO_RANGE = ipaddress.ip_network("240.240.0.0/16")
# .0 and .255-style edge addresses are skipped only by starting at 1; the range is big
# enough that a mesh never fills it.
_SIZE = AUTO_RANGE.num_addresses - 2


def _slot(key: str) -> int:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % _SIZE


def allocate_addresses(entries: tuple[KubeObject, ...]) -> tuple[KubeObject, ...]:
    if not entries:
        return entries
    taken: set[str] = set()
    for obj in entries:
        taken.update(str(a) for a in obj.spec.get("addresses") or ())
    out: list[KubeObject] = []
    wanting: list[tuple[str, KubeObject, str]] = []
    for obj in entries:
        spec = obj.spec
        hosts = [h for h in spec.get("hosts") or () if isinstance(h, str)]
        if (spec.get("addresses") or spec.get("resolution", "NONE") == "NONE"
                or not hosts or any(h.startswith("*") for h in hosts)):
            out.append(obj)
            continue
        for host in hosts:
            wanting.append((f"{obj.metadata.namespace}/{obj.metadata.name}/{host}", obj, host))
    for key, obj, host in sorted(wanting, key=lambda w: w[0]):
        slot = _slot(key)
        while True:
            address = str(AUTO_RANGE.network_address + 1 + slot)
            if address not in taken:
                break
            slot = (slot + 1) % _SIZE
        taken.add(address)
        out.append(obj.model_copy(update={
            "spec": {**obj.spec, "hosts": [host], "addresses": [address]},
            "status": {**obj.status, "autoAllocated": True}}))
    return tuple(out)


def registered_addresses(entries: Iterable[KubeObject]) -> frozenset[str]:
    """Every single address a ServiceEntry names (CIDRs wider than a host are left out)."""
    found: set[str] = set()
    for obj in entries:
        for text in obj.spec.get("addresses") or ():
            try:
                net = ipaddress.ip_network(str(text), strict=False)
            except ValueError:
                continue
            if net.num_addresses == 1:
                found.add(str(net.network_address))
    return frozenset(found)


def dns_hosts_by_address(entries: Iterable[KubeObject]) -> dict[str, str]:
    """Auto-allocated address -> host, for entries with ``resolution: DNS``: a connection
    to the address goes to what the host resolves to at connect time."""
    found: dict[str, str] = {}
    for obj in entries:
        if obj.status.get("autoAllocated") and obj.spec.get("resolution") == "DNS":
            for address in obj.spec.get("addresses") or ():
                found[str(address)] = str(obj.spec["hosts"][0])
    return found


async def resolve_entry_host(host: str, port: int) -> tuple[str, int]:
    """The first address ``host`` resolves to (this process's resolver), with ``port``."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NameResolutionError(f"ServiceEntry host {host} does not resolve from the node: "
                                  f"{exc} (check the node's DNS, or give the entry "
                                  "addresses / resolution STATIC)") from exc
    if not infos:
        raise NameResolutionError(f"ServiceEntry host {host} has no address")
    return str(infos[0][4][0]), port


# --- the data plane's view ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntryPort:
    """A port of an entry; connections go to ``target_port`` (``number`` when unset)."""

    number: int
    name: str
    protocol: str = ""
    target_port: int | None = None

    @property
    def target(self) -> int:
        return self.target_port or self.number

    @property
    def waypoint_capable(self) -> bool:
        return self.protocol.upper() in WAYPOINT_PROTOCOLS


@dataclass(frozen=True, slots=True)
class EntryEndpoint:
    """One of ``spec.endpoints``: an IP (STATIC) or a host name (DNS), ports by port name."""

    address: str
    ports: Mapping[str, int] = field(default_factory=dict)
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: str = ""

    def port_for(self, port: EntryPort) -> int:
        """Istio: the endpoint's ``ports[<port name>]``, else the port's target."""
        return self.ports.get(port.name) or port.target

    @property
    def is_ip(self) -> bool:
        return is_ip(self.address)


@dataclass(frozen=True, slots=True)
class ExternalService:
    """One host of a ServiceEntry, as ztunnel and the waypoint use it."""

    namespace: str
    name: str
    host: str
    addresses: tuple[str, ...]
    ports: tuple[EntryPort, ...]
    resolution: str
    endpoints: tuple[EntryEndpoint, ...]
    waypoint: WaypointRef | None
    auto_allocated: bool = False

    def port(self, number: int) -> EntryPort | None:
        """The declared port ``number``; an entry without ports accepts every port."""
        if not self.ports:
            return EntryPort(number, str(number))
        return next((p for p in self.ports if p.number == number), None)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.host)


@dataclass(frozen=True, slots=True)
class EntryIndex:
    """The entries of one snapshot, by address, by host and by ``(namespace, host)``."""

    by_address: Mapping[str, ExternalService] = field(default_factory=dict)
    by_host: Mapping[str, ExternalService] = field(default_factory=dict)
    by_key: Mapping[tuple[str, str], ExternalService] = field(default_factory=dict)

    def using(self, waypoint: WaypointRef) -> list[ExternalService]:
        return [e for e in self.by_key.values() if e.waypoint == waypoint]


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _waypoint_of(obj: KubeObject, snapshot: Snapshot) -> WaypointRef | None:
    namespace = obj.metadata.namespace or ""
    ns_labels = snapshot.namespaces.get(namespace) or {}
    for labels in (obj.metadata.labels or {}, ns_labels):
        name = labels.get(USE_WAYPOINT)
        if name is None:
            continue
        if not name or name == "none":
            return None
        ref = WaypointRef(labels.get(USE_WAYPOINT_NAMESPACE) or namespace, name)
        waypoint = snapshot.waypoints_by_ref.get(ref)
        if waypoint is None or not waypoint.traffic_type.serves_services:
            return None
        return ref
    return None


def external_services(obj: KubeObject, snapshot: Snapshot) -> list[ExternalService]:
    """One :class:`ExternalService` per (non-wildcard) host of a ServiceEntry; none for an
    entry that does not validate (the waypoint's route translator reports it)."""
    try:
        spec = ServiceEntrySpec.model_validate(dict(obj.spec))
    except ValidationError:
        return []
    ports = tuple(EntryPort(p.number, p.name, (p.protocol or "").upper(), p.target_port)
                  for p in spec.ports)
    endpoints = tuple(EntryEndpoint(e.address, dict(e.ports), e.weight or 1, dict(e.labels),
                                    e.locality or "")
                      for e in spec.endpoints if e.address)
    waypoint = _waypoint_of(obj, snapshot)
    return [ExternalService(obj.metadata.namespace or "", obj.metadata.name, host.lower(),
                            tuple(spec.addresses), ports, spec.resolution, endpoints, waypoint,
                            bool(obj.status.get("autoAllocated")))
            for host in spec.hosts if not host.startswith("*")]


def build_index(snapshot: Snapshot) -> EntryIndex:
    by_address: dict[str, ExternalService] = {}
    by_host: dict[str, ExternalService] = {}
    by_key: dict[tuple[str, str], ExternalService] = {}
    # Oldest first: where two entries claim one host or address, the oldest keeps it
    # (Istio's rule for conflicting objects).
    ordered = sorted(snapshot.service_entries, key=lambda o: (
        o.metadata.creation_timestamp or "", o.metadata.namespace or "", o.metadata.name))
    for obj in ordered:
        for entry in external_services(obj, snapshot):
            by_key.setdefault(entry.key, entry)
            by_host.setdefault(entry.host, entry)
            for address in entry.addresses:
                if is_ip(address):
                    by_address.setdefault(str(ipaddress.ip_address(address)), entry)
    return EntryIndex(by_address, by_host, by_key)


_index_cache: tuple[tuple[object, ...], EntryIndex] = ((), EntryIndex())


def entry_index(snapshot: Snapshot) -> EntryIndex:
    """:func:`build_index`, recomputed only when the entries, the namespaces (their
    ``use-waypoint`` labels) or the waypoints changed: a dict hit per connection."""
    global _index_cache
    sources = (snapshot.service_entries, snapshot.namespaces, snapshot.waypoints_by_ref)
    cached_sources, index = _index_cache
    if len(cached_sources) != len(sources) or any(
            a is not b for a, b in zip(cached_sources, sources, strict=True)):
        index = build_index(snapshot)
        _index_cache = (sources, index)
    return index
