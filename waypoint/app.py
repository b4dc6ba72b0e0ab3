"""The waypoint process: identity, discovery, the HBONE listener, admin, drain.

Two modes:

* **mesh** (default): identity ``spiffe://<td>/ns/<ns>/sa/<name>`` from the node's
  ztunnel by CSR (key generated here, renewed at half-life), discovery from the API
  server, the route table and clusters rebuilt on every snapshot for the services
  that use this waypoint, HBONE in on 15008 and HBONE (or TCP) out, metrics on
  15020, readiness on 15021, admin on 15000; SIGTERM drains.
* **bench**: plain HTTP on a given address, upstreams over plain TCP, routes and
  endpoints from a static YAML file (:func:`load_bench_config`), so the data path
  can be compared with Envoy on the same machine.

The bench YAML::

    namespace: bench                   # home namespace (bare Host names resolve here)
    destination: 10.96.0.1:80          # optional: every connection is addressed here
    services:
    - name: backend
      ports: [80]
      vips: [10.96.0.1]
      endpoints:                       # per service port, or for all of them
      - {address: 127.0.0.1:8080, labels: {version: v1}, locality: region/zone}
    objects: [ ...HTTPRoute / VirtualService / DestinationRule... ]
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from common.admin import AdminServer, Request, Response, listen_tcp
from common.authz.model import GatewayRef
from common.errors import ConfigError
from common.identity import SpiffeId
from common.logging import get_logger
from common.metrics import HboneRefusals
from common.model import DEFAULT_TRUST_DOMAIN, HBONE_PORT, Snapshot
from common.tcp import TcpStream
from waypoint import h2_shell
from waypoint.clusters import (
    Clusters,
    EndpointSource,
    EndpointSpec,
    own_workload,
    snapshot_endpoints,
    static_endpoints,
)
from waypoint.h1_shell import H1Timeouts
from waypoint.h2_upstream import ProtocolTransport, snapshot_h2_endpoints
from waypoint.listener import PassThrough, serve_stream
from waypoint.mirror import Mirrorer
from waypoint.proxy import PeerInfo, Proxy, RouterState
from waypoint.ratelimit import RateLimitCollector, RateLimiter, RateLimitPolicy, RedisClient
from waypoint.ratelimit.limiter import ObjectKey, dict_objects, kube_objects, policies_from
from waypoint.resilience import Locality
from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.model import RouteTable
from waypoint.routing.snapshot import update_from_snapshot
from waypoint.routing.translate import RouteTableStore, translate
from waypoint.routing.workloads import workload_index
from waypoint.telemetry import RequestMetrics
from waypoint.upstream import EndpointInfo, TcpTransport, Transport

_log = get_logger("waypoint")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    name: str
    namespace: str
    server: str | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    csr_url: str = "http://127.0.0.1:15012"
    hbone_port: int = HBONE_PORT
    metrics_port: int = 15020
    ready_port: int = 15021
    admin_port: int = 15000
    drain_seconds: float = 5.0
    access_log: bool = True
    bench_config: Path | None = None
    bench_listen: tuple[str, int] = ("127.0.0.1", 18080)
    ratelimit_redis: tuple[str, int] | None = None
    ratelimit_timeout: float = 0.25
    mode: str = "mesh"  # or "ingress" (waypoint.ingress)
    #: This pod's IP ($POD_IP): finds the waypoint's own node, so its locality, in discovery.
    pod_ip: str | None = None

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.name)

    @property
    def gateway(self) -> GatewayRef:
        return GatewayRef(self.namespace, self.name)


# --- bench configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """A static route table and endpoint list (bench mode and over-the-wire tests)."""

    table: RouteTable
    endpoints: Mapping[tuple[str, str, int], list[EndpointSpec]]
    destination: str | None = None
    port: int | None = None
    namespace: str = "default"
    issues: tuple[str, ...] = field(default=())
    ratelimits: Mapping[ObjectKey, RateLimitPolicy] = field(default_factory=dict)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address {text!r} must be host:port")
    return host.strip("[]"), int(port)


def bench_config_from(doc: Mapping[str, Any]) -> BenchConfig:
    """Build a :class:`BenchConfig` from the parsed YAML document (see the module doc)."""
    namespace = str(doc.get("namespace", "default"))
    services: list[ServiceInfo] = []
    endpoints: dict[tuple[str, str, int], list[EndpointSpec]] = {}
    for svc in doc.get("services", []):
        ns = str(svc.get("namespace", namespace))
        ports = [int(p) for p in svc.get("ports", [80])]
        services.append(ServiceInfo(name=svc["name"], namespace=ns,
                                    ports=tuple(ServicePortInfo(port=p) for p in ports),
                                    vips=tuple(svc.get("vips", ()))))
        for ep in svc.get("endpoints", []):
            ip, target = _address(ep["address"])
            labels = {str(k): str(v) for k, v in (ep.get("labels") or {}).items()}
            for svc_port in [int(ep["port"])] if "port" in ep else ports:
                spec = EndpointSpec(EndpointInfo(ip, target), weight=int(ep.get("weight", 1)),
                                    locality=Locality.parse(str(ep.get("locality", ""))),
                                    labels=labels, workload=str(labels.get("app", svc["name"])),
                                    version=labels.get("version", "unknown"))
                endpoints.setdefault((ns, svc["name"], svc_port), []).append(spec)
    objects = []
    for obj in doc.get("objects", []):
        meta = obj.get("metadata", {})
        objects.append(ApiObject(kind=obj["kind"], namespace=meta.get("namespace", namespace),
                                 name=meta["name"], spec=obj.get("spec", {}),
                                 creation_timestamp=meta.get("creationTimestamp", "")))
    table = translate(services, objects, home_namespace=namespace)
    ratelimits, ratelimit_issues = policies_from(dict_objects(doc.get("objects", []), namespace))
    destination: str | None = None
    port: int | None = None
    if doc.get("destination"):
        destination, port = _address(doc["destination"])
    return BenchConfig(table=table, endpoints=endpoints, destination=destination, port=port,
                       namespace=namespace, ratelimits=ratelimits,
                       issues=(*(str(i) for i in table.issues), *ratelimit_issues))


def load_bench_config(path: Path) -> BenchConfig:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read bench config {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"bench config {path} must be a YAML mapping (see waypoint.app)")
    return bench_config_from(doc)


# --- the process ---------------------------------------------------------------------


class Waypoint:
    """The waypoint's long-lived objects; ``run_bench`` or ``run_mesh`` until cancelled."""

    def __init__(self, options: Options, *, transport: Transport | None = None,
                 rng: random.Random | None = None) -> None:
        self.options = options
        self.transport: Transport = ProtocolTransport(transport or TcpTransport())
        self.clusters = Clusters(self.transport)
        self.metrics = RequestMetrics()
        self.proxy = Proxy(RouterState(RouteTable(by_destination={}, clusters={}),
                                       self.clusters, options.gateway),
                           metrics=self.metrics, rng=rng, access_log=options.access_log)
        redis = (RedisClient(*options.ratelimit_redis, timeout=options.ratelimit_timeout)
                 if options.ratelimit_redis is not None else None)
        self.rate_limiter = RateLimiter(redis)
        self.proxy.rate_limiter = self.rate_limiter
        self.ready = False
        # "Kind/ns/name" -> resourceVersion of the route objects now in force: what
        # /config_dump shows so a person (or a test) can tell an update has arrived.
        self.served_objects: dict[str, str] = {}
        self.rejected_objects: list[str] = []
        # Refusals of the HBONE listener; registered into each /metrics scrape's registry.
        self.hbone_refused = HboneRefusals(CollectorRegistry())
        self.timeouts = H1Timeouts()
        self._drain_scopes: list[trio.CancelScope] = []

    async def apply_bench(self, config: BenchConfig) -> None:
        """Serve ``config``'s routes and endpoints (atomically for new requests)."""
        source: EndpointSource = static_endpoints(config.endpoints)
        await self.clusters.update(config.table, source)
        self.rate_limiter.update(dict(config.ratelimits))
        self.proxy.state = RouterState(config.table, self.clusters, self.options.gateway)

    async def serve_plain(self, listener: socket.socket, *, destination: str | None = None,
                          port: int | None = None, passthrough: PassThrough | None = None,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Accept plain TCP clients (bench mode) until cancelled."""
        listener.setblocking(False)

        async def handle(sock: socket.socket, address: Any) -> None:
            peer = PeerInfo(source_ip=str(address[0]), destination=destination, port=port,
                            destination_ip=destination or "0.0.0.0")
            await serve_stream(TcpStream(sock), self.proxy, peer, passthrough,
                               timeouts=self.timeouts)

        async with trio.open_nursery() as nursery:
            self.proxy.mirror = Mirrorer(nursery)
            nursery.start_soon(self.clusters.run_sweeps)
            self.ready = True
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE and friends: keep serving the others
                    _log.warning("accept failed", reason=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(handle, sock, address)

    async def run_bench(self, config: BenchConfig, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.apply_bench(config)
        host, port = self.options.bench_listen
        listener = listen_tcp(host, port)
        for issue in config.issues:
            _log.warning("bench config issue", issue=issue)
        _log.info("waypoint serving (bench mode)", listen=f"{host}:{port}",
                  clusters=len(config.table.clusters))
        await self.serve_plain(listener, destination=config.destination, port=config.port,
                               task_status=task_status)

    # --- mesh mode -----------------------------------------------------------------

    async def follow(self, holder: Any) -> None:
        """Rebuild routes, clusters and policies on every snapshot (never dropping
        connections: in-flight requests keep the state they read)."""
        store = RouteTableStore()
        gateway = self.options.gateway
        async for snap in holder.subscribe():
            if snap.version == 0:
                continue
            table = update_from_snapshot(store, snap, gateway)

            def source(cluster: Any, snap: Snapshot = snap) -> list[EndpointSpec]:
                return snapshot_endpoints(snap, cluster)

            if (own := own_workload(snap, self.options.pod_ip)) is not None:
                self.clusters.set_client(*own)
            await self.clusters.update(table, source)
            ratelimits, issues = policies_from(kube_objects(
                (*snap.http_routes, *snap.virtual_services)))
            for issue in issues:
                _log.warning("rate-limit annotation ignored", issue=issue)
            self.rate_limiter.update(ratelimits)
            self.proxy.state = RouterState(table, self.clusters, gateway,
                                           snap.waypoint_policies,
                                           workloads=workload_index(snap, gateway))
            # A rejected version is not in force (its last good one is, or none): it is
            # listed under "rejected", not here.
            rejected = {f"{r.kind}/{r.namespace}/{r.name}" for r in table.rejected}
            self.served_objects = {
                key: o.metadata.resource_version or ""
                for o in (*snap.http_routes, *snap.virtual_services, *snap.destination_rules)
                if (key := f"{o.kind}/{o.metadata.namespace}/{o.metadata.name}") not in rejected}
            self.rejected_objects = sorted(rejected)
            self.ready = True

    def admin_servers(self) -> list[tuple[int, AdminServer]]:
        def readiness(_: Request) -> Response:
            return Response.text("ready\n") if self.ready else Response.text("not ready\n", 503)

        def metrics(_: Request) -> Response:
            registry = CollectorRegistry()
            self.metrics.register(registry)
            registry.register(RateLimitCollector(self.rate_limiter))
            registry.register(self.hbone_refused.counter)
            return Response(200, generate_latest(registry),
                            "text/plain; version=0.0.4; charset=utf-8")

        def config_dump(_: Request) -> Response:
            state = self.proxy.state
            return Response.json({
                "routes": sorted(f"{d}:{p}" for d, p in state.table.by_destination),
                "clusters": {name: sorted(s.endpoints)
                             for name, s in self.clusters.by_name.items()},
                "issues": [str(i) for i in state.table.issues],
                "ratelimits": sorted("/".join(k) for k in self.rate_limiter.policies),
                "objects": self.served_objects,
                "rejected": self.rejected_objects,
                # Pod IPs whose workload-addressed traffic this waypoint forwards.
                "workloads": state.workloads.served,
                # Where locality-aware picks are ranked from (empty: not known yet).
                "locality": str(self.clusters.client_locality or ""),
                "version": state.table.version})

        o = self.options
        return [(o.ready_port, AdminServer({"/healthz/ready": readiness}, name="readiness")),
                (o.metrics_port, AdminServer({"/metrics": metrics, "/stats/prometheus": metrics},
                                             name="metrics")),
                (o.admin_port, AdminServer({"/config_dump": config_dump}, name="admin"))]

    async def run_mesh(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        from common.certs import CertificateStore
        from common.csr import csr_issuer
        from common.discovery import Discovery, SnapshotHolder
        from common.hbone import HbonePool, HboneServer, tls_connector, tls_handshake
        from common.kube import KubeClient
        from common.kube.config import load_config
        from waypoint.gateway_status import keep_status
        from waypoint.listener import HboneInbound, snapshot_passthrough
        from waypoint.upstream import MeshTransport

        o = self.options
        identity = o.identity
        certs = CertificateStore(csr_issuer(o.csr_url))
        await certs.get(identity)
        _log.info("waypoint identity issued", identity=str(identity))

        async def context_for(_source: SpiffeId | None) -> Any:
            await certs.get(identity)
            return certs.client_context(identity)

        holder = SnapshotHolder()
        async with KubeClient(load_config(o.server)) as client, \
                HbonePool(tls_connector(context_for)) as pool, trio.open_nursery() as nursery:

            async def hbone(endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
                with trio.fail_after(timeout):
                    return await pool.connect(
                        identity, (endpoint.ip, HBONE_PORT),
                        expected=[endpoint.identity] if endpoint.identity else [],
                        authority=(f"[{endpoint.ip}]:{endpoint.port}" if ":" in endpoint.ip
                                   else f"{endpoint.ip}:{endpoint.port}"))

            transport = ProtocolTransport(MeshTransport(hbone),
                                          snapshot_h2_endpoints(lambda: holder.current))
            self.transport = transport
            self.clusters.transport = transport
            self.proxy.mirror = Mirrorer(nursery)
            nursery.start_soon(certs.run_renewals)
            nursery.start_soon(Discovery(client, holder).run)
            nursery.start_soon(self.follow, holder)
            nursery.start_soon(self.clusters.run_sweeps)
            nursery.start_soon(keep_status, client, self, holder)
            for port, server in self.admin_servers():
                nursery.start_soon(server.serve, listen_tcp("0.0.0.0", port))
            inbound = HboneInbound(self.proxy, lambda: holder.current,
                                   snapshot_passthrough(lambda: holder.current, transport),
                                   timeouts=self.timeouts)
            hbone_server = HboneServer(inbound, tls_handshake(
                lambda: certs.server_context(identity), o.trust_domain),
                on_refused=self.hbone_refused)
            self._hbone_server = hbone_server
            await nursery.start(hbone_server.serve, listen_tcp("0.0.0.0", o.hbone_port))
            _log.info("waypoint serving", gateway=f"{o.namespace}/{o.name}",
                      hbone_port=o.hbone_port)
            task_status.started()

    async def drain(self) -> None:
        server = getattr(self, "_hbone_server", None)
        self.ready = False
        # HTTP/2 clients inside the tunnels get their own GOAWAY, so they stop opening
        # streams while the ones in flight finish.
        await h2_shell.drain_all()
        if server is not None:
            await server.drain(self.options.drain_seconds)


async def run_until_signal(waypoint: Waypoint, bench: BenchConfig | None) -> None:
    """Run; on SIGTERM/SIGINT drain (mesh mode) and stop."""
    async with trio.open_nursery() as nursery:
        if bench is not None:
            await nursery.start(lambda task_status: waypoint.run_bench(
                bench, task_status=task_status))
        else:
            await nursery.start(lambda task_status: waypoint.run_mesh(task_status=task_status))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                _log.info("signal received; draining", signal=signum)
                break
        with contextlib.suppress(Exception):
            await waypoint.drain()
        nursery.cancel_scope.cancel()
