"""The ingress gateway: a mode of the waypoint process (``waypoint --mode ingress``).

Theory of operation.  An ingress Gateway (``gatewayClassName: pyambient`` or
Istio's ``istio``) names listeners (HTTP or HTTPS, a port, an optional hostname,
TLS certificates from ``kubernetes.io/tls`` Secrets).  HTTPRoutes attach to it
through ``parentRefs``.  Rather than a second L7 engine, the gateway reuses the
waypoint's: :func:`ingress_routes` rewrites each attached route into the GAMMA
shape the waypoint's translator already understands, with a *synthetic service*
per (route namespace, hostname) as its parent, on the listener ports the route
attached to.  The route table then holds one entry per synthetic service;
:class:`HostIndex` maps a request's Host (exact, then longest ``*.`` wildcard,
then catch-all) and listener port to that synthetic service, which the pipeline
receives as the connection's destination.  VirtualServices bound by
``gateways: [ns/name]`` are rewritten the same way (their ``hosts`` become the
synthetic services, on every listener port).  Everything after that (matching,
filters, L7 policy of the gateway, rate limits, retries, load balancing) is the
waypoint's pipeline unchanged.

Upstream is HBONE to the backend pods.  A backend Service labelled
``istio.io/ingress-use-waypoint=true`` that has a waypoint is reached through the
waypoint instead: the cluster's one endpoint is the service VIP, and the dialer
(:class:`WaypointDetours`) sends the tunnel to a waypoint pod with ``:authority``
VIP:port, exactly as ztunnel would, so the waypoint's policy applies to traffic
from the edge too.

TLS terminates here (:class:`CertificateSet`): each HTTPS listener's certificates
are loaded into their own ``ssl.SSLContext``; the SNI callback switches to the
context whose certificate names the requested server (exact, then wildcard), the
listener's first certificate otherwise.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from cryptography import x509

from common.admin import listen_tcp
from common.errors import ConfigError, KubeApiError
from common.identity import SpiffeId
from common.logging import get_logger
from common.model import HBONE_PORT, Service, Snapshot
from common.tcp import TcpStream, tune
from waypoint.app import Waypoint
from waypoint.clusters import EndpointSpec, snapshot_endpoints
from waypoint.h2_upstream import ProtocolTransport
from waypoint.http import RequestHead
from waypoint.listener import Declared, serve_stream
from waypoint.mirror import Mirrorer
from waypoint.proxy import Downstream, PeerInfo, Proxy, RouterState
from waypoint.ratelimit.limiter import kube_objects, policies_from
from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.model import Cluster
from waypoint.routing.snapshot import api_object, service_info
from waypoint.routing.translate import RouteTableStore
from waypoint.upstream import EndpointInfo

_log = get_logger("waypoint.ingress")

INGRESS_CLASSES = ("pyambient", "istio")
INGRESS_USE_WAYPOINT = "istio.io/ingress-use-waypoint"
GATEWAY_GROUP = "gateway.networking.k8s.io"
#: Synthetic service names start with a character no Kubernetes name may hold.
SYNTHETIC_PREFIX = "~ingress-"
TLS_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class IngressListener:
    name: str
    port: int
    protocol: str  # HTTP | HTTPS
    hostname: str | None = None
    certificates: tuple[tuple[str, str], ...] = ()  # (namespace, Secret name)
    all_namespaces: bool = False


def listeners_of(spec: Mapping[str, Any], namespace: str) -> tuple[list[IngressListener],
                                                                    list[str]]:
    """The HTTP/HTTPS listeners of a Gateway spec, and what was skipped and why."""
    out: list[IngressListener] = []
    issues: list[str] = []
    if spec.get("gatewayClassName") not in INGRESS_CLASSES:
        issues.append(f"gatewayClassName {spec.get('gatewayClassName')!r} is not an ingress "
                      f"class ({', '.join(INGRESS_CLASSES)})")
        return out, issues
    for i, lst in enumerate(spec.get("listeners") or []):
        protocol = str(lst.get("protocol", ""))
        where = f"spec.listeners[{i}]"
        if protocol not in ("HTTP", "HTTPS"):
            issues.append(f"{where}: protocol {protocol!r} is not served (HTTP, HTTPS)")
            continue
        certs: list[tuple[str, str]] = []
        if protocol == "HTTPS":
            tls = lst.get("tls") or {}
            if tls.get("mode", "Terminate") != "Terminate":
                issues.append(f"{where}.tls.mode: only Terminate is supported")
                continue
            for ref in tls.get("certificateRefs") or []:
                if ref.get("kind", "Secret") != "Secret" or ref.get("group", "") not in ("",
                                                                                         "core"):
                    issues.append(f"{where}.tls.certificateRefs: only core Secrets")
                    continue
                certs.append((str(ref.get("namespace") or namespace), str(ref["name"])))
            if not certs:
                issues.append(f"{where}: an HTTPS listener needs tls.certificateRefs")
                continue
        origin = ((lst.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
        out.append(IngressListener(name=str(lst["name"]), port=int(lst["port"]),
                                   protocol=protocol, hostname=lst.get("hostname"),
                                   certificates=tuple(certs), all_namespaces=origin == "All"))
    return out, issues


# --- routes ------------------------------------------------------------------------------


@dataclass(slots=True)
class HostIndex:
    """Host and listener port -> the synthetic service's destination alias (``name.ns``)."""

    exact: dict[tuple[str, int], str] = field(default_factory=dict)
    wildcard: list[tuple[str, int, str]] = field(default_factory=list)  # (".suffix", port, ...)
    any_host: dict[int, str] = field(default_factory=dict)

    def add(self, hostname: str, port: int, alias: str) -> None:
        if hostname == "*":
            self.any_host.setdefault(port, alias)
        elif hostname.startswith("*."):
            self.wildcard.append((hostname[1:], port, alias))
            self.wildcard.sort(key=lambda w: -len(w[0]))
        else:
            self.exact.setdefault((hostname, port), alias)

    def resolve(self, authority: str, port: int) -> str | None:
        host = authority.lower()
        if host.startswith("["):
            host = host[:host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        host = host.rstrip(".")
        alias = self.exact.get((host, port))
        if alias is not None:
            return alias
        for suffix, p, candidate in self.wildcard:
            if p == port and host.endswith(suffix) and len(host) > len(suffix):
                return candidate
        return self.any_host.get(port)


def _intersect(listener: str | None, route: str) -> str | None:
    """The hostname a route serves on a listener (Gateway API hostname intersection)."""
    if listener is None or listener == route:
        return route
    if route == "*":
        return listener
    if listener.startswith("*.") and not route.startswith("*.") and route.endswith(listener[1:]):
        return route
    if route.startswith("*.") and not listener.startswith("*.") and listener.endswith(route[1:]):
        return listener
    return None


@dataclass(slots=True)
class IngressRoutes:
    services: list[ServiceInfo]
    objects: list[ApiObject]
    hosts: HostIndex
    served: set[tuple[str, str]]


def ingress_routes(gateway_namespace: str, gateway_name: str,
                   listeners: list[IngressListener], routes: Iterable[ApiObject],
                   domain: str = "cluster.local") -> IngressRoutes:
    """Rewrite the HTTPRoutes attached to the Gateway into GAMMA routes on synthetic services."""
    groups: dict[tuple[str, str], set[int]] = {}
    rewritten: list[tuple[ApiObject, list[tuple[str, int]]]] = []
    virtual: list[tuple[ApiObject, list[str]]] = []
    for obj in routes:
        if obj.kind == "VirtualService":
            bound = _bound_virtual_service(obj, gateway_namespace, gateway_name)
            if bound:
                virtual.append((obj, bound))
                for name in bound:
                    groups.setdefault((obj.namespace, name), set()).update(
                        lst.port for lst in listeners)
            continue
        if obj.kind != "HTTPRoute":
            continue
        attached: list[tuple[str, int]] = []
        for parent in obj.spec.get("parentRefs") or []:
            if (parent.get("kind", "Gateway") != "Gateway"
                    or parent.get("group", GATEWAY_GROUP) != GATEWAY_GROUP
                    or parent.get("name") != gateway_name
                    or (parent.get("namespace") or obj.namespace) != gateway_namespace):
                continue
            for lst in listeners:
                if parent.get("sectionName") not in (None, lst.name):
                    continue
                if parent.get("port") not in (None, lst.port):
                    continue
                if not lst.all_namespaces and obj.namespace != gateway_namespace:
                    continue
                for route_host in obj.spec.get("hostnames") or ["*"]:
                    host = _intersect(lst.hostname, str(route_host).lower())
                    if host is not None:
                        attached.append((host, lst.port))
        if not attached:
            continue
        for host, port in attached:
            groups.setdefault((obj.namespace, host), set()).add(port)
        rewritten.append((obj, attached))
    names = {key: f"{SYNTHETIC_PREFIX}{i}" for i, key in enumerate(sorted(groups))}
    hosts = HostIndex()
    services = []
    for (ns, host), ports in sorted(groups.items()):
        name = names[(ns, host)]
        services.append(ServiceInfo(name=name, namespace=ns, domain=domain,
                                    ports=tuple(ServicePortInfo(port=p) for p in sorted(ports)),
                                    vips=()))
        for port in ports:
            hosts.add(host, port, f"{name}.{ns}")
    objects = []
    for obj, attached in rewritten:
        parents = [{"group": "", "kind": "Service", "name": names[(obj.namespace, host)],
                    "port": port} for host, port in sorted(set(attached))]
        spec = {k: v for k, v in obj.spec.items() if k != "hostnames"}
        spec["parentRefs"] = parents
        objects.append(ApiObject(kind=obj.kind, namespace=obj.namespace, name=obj.name,
                                 spec=spec, creation_timestamp=obj.creation_timestamp))
    for obj, vs_hosts in virtual:
        spec = dict(obj.spec)
        spec["hosts"] = [f"{names[(obj.namespace, h)]}.{obj.namespace}.svc.{domain}"
                         for h in vs_hosts]
        spec["gateways"] = ["mesh"]
        spec["http"] = [_mesh_matches(entry, gateway_namespace, gateway_name, obj.namespace)
                        for entry in spec.get("http") or []]
        objects.append(ApiObject(kind=obj.kind, namespace=obj.namespace, name=obj.name,
                                 spec=spec, creation_timestamp=obj.creation_timestamp))
    return IngressRoutes(services=services, objects=objects, hosts=hosts,
                         served={(s.namespace, s.name) for s in services})


def _names_gateway(ref: str, gateway_namespace: str, gateway_name: str, own: str) -> bool:
    ns, sep, name = ref.partition("/")
    if not sep:
        ns, name = own, ref
    return ns == gateway_namespace and name == gateway_name


def _bound_virtual_service(obj: ApiObject, gateway_namespace: str, gateway_name: str
                           ) -> list[str]:
    """The hosts of a VirtualService bound to the Gateway by ``gateways: [ns/name]``."""
    gateways = obj.spec.get("gateways") or []
    if not any(_names_gateway(str(g), gateway_namespace, gateway_name, obj.namespace)
               for g in gateways):
        return []
    return [str(h).lower() for h in obj.spec.get("hosts") or []]


def _mesh_matches(entry: Any, gateway_namespace: str, gateway_name: str, own: str) -> Any:
    """An ``http`` entry whose per-match ``gateways`` name this Gateway, re-aimed at the
    waypoint translator's ``mesh``; matches for other gateways never match here."""
    if not isinstance(entry, dict) or not entry.get("match"):
        return entry
    matches = []
    for m in entry["match"]:
        gws = m.get("gateways") if isinstance(m, dict) else None
        if not gws:
            matches.append(m)
        elif any(_names_gateway(str(g), gateway_namespace, gateway_name, own) for g in gws):
            matches.append({**m, "gateways": ["mesh"]})
        else:
            matches.append({**m, "gateways": ["~other-gateway"]})
    return {**entry, "match": matches}


# --- through the waypoint ------------------------------------------------------------------


class WaypointDetours:
    """Endpoints of services whose ingress traffic must cross their waypoint.

    :meth:`endpoints` replaces such a service's pods with its VIP (``hbone``, the
    waypoint's identity expected) and remembers which waypoint pods serve that VIP;
    :meth:`target` tells the dialer where the tunnel really goes.
    """

    def __init__(self) -> None:
        self._via: dict[str, tuple[str, ...]] = {}

    def endpoints(self, snap: Snapshot, cluster: Cluster) -> list[EndpointSpec]:
        svc = snap.services_by_key.get((cluster.service_namespace, cluster.service_name))
        if svc is None or not _uses_waypoint(svc, snap) or not svc.vips:
            return snapshot_endpoints(snap, cluster)
        assert svc.waypoint is not None
        waypoint = snap.waypoints_by_ref.get(svc.waypoint)
        if waypoint is None or not waypoint.endpoints:
            return []
        vip = svc.vips[0]
        self._via[vip] = tuple(ep.ip for ep in waypoint.endpoints)
        return [EndpointSpec(EndpointInfo(vip, cluster.port, identity=waypoint.identity,
                                          hbone=True), workload=waypoint.name)]

    def target(self, endpoint: EndpointInfo, pick: int = 0) -> tuple[str, int]:
        """Where the HBONE tunnel for ``endpoint`` connects (ip, port)."""
        pods = self._via.get(endpoint.ip)
        if pods:
            return pods[pick % len(pods)], HBONE_PORT
        return endpoint.ip, HBONE_PORT


def _uses_waypoint(svc: Service, snap: Snapshot) -> bool:
    label = svc.labels.get(INGRESS_USE_WAYPOINT)
    if label is None:
        label = snap.namespaces.get(svc.namespace, {}).get(INGRESS_USE_WAYPOINT)
    return label == "true" and svc.waypoint is not None


# --- TLS ---------------------------------------------------------------------------------


def _names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in
                 cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    return names


def context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context for one certificate chain (the key touches disk only in a 0600
    temporary file removed at once: ``ssl`` loads keys from paths only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    fd, path = tempfile.mkstemp(prefix="ingress-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
        ctx.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise ConfigError(f"the TLS Secret's tls.crt/tls.key do not load: {exc}") from exc
    finally:
        os.unlink(path)
    return ctx


class CertificateSet:
    """The certificates of one HTTPS listener, chosen by SNI."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        if not pairs:
            raise ConfigError("an HTTPS listener needs at least one certificate")
        self.by_name: dict[str, ssl.SSLContext] = {}
        contexts = [context_from_pem(c, k) for c, k in pairs]
        for (cert, _), ctx in zip(pairs, contexts, strict=True):
            for name in _names(cert):
                self.by_name.setdefault(name, ctx)
        self.default = contexts[0]
        self.default.sni_callback = self._pick
        for ctx in contexts[1:]:
            ctx.sni_callback = self._pick

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower()
            ctx = self.by_name.get(name)
            if ctx is None and "." in name:
                ctx = self.by_name.get("*." + name.split(".", 1)[1])
            if ctx is not None:
                return ctx
        return self.default

    def _pick(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              _ctx: ssl.SSLContext) -> None:
        chosen = self.select(server_name)
        if chosen is not sslobj.context:
            sslobj.context = chosen


def tls_pair(secret: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(tls.crt, tls.key) of a ``kubernetes.io/tls`` Secret object (``data`` is base64)."""
    data = secret.get("data") or {}
    try:
        return base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])
    except (KeyError, ValueError) as exc:
        raise ConfigError("a TLS Secret needs base64 data keys tls.crt and tls.key") from exc


def listen(port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def tls_accept(stream: trio.SocketStream, certs: CertificateSet) -> trio.SSLStream[Any]:
    """Terminate TLS on an accepted connection within the handshake deadline."""
    tls = trio.SSLStream(stream, certs.default, server_side=True)
    with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
        await tls.do_handshake()
    return tls


# --- the process -------------------------------------------------------------------------

#: How often the Gateway and its Secrets are read again (certificate rotation).
REFRESH_SECONDS = 10.0


class IngressProxy(Proxy):
    """The waypoint pipeline with the destination chosen per request from its Host."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hosts = HostIndex()

    async def handle(self, head: RequestHead, down: Downstream, peer: PeerInfo) -> None:
        host = next((v for n, v in head.headers if n == b"host"), b"").decode("latin-1")
        alias = self.hosts.resolve(host, peer.port or 80)
        await super().handle(head, down, replace(peer, destination=alias))


class Ingress(Waypoint):
    """``waypoint --mode ingress``: the Gateway's listeners, routes and certificates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.proxy
        self.proxy = IngressProxy(old.state, metrics=self.metrics, rng=old.rng,
                                  access_log=self.options.access_log)
        self.proxy.rate_limiter = self.rate_limiter
        self.detours = WaypointDetours()
        self.listeners: list[IngressListener] = []
        self.certs: dict[str, CertificateSet] = {}

    def apply_snapshot(self, store: RouteTableStore, snap: Snapshot) -> Any:
        o = self.options
        routes = ingress_routes(o.namespace, o.name, self.listeners,
                                (api_object(r) for r in snap.http_routes), snap.domain)
        services = [*routes.services,
                    *(service_info(s, snap.domain) for s in snap.services_by_key.values())]
        objects = [*routes.objects, *(api_object(r) for r in snap.destination_rules)]
        table = store.update(services, objects, served=routes.served,
                             home_namespace=o.namespace, domain=snap.domain)
        return table, routes.hosts

    async def follow(self, holder: Any) -> None:
        store = RouteTableStore()
        async for snap in holder.subscribe():
            if snap.version == 0:
                continue
            table, hosts = self.apply_snapshot(store, snap)

            def source(cluster: Cluster, snap: Snapshot = snap) -> list[EndpointSpec]:
                return self.detours.endpoints(snap, cluster)

            await self.clusters.update(table, source)
            ratelimits, _issues = policies_from(kube_objects(snap.http_routes))
            self.rate_limiter.update(ratelimits)
            proxy = self.proxy
            assert isinstance(proxy, IngressProxy)
            proxy.state = RouterState(table, self.clusters, self.options.gateway,
                                      snap.waypoint_policies)
            proxy.hosts = hosts
            self.ready = True

    async def load_gateway(self, client: Any) -> None:
        """Read the Gateway (listeners) and its TLS Secrets (certificates)."""
        from common.kube import Gateway, Secret
        o = self.options
        gw = await client.get(Gateway, o.name, o.namespace)
        listeners, issues = listeners_of(gw.spec, o.namespace)
        for issue in issues:
            _log.warning("gateway listener skipped", gateway=f"{o.namespace}/{o.name}",
                         issue=issue)
        certs: dict[str, CertificateSet] = {}
        for lst in listeners:
            if lst.protocol != "HTTPS":
                continue
            pairs = []
            for ns, name in lst.certificates:
                try:
                    secret = await client.get(Secret, name, ns)
                    pairs.append(tls_pair({"data": secret.data}))
                except (KubeApiError, ConfigError) as exc:
                    _log.warning("TLS Secret unusable", listener=lst.name,
                                 secret=f"{ns}/{name}", reason=str(exc))
            if pairs:
                certs[lst.name] = CertificateSet(pairs)
        if not self.listeners:
            self.listeners = listeners
        self.certs = certs

    async def refresh(self, client: Any) -> None:
        while True:
            await trio.sleep(REFRESH_SECONDS)
            try:
                await self.load_gateway(client)
            except (KubeApiError, ConfigError) as exc:
                _log.warning("gateway refresh failed; keeping the last one", reason=str(exc))

    async def serve_listener(self, lst: IngressListener, sock: socket.socket) -> None:
        async def handle(raw: socket.socket, address: Any) -> None:
            tune(raw)
            peer = PeerInfo(source_ip=str(address[0]), port=lst.port,
                            destination_ip=raw.getsockname()[0],
                            scheme="https" if lst.protocol == "HTTPS" else "http")
            stream: trio.abc.Stream
            if lst.protocol == "HTTPS":
                certs = self.certs.get(lst.name)
                if certs is None:
                    raw.close()
                    return
                try:
                    stream = await tls_accept(trio.SocketStream(
                        trio.socket.from_stdlib_socket(raw)), certs)
                except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                    _log.debug("TLS handshake failed", source=peer.source_ip, reason=str(exc))
                    raw.close()
                    return
            else:
                stream = TcpStream(raw)
            # An HTTP(S) listener: HTTP/1.1 or h2c whenever the client speaks, never TCP.
            await serve_stream(stream, self.proxy, peer, None, timeouts=self.timeouts,
                               declared=Declared.HTTP)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    raw, address = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    _log.warning("accept failed", reason=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(handle, raw, address)

    async def run_mesh(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        from common.certs import CertificateStore
        from common.csr import csr_issuer
        from common.discovery import Discovery, SnapshotHolder
        from common.hbone import HbonePool, tls_connector
        from common.kube import KubeClient
        from common.kube.config import load_config
        from waypoint.gateway_status import keep_status
        from waypoint.upstream import MeshTransport

        o = self.options
        identity = o.identity
        certs = CertificateStore(csr_issuer(o.csr_url))
        await certs.get(identity)

        async def context_for(_source: SpiffeId | None) -> Any:
            await certs.get(identity)
            return certs.client_context(identity)

        holder = SnapshotHolder()
        async with KubeClient(load_config(o.server)) as client, \
                HbonePool(tls_connector(context_for)) as pool, trio.open_nursery() as nursery:
            await self.load_gateway(client)
            picks = [0]

            async def hbone(endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
                picks[0] += 1
                target = self.detours.target(endpoint, picks[0])
                with trio.fail_after(timeout):
                    return await pool.connect(
                        identity, target,
                        expected=[endpoint.identity] if endpoint.identity else [],
                        authority=(f"[{endpoint.ip}]:{endpoint.port}" if ":" in endpoint.ip
                                   else f"{endpoint.ip}:{endpoint.port}"))

            transport = ProtocolTransport(MeshTransport(hbone))
            self.transport = transport
            self.clusters.transport = transport
            self.proxy.mirror = Mirrorer(nursery)
            nursery.start_soon(certs.run_renewals)
            nursery.start_soon(Discovery(client, holder).run)
            nursery.start_soon(self.follow, holder)
            nursery.start_soon(self.clusters.run_sweeps)
            nursery.start_soon(self.refresh, client)
            nursery.start_soon(lambda: keep_status(client, self, holder,
                                                   certificates=lambda: self.certs))
            for port, server in self.admin_servers():
                nursery.start_soon(server.serve, listen_tcp("0.0.0.0", port))
            for lst in self.listeners:
                nursery.start_soon(self.serve_listener, lst, listen(lst.port))
            _log.info("ingress gateway serving", gateway=f"{o.namespace}/{o.name}",
                      listeners=[f"{lst.name}:{lst.protocol}:{lst.port}"
                                 for lst in self.listeners])
            task_status.started()
