"""Which names ztunnel answers from its own state, sans I/O.

Theory of operation.  A pod's ``resolv.conf`` has ``search <ns>.svc.<domain> svc.<domain>
<domain>`` and ``ndots:5``, so the stub resolver tries ``<name>.<ns>.svc.<domain>`` first,
then the other suffixes, then the name as given.  Each try reaches us, and only one of them
can exist; the others must fail *fast* (NXDOMAIN from here, not a round trip to the cluster
DNS).  :func:`lookup` classifies one name for a client in namespace ``ns``:

* ``<svc>.<ns2>.svc.<domain>``: the Service if the snapshot has it (its VIPs; a headless
  Service's ready endpoint addresses).  Unknown, in a namespace that does not exist:
  NXDOMAIN.  Unknown in an existing namespace, or known without any address (an
  ExternalName Service, or one still without ready endpoints): forwarded, since the cluster
  DNS may know better (a Service a moment newer than our snapshot, a CNAME).
* ``<host>.<svc>.<ns2>.svc.<domain>``: a headless Service's pod hostname, only the cluster
  DNS knows those: forwarded when ``<svc>`` is a known Service without a VIP, else NXDOMAIN
  (it is what the stub makes of ``a.b`` in the first search domain).
* ``_port._proto.<svc>.<ns2>.svc.<domain>`` (SRV names): forwarded.
* ``<...>.pod.<domain>``: forwarded (CoreDNS' pod records).
* any other name under ``<domain>``: NXDOMAIN, which covers the search-path junk such as
  ``<svc>.<ns>.svc.<domain>.svc.<domain>`` and ``google.com.svc.<domain>``.
* outside ``<domain>``: a Service by its short forms (``<svc>`` relative to the client's
  namespace, ``<svc>.<ns2>``, ``<svc>.<ns2>.svc``), then a ServiceEntry host (exact, or a
  ``*.suffix`` wildcard) with addresses; anything else is forwarded.

A hit returns every address of the name; the caller picks A or AAAA from them (an empty
pick is NOERROR/NODATA).  Every step is a few dict hits, independent of the mesh's size.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.model import Service, Snapshot

__all__ = ["FORWARD", "NXDOMAIN", "Forward", "Hit", "NxDomain", "ServiceEntryHosts", "lookup"]


@dataclass(frozen=True, slots=True)
class Hit:
    """The name exists here; ``addresses`` may hold both families (or none: NODATA)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NxDomain:
    """The name cannot exist: answer NXDOMAIN without asking anyone."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours to answer: ask the upstream DNS."""


NXDOMAIN = NxDomain()
FORWARD = Forward()
Classification = Hit | NxDomain | Forward


@dataclass(frozen=True, slots=True)
class ServiceEntryHosts:
    """ServiceEntry ``hosts`` with explicit ``addresses``, indexed once per snapshot.

    ``exact`` maps a host to its addresses, ``wildcard`` maps the suffix of ``*.suffix`` to
    them.  Address ranges (a CIDR wider than one host) cannot be answered and are skipped;
    a host without usable addresses is left out, so its queries are forwarded.
    """

    exact: Mapping[str, tuple[str, ...]]
    wildcard: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_specs(cls, specs: Iterable[Mapping[str, Any]]) -> ServiceEntryHosts:
        exact: dict[str, tuple[str, ...]] = {}
        wildcard: dict[str, tuple[str, ...]] = {}
        for spec in specs:
            addresses = _single_addresses(spec.get("addresses") or ())
            if not addresses:
                continue
            for host in spec.get("hosts") or ():
                if not isinstance(host, str):
                    continue
                host = host.lower().rstrip(".")
                if host.startswith("*."):
                    target, key = wildcard, host[2:]
                else:
                    target, key = exact, host
                target[key] = tuple(dict.fromkeys((*target.get(key, ()), *addresses)))
        return cls(exact, wildcard)

    @classmethod
    def of(cls, snapshot: Snapshot) -> ServiceEntryHosts:
        return cls.from_specs(obj.spec for obj in snapshot.service_entries)

    def get(self, host: str) -> tuple[str, ...] | None:
        found = self.exact.get(host)
        if found is not None:
            return found
        if self.wildcard:
            rest = host
            while "." in rest:  # bounded by the name's labels (at most 127)
                rest = rest.partition(".")[2]
                found = self.wildcard.get(rest)
                if found is not None:
                    return found
        return None


EMPTY_SERVICE_ENTRIES = ServiceEntryHosts({}, {})


def _single_addresses(values: Iterable[Any]) -> tuple[str, ...]:
    out = []
    for value in values:
        try:
            net = ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            continue
        if net.num_addresses == 1:
            out.append(str(net.network_address))
    return tuple(out)


def service_addresses(service: Service) -> tuple[str, ...]:
    """What a Service's name resolves to: its VIPs, or (headless) its ready endpoints."""
    if service.vips:
        return service.vips
    return tuple(dict.fromkeys(ep.ip for ep in service.ready_endpoints))


def lookup(snapshot: Snapshot, name: str, client_namespace: str,
           service_entries: ServiceEntryHosts = EMPTY_SERVICE_ENTRIES) -> Classification:
    """Classify ``name`` (lower case, no trailing dot) for a client in ``client_namespace``."""
    domain = snapshot.domain
    if name == domain or name.endswith("." + domain):
        return _in_cluster_zone(snapshot, name[:-len(domain)].rstrip("."))
    service = snapshot.service_for_name(name, client_namespace)
    if service is not None:
        return _service_answer(service)
    addresses = service_entries.get(name)
    if addresses is not None:
        return Hit(addresses)
    return FORWARD


def _service_answer(service: Service) -> Classification:
    addresses = service_addresses(service)
    return Hit(addresses) if addresses else FORWARD


def _in_cluster_zone(snapshot: Snapshot, relative: str) -> Classification:
    labels = relative.split(".") if relative else []
    if not labels:
        return FORWARD  # the zone apex itself (SOA/NS questions): the cluster DNS's
    if labels[-1] == "pod":
        return FORWARD
    if labels[-1] != "svc":
        return NXDOMAIN
    parts = labels[:-1]
    if len(parts) == 2:
        svc, ns = parts
        service = snapshot.services_by_key.get((ns, svc))
        if service is not None:
            return _service_answer(service)
        # A snapshot without namespaces (none listed yet) cannot rule a name out.
        known_namespace = ns in snapshot.namespaces or not snapshot.namespaces
        return FORWARD if known_namespace else NXDOMAIN
    if len(parts) == 3:
        service = snapshot.services_by_key.get((parts[2], parts[1]))
        if service is not None and not service.vips:
            return FORWARD
        return NXDOMAIN
    if len(parts) == 4 and parts[0].startswith("_") and parts[1].startswith("_"):
        return FORWARD
    return NXDOMAIN
