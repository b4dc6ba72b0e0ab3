"""kube-proxy for the local cluster: service VIPs as nftables DNAT in every node namespace.

Theory of operation: :func:`render` turns Services and EndpointSlices into one nftables
table (``ip pyambient_proxy``).  A verdict map keyed by (VIP, protocol, port) jumps to a
chain per service port; that chain picks an endpoint with ``numgen random`` and jumps to
an endpoint chain that DNATs to it.  Pods send through their node, so the node's
prerouting hook sees their traffic; the output hook covers processes of the node itself.
A pod reaching itself through its VIP (hairpin) would answer itself from its own
address, so such packets are marked and SNATed to the node's pod gateway address.
Only ready endpoints receive traffic; a VIP without any gets no rule, so the packet is
refused by the fabric (no route), which the client sees at once.

The table is replaced in one ``nft -f`` transaction (add, delete, define), so a packet
never sees a half-written ruleset.  Nothing outside the node namespaces is touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import trio

from common.kube import EndpointSlice, Service
from common.logging import get_logger
from deploy.local import netns
from deploy.local.endpoints import SERVICE_NAME_LABEL
from deploy.local.informer import Cache

log = get_logger("local.kubeproxy")

TABLE = "pyambient_proxy"
HAIRPIN_MARK = 0x4000


def _chain(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:12]
    return f"{prefix}_{digest}"


def service_backends(svc: Service, slices: Iterable[EndpointSlice]
                     ) -> list[tuple[str, int, str, list[tuple[str, int]]]]:
    """(vip, port, protocol, [(endpoint ip, port)]) for every port of ``svc``."""
    vip = svc.spec.cluster_ip
    if not vip or vip == "None":
        return []
    out = []
    for sp in svc.spec.ports:
        proto = (sp.protocol or "TCP").lower()
        backends: list[tuple[str, int]] = []
        for sl in slices:
            port = next((p.port for p in sl.ports or [] if (p.name or "") == (sp.name or "")
                         and (p.protocol or "TCP").lower() == proto), None)
            if port is None:
                continue
            for ep in sl.endpoints:
                if ep.conditions.ready is False:
                    continue
                backends.extend((addr, port) for addr in ep.addresses)
        out.append((vip, sp.port, proto, sorted(set(backends))))
    return out


def render(services: Iterable[Service], slices: Iterable[EndpointSlice], snat_ip: str) -> str:
    """The nft script that replaces the table with rules for these services."""
    by_service: dict[tuple[str, str], list[EndpointSlice]] = {}
    for sl in slices:
        name = sl.metadata.labels.get(SERVICE_NAME_LABEL)
        if name:
            by_service.setdefault((sl.metadata.namespace or "", name), []).append(sl)
    elements: list[str] = []
    chains: list[str] = []
    for svc in sorted(services, key=lambda s: (s.metadata.namespace or "", s.metadata.name)):
        key = (svc.metadata.namespace or "", svc.metadata.name)
        for vip, port, proto, backends in service_backends(svc, by_service.get(key, [])):
            if not backends:
                continue
            svc_chain = _chain("svc", vip, proto, port)
            picks = []
            for i, (ip, target) in enumerate(backends):
                ep_chain = _chain("ep", vip, proto, port, ip, target)
                picks.append(f"{i} : jump {ep_chain}")
                chains.append(
                    f"  chain {ep_chain} {{\n"
                    f"    ip saddr {ip} meta mark set meta mark | {HAIRPIN_MARK:#x}\n"
                    f"    meta l4proto {proto} dnat to {ip}:{target}\n  }}\n")
            chains.append(f"  chain {svc_chain} {{\n"
                          f"    numgen random mod {len(backends)} vmap {{ {', '.join(picks)} }}\n"
                          f"  }}\n")
            elements.append(f"{vip} . {proto} . {port} : jump {svc_chain}")
    element_line = f"    elements = {{ {', '.join(elements)} }}\n" if elements else ""
    return (
        f"table ip {TABLE}\ndelete table ip {TABLE}\n"
        f"table ip {TABLE} {{\n"
        f"  map services {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n"
        f"{element_line}  }}\n"
        f"  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr . meta l4proto . th dport vmap @services\n  }}\n"
        f"  chain output {{\n    type nat hook output priority -100; policy accept;\n"
        f"    ip daddr . meta l4proto . th dport vmap @services\n  }}\n"
        f"  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    meta mark & {HAIRPIN_MARK:#x} == {HAIRPIN_MARK:#x} snat to {snat_ip}\n  }}\n"
        + "".join(chains) + "}\n")


class KubeProxy:
    """Keeps the table of every node namespace in line with Services and EndpointSlices."""

    def __init__(self, nodes: dict[str, tuple[str, str]], services: Cache[Service],
                 slices: Cache[EndpointSlice]) -> None:
        # node name -> (node netns, SNAT address for hairpin traffic)
        self.nodes = nodes
        self.services = services
        self.slices = slices
        self.applied: dict[str, str] = {}
        self.synced = trio.Event()  # set once every node has its first table

    async def reconcile(self) -> None:
        await self.services.synced.wait()
        await self.slices.synced.wait()
        services, slices = self.services.values(), self.slices.values()
        for node, (ns, snat_ip) in self.nodes.items():
            script = render(services, slices, snat_ip)
            if self.applied.get(node) == script:
                continue
            await netns.arun(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=script)
            self.applied[node] = script
            log.debug("rules_applied", node=node, bytes=len(script))
        self.synced.set()
