"""Hand-built netns "pods" on a bridge and in-process ztunnels over a hand-built snapshot.

Each pod is a network namespace with ``eth0`` on one bridge (in a namespace of its own),
so pods reach each other by IP exactly as on the local cluster.  Each "node" is a
ztunnel (:class:`InpodAgent` + :class:`ProxyState`) running in the test's trio loop, with
its own certificate store signing from one test CA.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from common.authz.compile import PolicyObject, compile_authorization_policies
from common.authz.model import WorkloadRef
from common.authz.peer import compile_peer_authentications
from common.ca import CertificateAuthority
from common.discovery import SnapshotHolder
from common.identity import SpiffeId
from common.model import EMPTY_LOCALITY, Snapshot, WaypointRef, Workload
from common.netns import call_in_netns
from ztunnel.certs import NodeIssuer
from ztunnel.csr_server import serve_waypoint_csr
from ztunnel.inpod.agent import InpodAgent, NetnsFinder
from ztunnel.proxy.state import ProxyConfig, ProxyState

SUBNET = "10.215.{}.0/24"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class PodNs:
    name: str
    ip: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


@contextmanager
def pod_network(names: Iterable[str]) -> Iterator[dict[str, PodNs]]:
    """Namespaces ``<tag>-<name>`` on one bridge, IPs 10.215.<n>.2.., ``lo`` up."""
    tag = secrets.token_hex(3)
    third = secrets.randbelow(200) + 20
    bridge_ns = f"zt{tag}-br"
    created = [bridge_ns]
    pods: dict[str, PodNs] = {}
    try:
        sh("ip", "netns", "add", bridge_ns)
        sh("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = f"zt{tag}-{name}"
            sh("ip", "netns", "add", ns)
            created.append(ns)
            ip = f"10.215.{third}.{i + 2}"
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
               f"v{i}", "netns", bridge_ns)
            sh("ip", "-n", bridge_ns, "link", "set", f"v{i}", "master", "br0")
            sh("ip", "-n", bridge_ns, "link", "set", f"v{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            pods[name] = PodNs(ns, ip)
        yield pods
    finally:
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)


def workload(pod: PodNs, *, name: str, namespace: str = "default", sa: str = "default",
             node: str = "node1", captured: bool = True,
             labels: Mapping[str, str] | None = None,
             gateway: WaypointRef | None = None) -> Workload:
    labels = dict(labels or {"app": name})
    return Workload(
        uid=f"uid-{name}", name=name, namespace=namespace, node=node, service_account=sa,
        identity=SpiffeId("cluster.local", namespace, sa), ips=(pod.ip,), labels=labels,
        locality=EMPTY_LOCALITY,
        captured=captured, waypoint=None, netns=pod.path, ready=True, gateway=gateway,
        named_ports={}, authz_ref=WorkloadRef(namespace, labels, name))


def snapshot(version: int, workloads: Iterable[Workload], *,
             authz: Iterable[tuple[str, str, Mapping[str, Any]]] = (),
             peer_auth: Iterable[tuple[str, str, Mapping[str, Any]]] = ()) -> Snapshot:
    """A snapshot of ``workloads``; policies as (namespace, name, spec)."""
    wls = list(workloads)
    by_node: dict[str, list[str]] = {}
    for w in wls:
        by_node.setdefault(w.node, []).append(w.uid)
    authz_cfg = compile_authorization_policies(
        [PolicyObject(ns, name, spec) for ns, name, spec in authz])
    pa_cfg = compile_peer_authentications(
        [PolicyObject(ns, name, spec) for ns, name, spec in peer_auth])
    return Snapshot(
        version=version,
        workloads_by_ip={ip: w for w in wls for ip in w.ips},
        workloads_by_uid={w.uid: w for w in wls},
        workloads_by_node={n: tuple(u) for n, u in by_node.items()},
        ztunnel_policies=authz_cfg.ztunnel, peer_authentication=pa_cfg)


@dataclass
class Node:
    state: ProxyState
    agent: InpodAgent


@dataclass
class Mesh:
    """Ztunnels for some nodes over one published snapshot."""

    ca: CertificateAuthority
    snapshots: SnapshotHolder = field(default_factory=SnapshotHolder)
    nodes: dict[str, Node] = field(default_factory=dict)

    async def start(self, nursery: trio.Nursery, *node_names: str,
                    find_netns: NetnsFinder | None = None) -> None:
        for name in node_names:
            issuer = NodeIssuer(self.ca, name, lambda: self.snapshots.current)
            state = ProxyState(name, self.snapshots, issuer.store(),
                               config=ProxyConfig(connect_timeout=2.0))
            agent = InpodAgent(state, waypoint_service=partial(serve_waypoint_csr, issuer),
                               find_netns=find_netns)
            await nursery.start(agent.run)
            self.nodes[name] = Node(state, agent)

    async def publish(self, snap: Snapshot) -> None:
        """Publish and wait until every node reconciled it."""
        waits = [n.agent.wait_reconciled for n in self.nodes.values()]
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(wait)
            await trio.lowlevel.checkpoint()
            self.snapshots.publish(snap)


def tcp_socket_in(pod: PodNs) -> trio.socket.SocketType:
    """A plain (unmarked) TCP socket inside the pod: what the application would use."""
    return trio.socket.from_stdlib_socket(call_in_netns(pod.path, socket.socket))


class EchoApp:
    """A test application in a pod: greets with the peer's IP, then echoes until EOF."""

    def __init__(self, pod: PodNs, port: int = 8080) -> None:
        self.pod = pod
        self.port = port
        self.peers: list[str] = []

        def make() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(64)
            return s
        self.listener = trio.socket.from_stdlib_socket(call_in_netns(pod.path, make))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = trio.SocketListener(self.listener)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        self.peers.append(peer)
        async with stream:
            try:
                await stream.send_all(f"from {peer}\n".encode())
                while data := await stream.receive_some(256 * 1024):
                    await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass


async def converse(client_pod: PodNs, dst: tuple[str, int], payload: bytes
                   ) -> tuple[str, bytes]:
    """Connect from ``client_pod``, send ``payload``, half-close; (greeting, echoed bytes)."""
    sock = tcp_socket_in(client_pod)
    await sock.connect(dst)
    stream = trio.SocketStream(sock)
    async with stream:
        received = bytearray()

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while data := await stream.receive_some(256 * 1024):
                received += data
    greeting, _, rest = bytes(received).partition(b"\n")
    return greeting.decode(), rest


async def refused(client_pod: PodNs, dst: tuple[str, int], payload: bytes = b"x") -> bool:
    """True when the connection is reset (or closed) before the application greets us."""
    greeting = ""
    broken = False
    try:
        greeting, _ = await converse(client_pod, dst, payload)
    except* (trio.BrokenResourceError, OSError):
        broken = True
    return broken or greeting == ""
