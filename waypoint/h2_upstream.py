"""Upstream HTTP/2 (h2c) for the waypoint: multiplexed connections behind the pool.

Theory of operation.  The pipeline (:mod:`waypoint.proxy`) and its pool
(:class:`~waypoint.upstream.ConnectionPool`) speak HTTP/1.1 to a byte stream from a
:class:`~waypoint.upstream.Transport`.  :class:`ProtocolTransport` wraps the real
transport and, when the request must go upstream as HTTP/2, hands the pool an
:class:`H1OverH2Stream` instead of a socket: a virtual HTTP/1.1 connection whose
every request becomes one stream on a shared, multiplexed :class:`H2ClientConnection`
to that endpoint (another connection is opened when the peer's
``MAX_CONCURRENT_STREAMS`` is reached).  The pool, the circuit breaker, retries and
outlier detection thus work unchanged; trailers travel as chunked trailers between
the two halves.

When HTTP/2 is used (Istio's protocol selection): the downstream request is HTTP/2
(the HTTP/2 shell marks its stream tasks with :func:`mark_downstream_h2`), or the
endpoint's service port is declared HTTP/2 or gRPC (``h2_endpoint`` predicate, see
:func:`waypoint.grpc.wants_h2`).

No background task: whichever exchange needs a frame reads the socket (under a
lock) and dispatches every event it finds to the exchanges they belong to, waking
those that wait; when it is done reading it wakes one waiter to take its place.
Response DATA is credited back (WINDOW_UPDATE) only when the pipeline asks for
more, i.e. after it wrote the previous bytes downstream; request DATA waits for
the peer's windows.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from common.logging import get_logger
from common.model import Snapshot
from waypoint import grpc
from waypoint.h2_writer import FrameWriter
from waypoint.http import (
    NEED_DATA,
    Data,
    EndOfMessage,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseWriter,
)
from waypoint.upstream import READ_SIZE, STREAM_ERRORS, EndpointInfo, Transport

_log = get_logger("waypoint.h2_upstream")

STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te", b"host"})

_downstream_h2: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "waypoint_downstream_h2", default=False)


def mark_downstream_h2() -> None:
    """Mark the current task as serving an HTTP/2 request (its upstream speaks h2 too)."""
    _downstream_h2.set(True)


class _Exchange:
    """One request stream on an :class:`H2ClientConnection`."""

    __slots__ = ("events", "id", "reset", "unacked", "waiting")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.events: deque[h2.events.Event] = deque()
        self.reset: int | None = None
        self.unacked = 0
        self.waiting: trio.Event | None = None

    def wake(self) -> None:
        if self.waiting is not None:
            self.waiting.set()
            self.waiting = None


class H2ClientConnection:
    """One multiplexed HTTP/2 connection to an endpoint."""

    def __init__(self, stream: trio.abc.Stream, address: str) -> None:
        self.stream = stream
        self.address = address
        # Requests are built from the pipeline's validated head; responses are checked
        # again by the pipeline's HTTP/1.1 parser after translation, so h2's own
        # per-field checks (a large share of its cost) are skipped here.
        config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False,
                                           validate_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
        self.writer = FrameWriter(self.h2, stream)
        self.exchanges: dict[int, _Exchange] = {}
        self.broken: str | None = None
        self.goaway = False
        self._read_lock = trio.Lock()
        # Exchanges waiting while another task reads; woken for their own events.
        self._waiters: dict[int, _Exchange] = {}
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)

    @property
    def available(self) -> bool:
        return (self.broken is None and not self.goaway
                and len(self.exchanges) < self.h2.remote_settings.max_concurrent_streams)

    def _check(self, ex: _Exchange) -> None:
        if ex.reset is not None:
            raise trio.BrokenResourceError(
                f"upstream {self.address} reset the HTTP/2 stream (error {ex.reset})")
        if self.broken is not None:
            raise trio.BrokenResourceError(
                f"HTTP/2 connection to {self.address} broke: {self.broken}")

    async def send_pending(self) -> None:
        try:
            await self.writer.flush()
        except STREAM_ERRORS as exc:
            self._break(str(exc))
            raise

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            _log.debug("upstream HTTP/2 connection ended", upstream=self.address, reason=reason,
                       streams=len(self.exchanges))
        for ex in self._waiters.values():
            ex.wake()
        self._waiters.clear()

    async def wait_for(self, ex: _Exchange, ready: Callable[[], bool]) -> None:
        """Return once ``ready()``: read the socket when nobody else does, else wait to
        be woken by the reader (for ``ex``'s own events, or to take its place)."""
        try:
            while not ready():
                self._check(ex)
                if not self._read_lock.locked():
                    await self._read_once()
                    continue
                woken = ex.waiting = trio.Event()
                self._waiters[ex.id] = ex
                try:
                    await woken.wait()
                finally:
                    self._waiters.pop(ex.id, None)
                    ex.waiting = None
        finally:
            # Whoever stops waiting hands the reading role on, so no waiter is left
            # without a reader (the wake-up it got may have been that hand-off).
            if self._waiters and not self._read_lock.locked():
                next(iter(self._waiters.values())).wake()

    async def _read_once(self) -> None:
        async with self._read_lock:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except STREAM_ERRORS as exc:
                self._break(str(exc))
                raise trio.BrokenResourceError(
                    f"HTTP/2 connection to {self.address} broke: {exc}") from exc
            if not data:
                self._break("the upstream closed the connection")
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._break(f"protocol error: {exc}")
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            for event in events:
                self._dispatch(event)
        with contextlib.suppress(*STREAM_ERRORS):
            await self.send_pending()

    def _dispatch(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id or 0
            for ex in self.exchanges.values():
                if ex.id > last:
                    ex.reset = h2.errors.ErrorCodes.REFUSED_STREAM
                    ex.wake()
            return
        if not sid:  # connection-wide (window, settings): anyone sending may proceed
            if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                for ex in self._waiters.values():
                    ex.wake()
            return
        found = self.exchanges.get(sid)
        if found is None:
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            return
        ex = found
        ex.wake()
        if isinstance(event, h2.events.StreamReset):
            ex.reset = event.error_code
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.DataReceived,
                                h2.events.TrailersReceived, h2.events.StreamEnded)):
            ex.events.append(event)

    def open(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _Exchange:
        sid = self.h2.get_next_available_stream_id()
        ex = self.exchanges[sid] = _Exchange(sid)
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        return ex

    async def send_data(self, ex: _Exchange, data: bytes | memoryview) -> None:
        view = memoryview(data)
        conn = self.h2
        while view:
            self._check(ex)
            window = min(conn.local_flow_control_window(ex.id), conn.max_outbound_frame_size)
            if window <= 0:
                await self.send_pending()
                await self.wait_for(ex, lambda: conn.local_flow_control_window(ex.id) > 0)
                continue
            n = min(window, len(view))
            conn.send_data(ex.id, view[:n].tobytes())
            view = view[n:]
        await self.send_pending()

    async def end(self, ex: _Exchange) -> None:
        self._check(ex)
        self.h2.end_stream(ex.id)
        await self.send_pending()

    async def next_event(self, ex: _Exchange) -> h2.events.Event:
        if not ex.events:
            await self.wait_for(ex, lambda: bool(ex.events))
        return ex.events.popleft()

    def acknowledge(self, ex: _Exchange) -> None:
        if ex.unacked:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.acknowledge_received_data(ex.unacked, ex.id)
            ex.unacked = 0

    def finish(self, ex: _Exchange, complete: bool) -> None:
        """Forget ``ex``; reset it when the exchange did not complete."""
        self.exchanges.pop(ex.id, None)
        if not complete and self.broken is None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.reset_stream(ex.id, h2.errors.ErrorCodes.CANCEL)
        for event in ex.events:
            if isinstance(event, h2.events.DataReceived):
                ex.unacked += event.flow_controlled_length
        self.acknowledge(ex)

    async def aclose(self) -> None:
        self._break("closed by the waypoint")
        with trio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
            await self.stream.aclose()


class H1OverH2Stream(trio.abc.Stream):
    """An HTTP/1.1 byte stream for the pool whose requests travel as HTTP/2 streams."""

    def __init__(self, transport: ProtocolTransport, endpoint: EndpointInfo,
                 timeout: float) -> None:
        self._transport = transport
        self._endpoint = endpoint
        self._timeout = timeout
        self._parser = RequestParser()
        self._writer = ResponseWriter()
        self._conn: H2ClientConnection | None = None
        self._ex: _Exchange | None = None
        self._method = b"GET"
        self._grpc = False
        self._out: list[bytes | memoryview] = []
        self._response_done = True
        self._request_done = True
        self._chunked = False
        self._closed = False

    # --- request side --------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        parser = self._parser
        parser.feed(bytes(data))
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, RequestHead):
                await self._open(event)
            elif isinstance(event, Data):
                if self._conn is None or self._ex is None:
                    raise trio.BrokenResourceError("the HTTP/2 exchange already ended")
                await self._conn.send_data(self._ex, event.data)
            elif isinstance(event, EndOfMessage):
                if not self._request_done and self._conn is not None and self._ex is not None:
                    await self._conn.end(self._ex)
                self._request_done = True
            else:
                raise trio.BrokenResourceError(f"unexpected {event!r} in a request")

    async def _open(self, head: RequestHead) -> None:
        authority = b""
        pairs: list[tuple[bytes, bytes]] = []
        for name, value in head.headers:
            if name == b"host":
                authority = value
            elif name not in _HOP:
                pairs.append((name, value))
        self._grpc = grpc.is_grpc(pairs)
        if self._grpc:
            pairs.append((b"te", b"trailers"))
        headers = [(b":method", head.method), (b":scheme", b"http"),
                   (b":authority", authority or self._endpoint.ip.encode()),
                   (b":path", head.target), *pairs]
        conn = await self._transport.h2_connection(self._endpoint, self._timeout)
        self._conn = conn
        self._request_done = not head.has_body
        self._ex = conn.open(headers, end_stream=self._request_done)
        self._method = head.method
        self._response_done = False
        self._chunked = False
        self._writer = ResponseWriter()
        await conn.send_pending()

    # --- response side -------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if not self._out:
            await self._fill()
        data = b"".join(self._out)
        self._out.clear()
        if max_bytes is not None and len(data) > max_bytes:
            self._out.append(data[max_bytes:])
            data = data[:max_bytes]
        return data

    async def _fill(self) -> None:
        conn, ex = self._conn, self._ex
        if conn is None or ex is None or self._response_done:
            raise trio.BrokenResourceError("no HTTP/2 exchange in progress")
        # The pipeline asks again only after writing what it got: credit that now.
        conn.acknowledge(ex)
        event = await conn.next_event(ex)
        self._convert(event)
        while self._ex is not None and ex.events and not self._response_done:
            self._convert(ex.events.popleft())
        await conn.send_pending()

    def _convert(self, event: h2.events.Event) -> None:
        ex = self._ex
        assert ex is not None and self._conn is not None
        out = self._out
        if isinstance(event, h2.events.ResponseReceived):
            status = 200
            pairs: list[tuple[bytes, bytes]] = []
            for name, value in event.headers or ():
                n, v = bytes(name), bytes(value)
                if n == b":status":
                    status = int(v)
                elif n[:1] != b":":
                    pairs.append((n, v))
            # Chunked whenever trailers may follow (gRPC) or the length is unknown.
            if grpc.is_grpc(pairs) or not any(n == b"content-length" for n, _ in pairs):
                pairs = [p for p in pairs if p[0] != b"content-length"]
                pairs.append((b"transfer-encoding", b"chunked"))
                self._chunked = True
            head = ResponseHead(status=status, headers=pairs)
            out.append(self._writer.head(head, self._method))
        elif isinstance(event, h2.events.DataReceived):
            ex.unacked += event.flow_controlled_length
            if event.data:
                out.extend(self._writer.data(event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            trailers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
            self._finish(trailers if self._chunked else [])
        elif isinstance(event, h2.events.StreamEnded) and not self._response_done:
            self._finish([])

    def _finish(self, trailers: list[tuple[bytes, bytes]]) -> None:
        conn, ex = self._conn, self._ex
        assert conn is not None and ex is not None
        self._out.append(self._writer.end(trailers))
        self._response_done = True
        # A request still being sent when the response ended is reset (RFC 9113 8.1).
        conn.finish(ex, complete=self._request_done)
        self._ex = None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._conn is not None and self._ex is not None:
            self._conn.finish(self._ex, complete=False)
            with trio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
                await self._conn.send_pending()
        await trio.lowlevel.checkpoint()


class ProtocolTransport:
    """A :class:`~waypoint.upstream.Transport` that speaks HTTP/2 upstream when asked."""

    def __init__(self, inner: Transport,
                 h2_endpoint: Callable[[EndpointInfo], bool] = lambda _: False) -> None:
        self.inner = inner
        self.h2_endpoint = h2_endpoint
        self._conns: dict[EndpointInfo, list[H2ClientConnection]] = {}
        self._connecting: dict[EndpointInfo, trio.Lock] = {}

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        if _downstream_h2.get() or self.h2_endpoint(endpoint):
            await trio.lowlevel.checkpoint()
            return H1OverH2Stream(self, endpoint, timeout)
        return await self.inner.connect(endpoint, timeout)

    async def h2_connection(self, endpoint: EndpointInfo, timeout: float  # noqa: ASYNC109
                            ) -> H2ClientConnection:
        """A connection to ``endpoint`` with room for one more stream."""
        lock = self._connecting.setdefault(endpoint, trio.Lock())
        async with lock:
            conns = self._conns.setdefault(endpoint, [])
            for conn in list(conns):
                if conn.broken is not None or (conn.goaway and not conn.exchanges):
                    conns.remove(conn)
                    await conn.aclose()
            for conn in conns:
                if conn.available:
                    return conn
            stream = await self.inner.connect(endpoint, timeout)
            conn = H2ClientConnection(stream, f"{endpoint.ip}:{endpoint.port}")
            conns.append(conn)
            await conn.send_pending()
            return conn

    async def aclose(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                await conn.aclose()
        self._conns.clear()


def snapshot_h2_endpoints(current: Callable[[], Snapshot]) -> Callable[[EndpointInfo], bool]:
    """An ``h2_endpoint`` predicate from discovery: the endpoint serves a service port
    declared HTTP/2 or gRPC (:func:`waypoint.grpc.wants_h2`).  The index is built once
    per snapshot version (connections are opened far more often than snapshots change)."""
    cache: dict[str, Any] = {"version": None, "h2": frozenset()}

    def index(snap: Snapshot) -> frozenset[tuple[str, int]]:
        found: set[tuple[str, int]] = set()
        for service in snap.services_by_key.values():
            for port in service.ports:
                if not grpc.wants_h2(port.name, port.app_protocol):
                    continue
                for ep in service.ready_endpoints:
                    target = ep.target_ports.get(port.port)
                    if target is None and isinstance(port.target_port, int):
                        target = port.target_port
                    if target is not None:
                        found.add((ep.ip, target))
        return frozenset(found)

    def is_h2(endpoint: EndpointInfo) -> bool:
        snap = current()
        if cache["version"] != snap.version:
            cache["h2"] = index(snap)
            cache["version"] = snap.version
        return (endpoint.ip, endpoint.port) in cache["h2"]

    return is_h2
