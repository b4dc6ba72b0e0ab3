"""The ztunnel process: discovery, the in-pod agent, certificates and the operator endpoints.

Start-up order matters to an operator: the readiness endpoint answers 503 until the
first complete snapshot arrived *and* every captured pod of this node in it has its
listeners open (a pod's capture rules are installed only after that), so a rolling
restart never leaves a captured pod without its ztunnel for long.

Shutdown (SIGTERM): every pod stops accepting, live connections get ``--drain-seconds``
to finish, then everything is cancelled.  The capture rules stay in the pods: a
restarted ztunnel re-enrols them (idempotent), and meanwhile their connections fail
fast rather than bypass the mesh.

On Kubernetes (host network) the operator endpoints are opened in the process's own
namespace; on the local cluster several ztunnels share one host, so each opens them
inside its node's namespace (``--node-netns``).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from common.admin import AdminServer, LogLevel, Request, Response, listen_tcp
from common.ca import CertificateAuthority
from common.discovery import Discovery, SnapshotHolder
from common.errors import ConfigError
from common.kube import KubeClient
from common.kube.config import load_config
from common.logging import get_logger
from common.metrics import CONTENT_TYPE, Metrics
from common.model import Snapshot
from common.netns import call_in_netns
from ztunnel.certs import NodeIssuer
from ztunnel.csr_server import serve_waypoint_csr
from ztunnel.dns.resolver import DnsConfig
from ztunnel.dns.server import DnsService
from ztunnel.inpod.agent import InpodAgent
from ztunnel.inpod.k8s_netns import PodNetnsResolver
from ztunnel.proxy.pod import PodHook
from ztunnel.proxy.state import ProxyConfig, ProxyState
from ztunnel.socks5 import socks5_pod_hook

_log = get_logger("ztunnel")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """Command-line options (see ``python -m ztunnel --help``)."""

    node: str
    server: str | None = None
    ca_dir: Path
    node_netns: str | None = None
    find_netns: bool = False
    trust_domain: str | None = None
    drain_seconds: float = 5.0
    admin_port: int = 15000
    metrics_port: int = 15020
    readiness_port: int = 15021
    bind_host: str = "0.0.0.0"
    dns_upstreams: tuple[tuple[str, int], ...] = ()


class Ztunnel:
    """One node's ztunnel; ``await run()`` until cancelled, :meth:`drain` on SIGTERM."""

    def __init__(self, options: Options, ca: CertificateAuthority, *,
                 holder: SnapshotHolder | None = None, hooks: Sequence[PodHook] = (),
                 config: ProxyConfig | None = None, log_level: LogLevel | None = None) -> None:
        self.options = options
        self.holder = holder if holder is not None else SnapshotHolder()
        self.issuer = NodeIssuer(ca, options.node, lambda: self.holder.current)
        self.state = ProxyState(options.node, self.holder, self.issuer.store(),
                                metrics=Metrics(), config=config or ProxyConfig())
        self.agent = InpodAgent(
            self.state, hooks=hooks,
            waypoint_service=lambda w: serve_waypoint_csr(self.issuer, w),
            find_netns=PodNetnsResolver().resolve if options.find_netns else None)
        self.log_level = log_level if log_level is not None else LogLevel()
        self.endpoints: dict[str, tuple[str, int]] = {}

    # -- operator endpoints ------------------------------------------------------------

    def ready(self) -> bool:
        return self.holder.ready.is_set() and self.agent.ready

    def _readiness(self, _: Request) -> Response:
        if self.ready():
            return Response.text("ready\n")
        why = ("waiting for the first snapshot from the API server"
               if not self.holder.ready.is_set() else "enrolling this node's pods")
        return Response.text(f"not ready: {why}\n", 503)

    def _metrics(self, _: Request) -> Response:
        return Response(200, self.state.metrics.render(), CONTENT_TYPE)

    def _config_dump(self, _: Request) -> Response:
        return Response.json(config_dump(self.holder.current, self))

    def servers(self) -> list[tuple[str, int, AdminServer]]:
        """(host, port, server) for readiness, metrics and admin."""
        opts = self.options
        return [
            (opts.bind_host, opts.readiness_port,
             AdminServer({"/healthz/ready": self._readiness}, name="readiness")),
            (opts.bind_host, opts.metrics_port,
             AdminServer({"/metrics": self._metrics, "/stats/prometheus": self._metrics},
                         name="metrics")),
            ("127.0.0.1", opts.admin_port,
             AdminServer({"/config_dump": self._config_dump, "/logging": self.log_level.route,
                          "/healthz/ready": self._readiness}, name="admin")),
        ]

    def _listen(self, host: str, port: int) -> socket.socket:
        netns = self.options.node_netns
        try:
            if netns is None:
                return listen_tcp(host, port)
            return call_in_netns(netns, lambda: listen_tcp(host, port))
        except OSError as exc:
            where = f" in {netns}" if netns else ""
            raise ConfigError(f"cannot listen on {host}:{port}{where}: {exc.strerror} (is "
                              f"another ztunnel running for this node?)") from exc

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, client: KubeClient | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` once the operator endpoints listen."""
        async with trio.open_nursery() as nursery:
            for host, port, server in self.servers():
                sock = self._listen(host, port)
                self.endpoints[server.name] = (host, sock.getsockname()[1])
                await nursery.start(server.serve, sock)
            if client is not None:
                nursery.start_soon(self._discover, client)
            nursery.start_soon(self.state.certs.run_renewals)
            await nursery.start(self.agent.run)
            _log.info("ztunnel started", node=self.options.node, endpoints=self.endpoints)
            task_status.started()

    async def _discover(self, client: KubeClient) -> None:
        await Discovery(client, self.holder).run()

    async def drain(self) -> None:
        """Stop accepting and give live connections ``drain_seconds`` to finish."""
        _log.info("draining", seconds=self.options.drain_seconds,
                  pods=len(self.agent.enrolled))
        await self.agent.drain(self.options.drain_seconds)


def config_dump(snapshot: Snapshot, ztunnel: Ztunnel) -> dict[str, Any]:
    """What ztunnel knows, as JSON: workloads, services, enrolled pods, certificates."""
    node = ztunnel.options.node
    workloads = [{
        "uid": w.uid, "name": w.name, "namespace": w.namespace, "node": w.node,
        "ips": list(w.ips), "identity": str(w.identity), "captured": w.captured,
        "netns": w.netns, "waypoint": f"{w.waypoint.namespace}/{w.waypoint.name}"
        if w.waypoint else None, "is_waypoint": w.is_waypoint, "ready": w.ready,
    } for w in snapshot.workloads_by_uid.values()]
    services = [{
        "namespace": s.namespace, "name": s.name, "hostname": s.hostname,
        "vips": list(s.vips), "ports": [{"port": p.port, "targetPort": p.target_port}
                                        for p in s.ports],
        "endpoints": [{"ip": e.ip, "ready": e.ready, "node": e.node} for e in s.endpoints],
        "waypoint": f"{s.waypoint.namespace}/{s.waypoint.name}" if s.waypoint else None,
    } for s in snapshot.services_by_key.values()]
    enrolled = []
    for pod in ztunnel.agent.pods():
        cert = ztunnel.state.certs.cached(pod.identity)
        enrolled.append({
            "pod": pod.name, "uid": pod.uid, "netns": pod.netns.path,
            "identity": str(pod.identity), "listeners": pod.listen_ports,
            "certificate_expires": cert.not_after.isoformat() if cert else None,
        })
    return {"node": node, "snapshot_version": snapshot.version, "ready": ztunnel.ready(),
            "enrolled_pods": enrolled, "waypoint_csr_listeners": sorted(ztunnel.agent.waypoints),
            "live_inbound_connections": len(ztunnel.state.live),
            "workloads": workloads, "services": services,
            "issues": [{"object": i.key, "severity": i.severity.value, "reason": i.reason,
                        "message": i.message} for i in snapshot.issues]}


async def run_until_signal(ztunnel: Ztunnel, client: KubeClient | None) -> None:
    """Run; on SIGTERM/SIGINT drain with the configured deadline, then stop."""
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: ztunnel.run(client=client,
                                                           task_status=task_status))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                _log.info("signal received", signal=signum)
                break
        await ztunnel.drain()
        nursery.cancel_scope.cancel()


def pod_hooks(options: Options) -> list[PodHook]:
    """The per-pod services started beside the proxy listeners of every enrolled pod.

    Each is a :data:`~ztunnel.proxy.pod.PodHook`: the DNS proxy (15053, udp and tcp,
    forwarding what it does not answer itself to ``--dns-upstream``) and the SOCKS5 listener
    (127.0.0.1:15080), which resolves names through the same DNS proxy.
    """
    dns = DnsService(DnsConfig(upstreams=options.dns_upstreams))
    return [dns.serve_pod, socks5_pod_hook(dns.resolver_for)]


async def main_async(options: Options, log_level: LogLevel) -> None:
    """The process: CA from ``--ca-dir``, API client from ``--server``, run until a signal."""
    ca = CertificateAuthority.load(options.ca_dir, trust_domain=options.trust_domain)
    async with KubeClient(load_config(options.server)) as client:
        await run_until_signal(Ztunnel(options, ca, log_level=log_level,
                                       hooks=pod_hooks(options)), client)
