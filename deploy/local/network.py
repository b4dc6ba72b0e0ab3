"""The local cluster's network: names, addresses, and the ``ip`` commands that build it.

Topology (everything inside the cluster's own namespaces; the host's is never touched)::

    fabric netns  pa-<c>-fabric   bridge br0 10.240.0.1/24  (API server and DNS listen here)
       │ veth n<i> ── eth0
    node netns    pa-<c>-node<i>  eth0 10.240.0.<10+i>/24, 10.244.<i>.1/32 on lo,
       │                          routes other nodes' pod CIDRs via their node IPs
       │ veth vp<o> ── eth0       (o = last octet of the pod IP)
    pod netns     pa-<c>-p-<uid>  eth0 10.244.<i>.<o>/32, default via 10.244.<i>.1

Pods are routed, not bridged, inside a node: every packet of a pod crosses its node's IP
stack, so kube-proxy's DNAT in the node namespace sees both directions (a bridge would
let same-node replies bypass conntrack).  Clusters never share a namespace, so every
cluster reuses the same addresses.

The address plan and the command lists are pure (unit-tested); :func:`create_fabric`,
:func:`create_node`, :func:`create_pod_network` run them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from deploy.local import netns
from deploy.local.errors import ClusterError
from ztunnel.inpod.rules import PROBE_SOURCE

FABRIC_CIDR = ipaddress.ip_network("10.240.0.0/24")
FABRIC_GATEWAY = ipaddress.ip_address("10.240.0.1")
NODE_IP_OFFSET = 10
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
KUBERNETES_VIP = "10.96.0.1"
KUBERNETES_PORT = 443  # the `kubernetes` Service port; the server behind it speaks HTTP
DNS_VIP = "10.96.0.10"
# Where the API server and DNS server listen inside the fabric namespace.
APISERVER_FABRIC_PORT = 6443
DNS_FABRIC_PORT = 53
MAX_NODES = 200  # node IPs 10.240.0.10-209, pod CIDRs 10.244.0-199.0/24
CLUSTER_DOMAIN = "cluster.local"
_OWNED = re.compile(r"^(fabric|node\d+|p-[0-9a-f]{1,16})$")
_CLUSTER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")


def check_cluster_name(name: str) -> str:
    """Cluster names become namespace-name prefixes: short DNS labels only."""
    if not _CLUSTER_NAME.match(name):
        raise ClusterError(f"cluster name {name!r} must be 1-20 characters of a-z, 0-9 and '-', "
                           "starting and ending with a letter or digit")
    return name


def node_name(index: int) -> str:
    return f"node-{index}"


def node_ip(index: int) -> str:
    return str(FABRIC_CIDR.network_address + NODE_IP_OFFSET + index)


def pod_cidr(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.244.{index}.0/24")


def pod_gateway(index: int) -> str:
    return str(pod_cidr(index).network_address + 1)


@dataclass(frozen=True)
class Names:
    """Every namespace name of one cluster: all start with ``pa-<cluster>-``."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"pa-{self.cluster}-"

    @property
    def fabric(self) -> str:
        return f"{self.prefix}fabric"

    def node(self, index: int) -> str:
        return f"{self.prefix}node{index}"

    def pod(self, uid: str) -> str:
        return f"{self.prefix}p-{uid.replace('-', '')[:16]}"

    def owns(self, netns_name: str) -> bool:
        """True for this cluster's names only (``pa-a-...`` must not claim ``pa-a-2-...``)."""
        rest = netns_name.removeprefix(self.prefix)
        return rest != netns_name and bool(_OWNED.match(rest))


@dataclass
class PodIPAM:
    """Pod addresses of one node: .2 to .254 of its pod CIDR, handed out in turn.

    A released address is the last to come back (like host-local IPAM's round robin):
    something of the old pod may still hold on to it for a while (a namespace kept
    alive by an orphaned socket, a proxy's connection state, a cache entry).
    """

    index: int
    used: set[int] = field(default_factory=set)
    last: int = 1

    def allocate(self) -> str:
        for step in range(1, 254):
            octet = (self.last - 2 + step) % 253 + 2
            if octet not in self.used:
                self.used.add(octet)
                self.last = octet
                return str(pod_cidr(self.index).network_address + octet)
        raise ClusterError(f"node {node_name(self.index)} has no free pod address "
                           f"in {pod_cidr(self.index)}: delete pods or add nodes")

    def release(self, ip: str) -> None:
        self.used.discard(int(ip.rsplit(".", 1)[1]))


def fabric_commands(nodes: int) -> list[str]:
    """``ip -batch`` lines run in the fabric namespace (bridge, node veths, pod routes)."""
    lines = ["link add br0 type bridge", f"addr add {FABRIC_GATEWAY}/24 dev br0",
             "link set br0 up"]
    for i in range(nodes):
        lines.append(f"route add {pod_cidr(i)} via {node_ip(i)}")
    return lines


def node_commands(index: int, nodes: int) -> list[str]:
    """``ip -batch`` lines run in node ``index``'s namespace once its eth0 is there."""
    lines = [f"addr add {node_ip(index)}/24 dev eth0", "link set eth0 up",
             f"addr add {pod_gateway(index)}/32 dev lo",
             f"addr add {PROBE_SOURCE}/32 dev lo",
             f"route add default via {FABRIC_GATEWAY}"]
    for j in range(nodes):
        if j != index:
            lines.append(f"route add {pod_cidr(j)} via {node_ip(j)}")
    return lines


def veth_name(pod_ip: str) -> str:
    return f"vp{pod_ip.rsplit('.', 1)[1]}"


def pod_node_side_commands(pod_ip: str, pod_netns: str) -> list[str]:
    """Run in the node's namespace: the veth pair, its pod end moved into ``pod_netns``."""
    veth = veth_name(pod_ip)
    return [f"link add {veth} type veth peer name eth0 netns {pod_netns}",
            f"link set {veth} up", f"route add {pod_ip}/32 dev {veth}"]


def pod_side_commands(pod_ip: str, gateway: str) -> list[str]:
    """Run in the pod's namespace: its address and a default route via the node."""
    return [f"addr add {pod_ip}/32 dev eth0", "link set eth0 up",
            f"route add {gateway} dev eth0 scope link",
            f"route add default via {gateway} dev eth0 src {pod_ip}"]


def resolv_conf(namespace: str) -> str:
    """The ``/etc/resolv.conf`` a pod of ``namespace`` sees (CoreDNS-style search path)."""
    d = CLUSTER_DOMAIN
    return (f"search {namespace}.svc.{d} svc.{d} {d}\n"
            f"nameserver {DNS_VIP}\noptions ndots:5\n")


def _batch(ns: str, lines: list[str]) -> None:
    netns.run(["ip", "-n", ns, "-batch", "-"], input_text="\n".join(lines) + "\n")


def _forwarding(ns: str) -> None:
    netns.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])


def create_fabric(names: Names, nodes: int) -> None:
    netns.add(names.fabric)
    _forwarding(names.fabric)
    _batch(names.fabric, fabric_commands(nodes))


def create_node(names: Names, index: int, nodes: int) -> None:
    ns = names.node(index)
    netns.add(ns)
    _forwarding(ns)
    _batch(names.fabric, [f"link add n{index} type veth peer name eth0 netns {ns}",
                          f"link set n{index} master br0 up"])
    _batch(ns, node_commands(index, nodes))


async def create_pod_network(node_netns: str, pod_netns: str, pod_ip: str,
                             gateway: str) -> None:
    """The pod's namespace with its veth and address.

    A namespace of the same name left by a supervisor that died is replaced.
    """
    if netns.exists(pod_netns):
        await delete_pod_network(node_netns, pod_netns, pod_ip)
    # A veth of this address left by an earlier pod (see delete_pod_network) would make
    # `link add` fail with "File exists".
    await netns.arun(["ip", "-n", node_netns, "link", "del", veth_name(pod_ip)], check=False)
    await netns.arun(["ip", "netns", "add", pod_netns])
    await netns.arun(["ip", "-n", node_netns, "-batch", "-"],
                     input_text="\n".join(pod_node_side_commands(pod_ip, pod_netns)) + "\n")
    await netns.arun(["ip", "-n", pod_netns, "-batch", "-"],
                     input_text="\n".join(["link set lo up",
                                           *pod_side_commands(pod_ip, gateway)]) + "\n")


async def delete_pod_network(node_netns: str, pod_netns: str, pod_ip: str) -> None:
    """Remove the pod's veth pair (the node's route to it goes with it), then its namespace.

    The veth is deleted from the node's side first: the namespace itself lives on while
    anything holds it (an orphaned socket still retransmitting its FIN keeps it for
    minutes), and with it the pair, the route and the address's veth name.
    """
    await netns.arun(["ip", "-n", node_netns, "link", "del", veth_name(pod_ip)], check=False)
    await netns.arun(["ip", "netns", "delete", pod_netns], check=False)
