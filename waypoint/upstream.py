"""Upstream HTTP/1.1 connections of the waypoint, pooled per endpoint, over a Transport.

Theory of operation.  A :class:`Transport` opens a byte stream to one endpoint: an
HBONE tunnel in the mesh (``CONNECT podIP:port`` to ``podIP:15008`` with the
waypoint's identity, the endpoint's workload identity expected), plain TCP in bench
mode or to endpoints outside the mesh.  On that stream an
:class:`UpstreamConnection` carries one HTTP/1.1 exchange at a time with the
sans-I/O codec of :mod:`waypoint.http`.

Connections are pooled per endpoint by :class:`ConnectionPool` (one per cluster),
under the cluster's :class:`~waypoint.resilience.CircuitBreaker`: an idle
connection is reused (most recently used first, so the others can reach their
idle timeout); else a new one is opened if ``maxConnections`` allows; else the
request waits as *pending* if ``http1MaxPendingRequests`` allows, and otherwise
overflows (:class:`PoolOverflow`, answered 503 ``x-envoy-overloaded``).  The
bookkeeping between two awaits is synchronous, so a cancelled request cannot leak
a connection slot; closes run shielded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from common.errors import ConnectRefusedError, ConnectTimeoutError, MeshError, UpstreamError
from common.identity import SpiffeId
from common.tcp import open_tcp as open_tcp  # re-exported: waypoint.egress dials with it
from waypoint.http import NEED_DATA, Event, RequestWriter, ResponseParser, Signal
from waypoint.resilience import CircuitBreaker, Host

#: One read from an upstream: a small response arrives whole, a large one in few reads.
READ_SIZE = 64 * 1024

#: What a broken upstream stream raises (TCP, TLS, HBONE streams).
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError, trio.ClosedResourceError, OSError, MeshError)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """How to reach one endpoint: its address, and the identity it must present.

    ``hbone`` selects the tunnel (the endpoint's workload is in the mesh);
    ``identity`` is the workload's SPIFFE identity the tunnel expects.
    """

    ip: str
    port: int
    identity: SpiffeId | None = None
    hbone: bool = False


class Transport(Protocol):
    """Opens a byte stream to an endpoint; raises :class:`~common.errors.UpstreamError`."""

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        ...


class TcpTransport:
    """Plain TCP (bench mode, and endpoints whose workload is not in the mesh)."""

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        try:
            with trio.fail_after(timeout):
                return await open_tcp(endpoint.ip, endpoint.port)
        except trio.TooSlowError as exc:
            raise ConnectTimeoutError(
                f"no TCP connection to {endpoint.ip}:{endpoint.port} within {timeout:g} s; "
                f"is the endpoint up and reachable from the waypoint?") from exc
        except OSError as exc:
            raise ConnectRefusedError(
                f"cannot connect to {endpoint.ip}:{endpoint.port}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}; "
                f"is the backend listening on that port?") from exc


HboneConnect = Callable[[EndpointInfo, float], Awaitable[trio.abc.Stream]]


class MeshTransport:
    """HBONE to endpoints in the mesh, plain TCP to the others."""

    def __init__(self, hbone: HboneConnect, tcp: Transport | None = None) -> None:
        self._hbone = hbone
        self._tcp = tcp or TcpTransport()

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        if endpoint.hbone:
            return await self._hbone(endpoint, timeout)
        return await self._tcp.connect(endpoint, timeout)


class PoolOverflow(UpstreamError):
    """The cluster's connection pool is full and so is its pending queue."""


class UpstreamConnection:
    """One upstream HTTP/1.1 connection: the stream and its codec state."""

    __slots__ = ("endpoint", "host", "idle_since", "parser", "served", "stream", "writer")

    def __init__(self, stream: trio.abc.Stream, host: Host, endpoint: EndpointInfo) -> None:
        self.stream = stream
        self.host = host
        self.endpoint = endpoint
        self.parser = ResponseParser()
        self.writer = RequestWriter()
        self.served = 0
        self.idle_since = 0.0

    async def next_event(self) -> Event:
        """The next response event, reading as needed (EOF is fed to the parser)."""
        parser = self.parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                data = await self.stream.receive_some(READ_SIZE)
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
                continue
            if isinstance(event, Signal):
                raise trio.BrokenResourceError(
                    "the upstream connection can carry no more responses")
            return event

    @property
    def reusable(self) -> bool:
        return not (self.parser.must_close or self.writer.must_close)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
            await self.stream.aclose()


class ConnectionPool:
    """Idle connections of one cluster, per endpoint, under the cluster's circuit breaker."""

    def __init__(self, breaker: CircuitBreaker, transport: Transport) -> None:
        self.breaker = breaker
        self.transport = transport
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._released = trio.lowlevel.ParkingLot()

    def idle_count(self, address: str | None = None) -> int:
        if address is not None:
            return len(self._idle.get(address, ()))
        return sum(len(v) for v in self._idle.values())

    async def acquire(self, host: Host, endpoint: EndpointInfo) -> UpstreamConnection:
        """A connection to ``host``: idle, new, or after waiting as pending.

        Raises :class:`PoolOverflow` when neither a connection nor a pending slot is
        free, and the transport's :class:`~common.errors.UpstreamError` on connect
        failure.
        """
        settings = self.breaker.settings
        while True:
            idle = self._idle.get(host.address)
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                timeout = settings.http_idle_timeout
                if timeout is None or now - conn.idle_since < timeout:
                    return conn
                await self._discard(conn)
            if self.breaker.try_connection():
                try:
                    stream = await self.transport.connect(endpoint, settings.connect_timeout)
                except BaseException:
                    self.breaker.release_connection()
                    self._released.unpark()
                    raise
                return UpstreamConnection(stream, host, endpoint)
            if not self.breaker.try_pending():
                raise PoolOverflow(f"connection pool of {len(self._idle)} endpoint(s) full "
                                   f"and {self.breaker.pending_requests} request(s) pending")
            try:
                await self._released.park()
            finally:
                self.breaker.release_pending()

    async def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return ``conn`` after a complete exchange (``reusable``) or close it."""
        conn.served += 1
        if reusable and conn.reusable and not self.breaker.connection_exhausted(conn.served):
            conn.idle_since = trio.current_time()
            self._idle.setdefault(conn.host.address, []).append(conn)
            if self._released:
                self._released.unpark()
            return
        await self._discard(conn)

    async def _discard(self, conn: UpstreamConnection) -> None:
        self.breaker.release_connection()
        self._released.unpark()
        await conn.aclose()

    async def close_idle(self, keep: set[str] | None = None) -> None:
        """Close idle connections (to endpoints not in ``keep``; all when None)."""
        for address in list(self._idle):
            if keep is not None and address in keep:
                continue
            for conn in self._idle.pop(address):
                await self._discard(conn)
