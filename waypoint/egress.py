"""Egress through a waypoint: ServiceEntry hosts as route targets, and how to dial them.

Theory of operation.  A ServiceEntry that uses a waypoint (``istio.io/use-waypoint`` on
the entry or its namespace, see :func:`common.service_entries.entry_index`) has its
traffic sent there by ztunnel over HBONE, ``:authority`` = the entry's address and port.
The waypoint routes it with the same engine as a Service's:

* routing sees each entry host as an :class:`ExternalServiceInfo`, a
  :class:`~waypoint.routing.catalog.ServiceInfo` whose host name is the entry's host
  (``api.example.com``, not ``<name>.<ns>.svc``) and whose VIPs are the entry's
  addresses, so VirtualServices and DestinationRules on the host apply (retries,
  timeouts, header matches, subsets by endpoint labels) and L7 policy runs as usual.
  Its key is ``(namespace, host)``: a host has dots, a Service name never does, so the
  two cannot collide;
* its clusters' endpoints (:func:`waypoint.clusters.snapshot_endpoints`) are
  :class:`ExternalEndpoint` values: ``resolution: STATIC`` (or DNS with endpoints) dials
  ``endpoints[].address`` on the port named like the entry's port (else its
  ``targetPort``); DNS without endpoints dials the host, resolved at connect time by the
  waypoint (Envoy's LOGICAL_DNS); NONE dials the entry's own addresses;
* :class:`EgressTransport` dials them as plain TCP (an external endpoint is not in the
  mesh: never HBONE), then originates TLS when the cluster's DestinationRule says
  ``tls.mode: SIMPLE`` (:mod:`waypoint.tls_origination`).  Upstream is always HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from common.errors import ConnectRefusedError, ConnectTimeoutError, MeshError
from common.logging import get_logger
from common.model import Snapshot, WaypointRef
from common.service_entries import ExternalService, entry_index, resolve_entry_host
from common.tcp import open_tcp
from waypoint.routing.catalog import DEFAULT_DOMAIN, ServiceInfo, ServicePortInfo
from waypoint.tls_origination import SHARED_CONTEXTS, ContextCache, Origination, originate
from waypoint.upstream import EndpointInfo, Transport

__all__ = ["EgressTransport", "ExternalEndpoint", "ExternalServiceInfo", "egress_served",
           "egress_service_infos"]

_log = get_logger("waypoint.egress")


@dataclass(frozen=True, slots=True)
class ExternalServiceInfo(ServiceInfo):
    """A ServiceEntry host as routing sees it (``name`` is the host, for a unique key)."""

    host: str = ""

    @property
    def hostname(self) -> str:
        return self.host


def external_service_info(entry: ExternalService, domain: str = DEFAULT_DOMAIN
                          ) -> ExternalServiceInfo:
    ports = tuple(ServicePortInfo(port=p.number, name=p.name, protocol=p.protocol or "TCP",
                                  target_port=p.target_port) for p in entry.ports)
    return ExternalServiceInfo(name=entry.host, namespace=entry.namespace, ports=ports,
                               vips=entry.addresses, domain=domain, host=entry.host)


def egress_service_infos(snapshot: Snapshot, waypoint: WaypointRef | None = None
                         ) -> list[ExternalServiceInfo]:
    """The entry hosts of the mesh (any route may name one as a backend), one entry per
    host: where entries of several namespaces name one host, the one that uses
    ``waypoint`` wins, else the oldest (routes name hosts, not entries)."""
    chosen: dict[str, ExternalService] = {}
    for entry in entry_index(snapshot).by_key.values():  # oldest first
        current = chosen.get(entry.host)
        if current is None or (waypoint is not None and entry.waypoint == waypoint
                               and current.waypoint != waypoint):
            chosen[entry.host] = entry
    return [external_service_info(e, snapshot.domain) for e in chosen.values()]


def egress_served(snapshot: Snapshot, waypoint: WaypointRef) -> set[tuple[str, str]]:
    """The keys of the entry hosts whose traffic ``waypoint`` carries."""
    return {e.key for e in entry_index(snapshot).using(waypoint)}


@dataclass(frozen=True, slots=True)
class ExternalEndpoint(EndpointInfo):
    """An endpoint outside the mesh.  With ``resolve``, ``ip`` holds a host name that is
    resolved when a connection is opened; ``origination`` asks for TLS to it."""

    resolve: bool = False
    origination: Origination | None = None


Dial = Callable[[str, int], Awaitable[trio.abc.Stream]]
Resolve = Callable[[str, int], Awaitable[tuple[str, int]]]


class EgressTransport:
    """A :class:`~waypoint.upstream.Transport` that dials :class:`ExternalEndpoint` values
    itself (resolve, TCP, maybe TLS) and hands every other endpoint to ``inner``."""

    def __init__(self, inner: Transport, *, dial: Dial = open_tcp,
                 resolve: Resolve = resolve_entry_host,
                 contexts: ContextCache = SHARED_CONTEXTS) -> None:
        self.inner = inner
        self._dial = dial
        self._resolve = resolve
        self._contexts = contexts

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        if type(endpoint) is not ExternalEndpoint:
            return await self.inner.connect(endpoint, timeout)
        try:
            return await self._external(endpoint, timeout)
        except MeshError as exc:
            # The pipeline answers 503 (connect failure) without the reason: say it here.
            _log.warning("external endpoint unreachable", endpoint=endpoint.ip,
                         port=endpoint.port, reason=str(exc))
            raise

    async def _external(self, endpoint: ExternalEndpoint, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        where = f"{endpoint.ip}:{endpoint.port}"
        phase = "resolve" if endpoint.resolve else "connect"
        with trio.move_on_after(timeout) as scope:
            ip, port = endpoint.ip, endpoint.port
            if endpoint.resolve:
                ip, port = await self._resolve(ip, port)
                where = f"{endpoint.ip} ({ip}:{port})"
            phase = "connect"
            try:
                stream = await self._dial(ip, port)
            except OSError as exc:
                raise ConnectRefusedError(
                    f"cannot connect to external endpoint {where}: {exc.strerror or exc} (is "
                    f"it reachable from the waypoint? check the ServiceEntry's endpoints and "
                    f"ports)") from exc
            if endpoint.origination is None:
                return stream
            phase = "TLS handshake"
            return await originate(stream, endpoint.origination, where, self._contexts)
        assert scope.cancelled_caught
        raise ConnectTimeoutError(f"no {phase} with external endpoint {where} within "
                                  f"{timeout:g} s")
