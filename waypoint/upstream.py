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
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from common.errors import ConnectRefusedError, ConnectTimeoutError, MeshError, UpstreamError
from common.identity import SpiffeId
from common.tcp import TcpStream, open_tcp
from waypoint.http import NEED_DATA, Event, RequestWriter, ResponseParser, Signal
from waypoint.resilience import CircuitBreaker, Host
from waypoint.resilience.timeouts import Alarms

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

    __slots__ = ("endpoint", "host", "idle_since", "interrupted", "parser", "served", "stream",
                 "writer")

    def __init__(self, stream: trio.abc.Stream, host: Host, endpoint: EndpointInfo) -> None:
        self.stream = stream
        self.host = host
        self.endpoint = endpoint
        self.parser = ResponseParser()
        self.writer = RequestWriter()
        self.served = 0
        self.idle_since = 0.0
        self.interrupted = False
        """:meth:`interrupt` ran: the try on this connection overran its deadline."""

    @property
    def interruptible(self) -> bool:
        """Whether :meth:`interrupt` can stop an exchange on it (a plain TCP stream can
        be closed synchronously; other streams need a cancel scope around the try)."""
        return type(self.stream) is TcpStream

    def interrupt(self) -> None:
        """The try's deadline passed (called by :class:`TryTimer`): close the stream at
        once, so the task waiting on it, or its next call, gets ClosedResourceError.
        The connection is never reused after this."""
        self.interrupted = True
        stream = self.stream
        assert isinstance(stream, TcpStream)
        stream.close()

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

    def take_interruptible(self, host: Host) -> UpstreamConnection | None:
        """The connection :meth:`acquire` would return at once, if it is idle, within its
        idle timeout and :attr:`~UpstreamConnection.interruptible`; else ``None`` (and
        :meth:`acquire` decides, waiting or connecting as needed)."""
        idle = self._idle.get(host.address)
        if not idle:
            return None
        conn = idle[-1]
        if not conn.interruptible:
            return None
        timeout = self.breaker.settings.http_idle_timeout
        if timeout is not None and trio.current_time() - conn.idle_since >= timeout:
            return None
        return idle.pop()

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


class TryTimer:
    """Per-try deadlines of upstream exchanges, without a cancel scope per try.

    Theory of operation.  A trio cancel scope per try cost more CPU than the rest of a
    small request's routing (about 40 us of 300 on the bench machine), and nearly every
    try ends long before its deadline.  So one timer task serves all tries: a try on an
    idle plain-TCP connection registers ``(deadline, connection)`` in an
    :class:`~waypoint.resilience.timeouts.Alarms` heap (a push) and cancels it when it
    ends (a mark).  The timer sleeps until the earliest live deadline and, when one
    passes, calls :meth:`UpstreamConnection.interrupt`: the stream is closed at once, so
    the try's wait (or its next call on the stream) raises ClosedResourceError, and the
    pipeline, seeing ``conn.interrupted``, treats the try as timed out exactly as a
    cancel scope's deadline would have (504 ``upstream request timeout``, or a retry
    after a per-try timeout).  Tries that may wait on anything else (a new connection,
    a pending slot, a streamed request body, a stream that cannot be closed
    synchronously) keep a cancel scope.

    The timer is a trio system task, started by the first :meth:`start` of each run; it
    sleeps without a deadline while nothing is registered.  Wake-ups are rare: after one,
    the cancelled entries at the top are dropped and it sleeps until the next live
    deadline, a try still in flight.
    """

    def __init__(self) -> None:
        self._alarms: Alarms[UpstreamConnection] = Alarms()
        self._armed = math.inf
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self, deadline: float, conn: UpstreamConnection) -> list[Any]:
        """Interrupt ``conn`` at ``deadline`` unless :meth:`stop` is called first."""
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            self._token = token
            self._alarms = Alarms()
            self._armed = math.inf
            self._scope = None
            trio.lowlevel.spawn_system_task(self._watch, self._alarms,
                                            name="waypoint per-try timer")
        entry = self._alarms.add(deadline, conn)
        if deadline < self._armed:
            self._armed = deadline
            if self._scope is not None:
                self._scope.deadline = deadline
        return entry

    def stop(self, entry: list[Any]) -> None:
        """The try ended (whether or not it was interrupted)."""
        self._alarms.cancel(entry)

    async def _watch(self, alarms: Alarms[UpstreamConnection]) -> None:
        while alarms is self._alarms:
            with trio.CancelScope(deadline=self._armed) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            for conn in alarms.pop_due(trio.current_time()):
                conn.interrupt()
            self._armed = alarms.next_deadline()


class SendBatcher:
    """Small writes of many connections, sent together when the scheduler's batch ends.

    Theory of operation.  Under load, one pass of trio's scheduler runs the tasks of many
    connections that became ready together; each used to send its upstream request or
    downstream response the moment it was ready, so the peer (the backend, the client)
    was woken once per write, with a request's worth of Python between two writes: on a
    small virtual machine a wake-up of a sleeping peer costs the sender more kernel time
    than the write itself, and the peer handles one message per wake-up.  Instead, a task
    whose next step is a wait for the reply (an upstream request sent whole, a keep-alive
    response ended) hands its bytes to :meth:`defer` and goes on to that wait; a system
    task, woken by the first deferral of a pass, runs in the scheduler's next pass (trio
    runs the tasks rescheduled during a pass only after it) and writes every deferred
    buffer back to back, synchronously, before new I/O events are handled.

    Order on a stream is kept: bytes deferred for one stream go out in the order given;
    its owner calls :meth:`drain` before any send of its own, and :meth:`release` (a
    best-effort write without waiting) before closing it.  A write the kernel takes only
    in part (a peer that stopped reading) is finished by a system task of its own with
    ``send_all``; later deferrals for that stream queue behind it.  A write that fails
    closes the stream, so that its owner's pending receive fails (as its own send would
    have); a stream its owner closed meanwhile is skipped.
    """

    __slots__ = ("_busy", "_parked", "_pending", "_task", "_token")

    def __init__(self) -> None:
        self._pending: dict[TcpStream, list[bytes]] = {}
        # Streams whose partial write a finisher task completes: its queue, and its end.
        self._busy: dict[TcpStream, tuple[list[bytes], trio.Event]] = {}
        self._task: trio.lowlevel.Task | None = None
        self._parked = False
        self._token: trio.lowlevel.TrioToken | None = None

    def defer(self, stream: TcpStream, data: bytes) -> None:
        """Send ``data`` on ``stream`` once the current scheduler pass has ended."""
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            self._token = token
            self._pending = {}
            self._busy = {}
            self._task = None
            self._parked = False
            trio.lowlevel.spawn_system_task(self._run, name="waypoint send batch")
        busy = self._busy.get(stream)
        if busy is not None:
            busy[0].append(data)
            return
        pending = self._pending.get(stream)
        if pending is None:
            self._pending[stream] = [data]
        else:
            pending.append(data)
        if self._parked:
            self._parked = False
            assert self._task is not None
            trio.lowlevel.reschedule(self._task)

    async def drain(self, stream: TcpStream) -> None:
        """Send what is deferred for ``stream`` now, in this task (its owner's, before a
        send of its own), waiting as ``send_all`` does."""
        busy = self._busy.get(stream)
        if busy is not None:
            await busy[1].wait()
        chunks = self._pending.pop(stream, None)
        if chunks:
            await stream.send_all(b"".join(chunks))

    def release(self, stream: TcpStream) -> None:
        """Before ``stream`` is closed: write what is deferred for it if the kernel takes it
        now (a close never waits on a peer that stopped reading), forget the rest."""
        chunks = self._pending.pop(stream, None)
        if chunks:
            with contextlib.suppress(*STREAM_ERRORS, trio.BusyResourceError):
                stream.try_send(b"".join(chunks))

    async def _run(self) -> None:
        self._task = trio.lowlevel.current_task()
        while True:
            pending = self._pending
            if pending:
                self._pending = {}
                for stream, chunks in pending.items():
                    self._write(stream, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            self._parked = True
            await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._parked = False  # cancelled: the run is ending
        return trio.lowlevel.Abort.SUCCEEDED

    def _write(self, stream: TcpStream, data: bytes) -> None:
        try:
            sent = stream.try_send(data)
        except trio.ClosedResourceError:
            return  # its owner closed it: nothing left to deliver
        except (trio.BrokenResourceError, trio.BusyResourceError):
            stream.close()
            return
        if sent < len(data):
            self._busy[stream] = ([], trio.Event())
            trio.lowlevel.spawn_system_task(self._finish, stream, data[sent:],
                                            name="waypoint send batch: partial write")

    async def _finish(self, stream: TcpStream, rest: bytes) -> None:
        queue, done = self._busy[stream]
        try:
            await stream.send_all(rest)
            while queue:
                await stream.send_all(queue.pop(0))
        except STREAM_ERRORS:
            stream.close()
        finally:
            del self._busy[stream]
            done.set()
