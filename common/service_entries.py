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
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable

import trio

from common.errors import NameResolutionError
from common.kube.objects import KubeObject

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
