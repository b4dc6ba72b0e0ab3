"""The downstream HTTP/2 (h2c) connection: streams in, one task each, to the pipeline.

Theory of operation.  :class:`H2ServerConnection` owns one client byte stream that
began with the prior-knowledge preface (the listener sniffed it).  The ``h2``
library keeps the connection and stream state; one reader loop feeds it bytes and
dispatches its events.  Each request stream becomes an :class:`H2Stream`, which
is that request's :class:`~waypoint.proxy.Downstream`, served by its own task
calling :meth:`Proxy.handle <waypoint.proxy.Proxy.handle>` (the same pipeline as
HTTP/1.1: routing, splitting, retries, policy).

Flow control is the backpressure: request DATA is credited back to the client
(WINDOW_UPDATE) only when the pipeline asks for the next piece, i.e. after it
forwarded the previous one, so a stream holds at most one stream window
(``H2Settings.stream_window``) of unread body; response DATA is sent only as the
client's windows allow, and :meth:`H2Stream.flush` waits for them, which stops
the pipeline reading its upstream.  All sends go through one lock so frames from
many stream tasks never interleave mid-write.

Abuse bounds (each a GOAWAY ``ENHANCE_YOUR_CALM``, the connection then closes;
other connections are not affected): a token bucket of client RST_STREAM frames
(HTTP/2 rapid reset, CVE-2023-44487), a cap on the CONTINUATION frames and bytes
of one header block (CONTINUATION flood, CVE-2024-27316), checked on frame
headers before ``h2`` buffers anything.  ``SETTINGS_MAX_CONCURRENT_STREAMS`` is
100 and the decoded header list is bounded (``h2`` refuses a larger one).

gRPC: a local answer of the waypoint (no route, 503, 504, 403...) to a gRPC
request is sent trailers-only with the mapped ``grpc-status``
(:mod:`waypoint.grpc`).  An answer that came from the upstream is recognised by
the ``x-envoy-upstream-service-time`` header the pipeline adds to every proxied
response.

Deadlines: ``idle`` with no open stream (then GOAWAY NO_ERROR), ``stream_idle``
per stream while its request is in progress.  :meth:`H2ServerConnection.drain`
sends GOAWAY and lets open streams finish.
"""

from __future__ import annotations

import contextlib
import math
import struct
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from common.errors import ProtocolError
from common.logging import get_logger
from waypoint import grpc
from waypoint.h2_upstream import mark_downstream_h2
from waypoint.h2_writer import FrameWriter
from waypoint.http import Headers, RequestHead
from waypoint.proxy import PeerInfo, Proxy, ResponseAbortedError
from waypoint.upstream import STREAM_ERRORS

_log = get_logger("waypoint.h2")

READ_SIZE = 64 * 1024

# Response header names HTTP/2 forbids (RFC 9113 8.2.2); an HTTP/1.1 upstream sends them.
_ABNORMAL: tuple[type[BaseException], ...] = (ResponseAbortedError, *STREAM_ERRORS)
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade", b"te"})
_SERVICE_TIME = b"x-envoy-upstream-service-time"
_FRAME_HEADER = struct.Struct(">HBBBL")
_PREFACE_LENGTH = 24
_HEADERS = 0x1
_RST_STREAM = 0x3
_PUSH_PROMISE = 0x5
_GOAWAY = 0x7
_CONTINUATION = 0x9
_END_HEADERS = 0x4


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Settings:
    """What the shell offers clients and tolerates from them.

    Windows: a 1 MiB stream window lets one stream move data at full speed on a
    loopback or LAN link while bounding unread body per stream; the connection
    window covers 16 streams at once.  Timeouts follow Envoy (idle 1 h, stream
    idle 5 min).
    """

    max_concurrent_streams: int = 100
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_header_list_size: int = 64 * 1024
    max_continuation_frames: int = 32
    reset_burst: int = 200
    reset_rate: float = 100.0
    idle: float = 3600.0
    stream_idle: float = 300.0


class CalmDown(ProtocolError):
    """The client abused the connection (reset flood, CONTINUATION flood)."""


class FrameGuard:
    """Sans-I/O watch over the client's frame headers, before ``h2`` sees the bytes.

    Counts what ``h2`` does not bound: RST_STREAM frames per unit of time (a token
    bucket) and the CONTINUATION frames and bytes of one header block.  Raises
    :class:`CalmDown`.
    """

    def __init__(self, settings: H2Settings, now: float) -> None:
        self._settings = settings
        self._header = bytearray()
        self._skip = _PREFACE_LENGTH  # the client preface precedes the first frame
        self._in_block = False
        self._block_frames = 0
        self._block_bytes = 0
        self._tokens = float(settings.reset_burst)
        self._last = now

    def feed(self, data: bytes | bytearray, now: float) -> None:
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 9 - len(self._header)
            self._header += view[pos:pos + need]
            pos += min(need, end - pos)
            if len(self._header) < 9:
                return
            hi, lo, ftype, flags, _ = _FRAME_HEADER.unpack(self._header)
            self._header.clear()
            length = (hi << 8) | lo
            self._skip = length
            self._frame(ftype, flags, length, now)

    def _frame(self, ftype: int, flags: int, length: int, now: float) -> None:
        s = self._settings
        if ftype == _RST_STREAM:
            self._tokens = min(float(s.reset_burst),
                               self._tokens + (now - self._last) * s.reset_rate)
            self._last = now
            self._tokens -= 1.0
            if self._tokens < 0:
                raise CalmDown("too many RST_STREAM frames from the client (rapid reset)")
        elif ftype in (_HEADERS, _PUSH_PROMISE):
            self._in_block = not flags & _END_HEADERS
            self._block_frames = 0
            self._block_bytes = length
        elif ftype == _CONTINUATION and self._in_block:
            self._block_frames += 1
            self._block_bytes += length
            if (self._block_frames > s.max_continuation_frames
                    or self._block_bytes > s.max_header_list_size):
                raise CalmDown("header block too long (CONTINUATION flood)")
            if flags & _END_HEADERS:
                self._in_block = False


def request_head(headers: Sequence[tuple[bytes, bytes]], ended: bool) -> RequestHead:
    """The pipeline's view of an HTTP/2 request: pseudo-headers become the method,
    target and ``host``; split ``cookie`` fields are joined (RFC 9113 8.2.3)."""
    method = b"GET"
    path = b"/"
    authority: bytes | None = None
    pairs: Headers = []
    cookies: list[bytes] = []
    content_length: int | None = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host" and authority is not None:
            continue
        if name == b"content-length" and value.isdigit():
            content_length = int(value)
        pairs.append((name, value))
    if authority is not None:
        pairs.insert(0, (b"host", authority))
    if cookies:
        pairs.append((b"cookie", b"; ".join(cookies)))
    chunked = not ended and content_length is None
    if ended:
        content_length = content_length or None
    return RequestHead(method=method, target=path, headers=pairs, version=b"2",
                       content_length=content_length, chunked=chunked, keep_alive=True)


class H2Stream:
    """One request stream; the pipeline's :class:`~waypoint.proxy.Downstream`."""

    def __init__(self, conn: H2ServerConnection, stream_id: int, grpc_request: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.grpc = grpc_request
        self.scope = trio.CancelScope()
        self.reset = False
        self.body: deque[bytes] = deque()
        self.body_done = False
        self.buffered = 0
        self._credit = 0
        self._wake = trio.Event()
        self._started = False
        self._ended = False
        self._ops: list[tuple[str, object]] = []
        self._local_grpc: int | None = None
        self._local_message = bytearray()

    # --- events from the connection ------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def on_data(self, data: bytes, credit: int) -> None:
        if data:
            self.body.append(data)
            self.buffered += len(data)
        self._credit += credit - len(data)
        self.wake()

    def on_end(self) -> None:
        self.body_done = True
        self.wake()

    def on_reset(self) -> None:
        self.reset = True
        self.scope.cancel()
        self.wake()

    async def _wait(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    # --- Downstream ----------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._started

    @property
    def nursery(self) -> trio.Nursery:
        """Where the pipeline runs a full-duplex body pump (see Downstream)."""
        return self.conn.nursery

    @property
    def ended(self) -> bool:
        return self._ended

    async def receive_body(self) -> bytes | None:
        # The previous piece was forwarded (the pipeline asks only then): credit it.
        if self._credit:
            self.conn.acknowledge(self.id, self._credit)
            self._credit = 0
            await self.conn.send_pending()
        while not self.body:
            if self.reset:
                raise trio.BrokenResourceError("the client reset the stream")
            if self.body_done:
                return None
            await self._wait()
        piece = self.body.popleft()
        self.buffered -= len(piece)
        self._credit += len(piece)
        return piece

    def body_ready(self) -> bool:
        """Body or its end is at hand (:meth:`receive_body` would not wait)."""
        return bool(self.body) or self.body_done or self.reset

    def unread(self) -> int:
        """Flow-controlled bytes received and not credited back yet."""
        return self._credit + self.buffered

    def start_response(self, status: int, headers: Headers, reason: bytes = b"") -> None:
        self._started = True
        if self.grpc and status != 200 and not any(n == _SERVICE_TIME for n, _ in headers):
            self._local_grpc = status
            return
        out = [(b":status", b"%d" % status)]
        out.extend((n.lower(), v) for n, v in headers if n.lower() not in _CONNECTION_SPECIFIC)
        self._ops.append(("headers", out))

    def write_data(self, data: bytes | memoryview) -> None:
        if self._local_grpc is not None:
            self._local_message += data
        elif data:
            self._ops.append(("data", bytes(data)))

    def write_end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        if self._local_grpc is not None:
            pairs = grpc.trailers_only(self._local_grpc, bytes(self._local_message))
            self._ops.append(("headers", [(b":status", b"200"), *pairs]))
        self._ops.append(("end", [(n.lower(), v) for n, v in trailers
                                  if n.lower() not in _CONNECTION_SPECIFIC]))

    async def flush(self) -> None:
        ops = self._ops
        self._ops = []
        conn = self.conn
        for i, (kind, arg) in enumerate(ops):
            if self.reset:
                raise trio.BrokenResourceError("the client reset the stream")
            if kind == "headers":
                assert isinstance(arg, list)
                # A head followed at once by a bare end is sent as one HEADERS frame
                # with END_STREAM (gRPC clients expect trailers-only responses so).
                end_now = (i + 1 < len(ops) and ops[i + 1][0] == "end" and not ops[i + 1][1])
                conn.send_headers(self.id, arg, end_stream=end_now)
                if end_now:
                    self._ended = True
            elif kind == "data":
                assert isinstance(arg, bytes)
                await conn.send_data(self, arg)
            elif not self._ended:
                assert isinstance(arg, list)
                if arg:
                    conn.send_headers(self.id, arg, end_stream=True)
                else:
                    conn.end_stream(self.id)
                self._ended = True
        await conn.send_pending()

    async def wait_window(self) -> None:
        await self._wait()


class H2ServerConnection:
    """One downstream h2c connection."""

    def __init__(self, stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo,
                 settings: H2Settings | None = None) -> None:
        self.stream = stream
        self.proxy = proxy
        self.peer = peer
        self.settings = settings or H2Settings()
        # Client headers are validated; what we send was built from validated input
        # (names lower-cased, connection-specific fields dropped in start_response),
        # and h2's per-field outbound checks are a large share of its cost.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, H2Stream] = {}
        self.writer = FrameWriter(self.h2, stream)
        self._guard = FrameGuard(self.settings, trio.current_time())
        self._read_scope = trio.CancelScope()
        self._closing = False
        self.nursery: trio.Nursery

    # --- sending (called by stream tasks) ------------------------------------------

    async def send_pending(self) -> None:
        await self.writer.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.acknowledge_received_data(size, stream_id)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> None:
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)

    def end_stream(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)

    async def send_data(self, s: H2Stream, data: bytes) -> None:
        view = memoryview(data)
        conn = self.h2
        while view:
            if s.reset:
                raise trio.BrokenResourceError("the client reset the stream")
            window = min(conn.local_flow_control_window(s.id), conn.max_outbound_frame_size)
            if window <= 0:
                await self.send_pending()
                await s.wait_window()
                continue
            n = min(window, len(view))
            conn.send_data(s.id, view[:n].tobytes())
            view = view[n:]

    # --- the connection ------------------------------------------------------------

    async def run(self, initial: bytes = b"") -> None:
        """Serve until the client goes away, a deadline passes or it misbehaves."""
        s = self.settings
        conn = self.h2
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(s.connection_window - 65_535)
        error: int | None = None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            # Caught inside the nursery: from its body they would come out grouped.
            try:
                await self.send_pending()
                if initial:
                    await self._receive(initial)
                await self._read_loop()
            except CalmDown as exc:
                _log.warning("HTTP/2 client abuse; closing the connection", reason=str(exc),
                             src=self.peer.source_ip)
                error = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            except h2.exceptions.ProtocolError as exc:
                _log.info("HTTP/2 protocol error from client", reason=str(exc),
                          src=self.peer.source_ip)
                error = h2.errors.ErrorCodes.PROTOCOL_ERROR
            except STREAM_ERRORS as exc:
                _log.debug("HTTP/2 client connection ended", reason=str(exc),
                           src=self.peer.source_ip)
            # Graceful ends return once no stream is open; EOF means the client
            # is gone and can neither read responses nor credit windows.
            nursery.cancel_scope.cancel()
        if error is not None:
            await self._goaway(error)

    async def _goaway(self, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection(error_code=code)
        with trio.move_on_after(1.0), contextlib.suppress(*STREAM_ERRORS):
            async with self.writer.lock:
                await self.stream.send_all(self.h2.data_to_send())

    async def drain(self) -> None:
        """Graceful GOAWAY: no new streams; open ones finish (the caller bounds it)."""
        self._closing = True
        # Written by hand: h2's close_connection() would refuse the open streams' frames.
        last = self.h2.highest_inbound_stream_id
        goaway = _FRAME_HEADER.pack(0, 8, _GOAWAY, 0, 0) + struct.pack(">LL", last, 0)
        async with self.writer.lock:
            await self.stream.send_all(self.h2.data_to_send() + goaway)
        self._update_idle()

    def _update_idle(self) -> None:
        if self.streams:
            self._read_scope.deadline = math.inf
        elif self._closing:
            self._read_scope.cancel()
        else:
            self._read_scope.deadline = trio.current_time() + self.settings.idle

    async def _read_loop(self) -> None:
        self._read_scope = trio.CancelScope()
        self._update_idle()
        with self._read_scope:
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    return
                await self._receive(data)
                if self._closing and not self.streams:
                    return
        if self._read_scope.cancelled_caught and not self._closing:
            _log.debug("HTTP/2 connection idle; closing", src=self.peer.source_ip)
            await self._goaway(h2.errors.ErrorCodes.NO_ERROR)

    async def _receive(self, data: bytes | bytearray) -> None:
        self._guard.feed(data, trio.current_time())
        events = self.h2.receive_data(data)
        for event in events:
            self._dispatch(event)
        await self.send_pending()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            s = self.streams.get(sid)
            credit = event.flow_controlled_length
            if s is None or s.reset:
                self.acknowledge(sid, credit)
            else:
                s.on_data(event.data, credit)
            if event.stream_ended is not None and s is not None:
                s.on_end()
        elif isinstance(event, h2.events.RequestReceived):
            self._start_stream(event)
        elif isinstance(event, h2.events.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.on_end()
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.on_reset()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            sid = getattr(event, "stream_id", 0)
            if sid:
                s = self.streams.get(sid)
                if s is not None:
                    s.wake()
            else:
                for s in self.streams.values():
                    s.wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._closing = True
            self._update_idle()

    def _start_stream(self, event: h2.events.RequestReceived) -> None:
        headers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
        ended = event.stream_ended is not None
        head = request_head(headers, ended)
        s = H2Stream(self, event.stream_id, grpc.is_grpc(headers))
        if ended:
            s.body_done = True
        self.streams[event.stream_id] = s
        self._update_idle()
        self.nursery.start_soon(self._serve_stream, s, head)

    async def _serve_stream(self, s: H2Stream, head: RequestHead) -> None:
        mark_downstream_h2()
        try:
            with s.scope:
                s.scope.deadline = trio.current_time() + self.settings.stream_idle
                await self.proxy.handle(head, s, self.peer)
                await s.flush()
            if s.scope.cancelled_caught and not s.reset:
                self._reset(s, h2.errors.ErrorCodes.CANCEL)
            elif not s.ended and not s.reset:
                self._reset(s, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif not s.body_done and not s.reset:
                # Answered before the client finished sending: stop it (RFC 9113 8.1).
                self._reset(s, h2.errors.ErrorCodes.NO_ERROR)
        except _ABNORMAL as exc:
            _log.debug("stream ended abnormally", stream=s.id, reason=str(exc))
            if not s.reset:
                self._reset(s, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except Exception:
            _log.exception("request failed; resetting the stream", stream=s.id,
                           src=self.peer.source_ip)
            if not s.reset:
                self._reset(s, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            unread = s.unread()
            if unread:
                self.acknowledge(s.id, unread)
            del self.streams[s.id]
            self._update_idle()
            with trio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
                with trio.move_on_after(1.0):
                    await self.send_pending()

    def _reset(self, s: H2Stream, code: int) -> None:
        s.reset = True
        s.wake()
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(s.id, error_code=code)


#: The connections being served, for :func:`drain_all`.
_live: weakref.WeakSet[H2ServerConnection] = weakref.WeakSet()


async def serve_h2(stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo,
                   initial: bytes) -> None:
    """The listener's ``h2_handler``: serve one h2c prior-knowledge connection.
    The caller closes the stream."""
    conn = H2ServerConnection(stream, proxy, peer)
    _live.add(conn)
    try:
        await conn.run(initial)
    finally:
        _live.discard(conn)


async def drain_all() -> None:
    """GOAWAY (NO_ERROR) on every served connection; open streams may finish.  For
    the process's drain, before its deadline cancels what is left."""
    for conn in list(_live):
        with contextlib.suppress(*STREAM_ERRORS):
            await conn.drain()
