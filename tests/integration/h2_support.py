"""A small h2c prior-knowledge client and gRPC-shaped backend for waypoint HTTP/2 tests."""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

Headers = list[tuple[bytes, bytes]]


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def unframe(data: bytes) -> list[bytes]:
    out = []
    while len(data) >= 5:
        size = struct.unpack(">I", data[1:5])[0]
        out.append(data[5:5 + size])
        data = data[5 + size:]
    return out


@dataclass
class Reply:
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H2Client:
    """h2c prior knowledge over a TCP stream; a reader task dispatches events."""

    def __init__(self, stream: trio.abc.Stream, *, window: int = 1024 * 1024,
                 auto_ack: bool = True) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.auto_ack = auto_ack
        self.replies: dict[int, Reply] = {}
        self.changed = trio.Condition()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._lock = trio.Lock()

    async def start(self, nursery: trio.Nursery) -> None:
        self.h2.initiate_connection()
        await self.flush()
        nursery.start_soon(self._reader)

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for ev in self.h2.receive_data(data):
                    self._on(ev)
                await self.flush()
                async with self.changed:
                    self.changed.notify_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed = True
        async with self.changed:
            self.changed.notify_all()

    def _on(self, ev: Any) -> None:
        sid = getattr(ev, "stream_id", None)
        reply = self.replies.get(sid) if sid else None
        if isinstance(ev, h2.events.ConnectionTerminated):
            self.terminated = ev
        elif reply is None:
            return
        elif isinstance(ev, h2.events.ResponseReceived):
            reply.headers = list(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            reply.body += ev.data
            if self.auto_ack:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            reply.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            reply.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            reply.reset = ev.error_code

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            async with self.changed:
                while not predicate():
                    if self.closed and not predicate():
                        raise AssertionError("connection closed before the condition held")
                    await self.changed.wait()

    def open(self, method: str, path: str, headers: Headers = (),  # type: ignore[assignment]
             *, authority: str = "echo", end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.replies[sid] = Reply()
        self.h2.send_headers(sid, [(b":method", method.encode()), (b":scheme", b"http"),
                                   (b":authority", authority.encode()),
                                   (b":path", path.encode()), *headers], end_stream=end)
        return sid

    async def send(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                await self.flush()
                async with self.changed:
                    if self.h2.local_flow_control_window(sid) <= 0:
                        await self.changed.wait()
                continue
            n = min(window, len(view))
            # END_STREAM rides on the last DATA frame, as real clients send it.
            self.h2.send_data(sid, view[:n].tobytes(), end_stream=end and n == len(view))
            view = view[n:]
            if view:
                await self.flush()
        if end and not data:
            self.h2.end_stream(sid)
        await self.flush()

    async def request(self, method: str, path: str, headers: Headers = (),  # type: ignore[assignment]
                      body: bytes = b"", *, authority: str = "echo") -> Reply:
        sid = self.open(method, path, headers, authority=authority, end=not body)
        if body:
            await self.send(sid, body, end=True)
        else:
            await self.flush()
        reply = self.replies[sid]
        await self.wait(lambda: reply.ended or reply.reset is not None)
        return reply


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


Handler = Callable[["GrpcStream"], Awaitable[None]]


class GrpcStream:
    """One request on the test's gRPC-shaped backend."""

    def __init__(self, server: GrpcBackend, conn: h2.connection.H2Connection, sid: int,
                 headers: Headers) -> None:
        self.server = server
        self.conn = conn
        self.id = sid
        self.headers = headers
        self.inbox: trio.MemorySendChannel[bytes | None]
        self.inbox, self.receive = trio.open_memory_channel[bytes | None](math.inf)
        self._buffer = b""

    @property
    def path(self) -> bytes:
        return dict(self.headers)[b":path"]

    async def message(self) -> bytes | None:
        while True:
            if len(self._buffer) >= 5:
                size = struct.unpack(">I", self._buffer[1:5])[0]
                if len(self._buffer) >= 5 + size:
                    msg = self._buffer[5:5 + size]
                    self._buffer = self._buffer[5 + size:]
                    return msg
            piece = await self.receive.receive()
            if piece is None:
                return None
            self._buffer += piece

    async def respond_headers(self) -> None:
        self.conn.send_headers(self.id, [(b":status", b"200"),
                                         (b"content-type", b"application/grpc")])
        await self.server.flush(self.conn)

    async def send(self, message: bytes) -> None:
        self.conn.send_data(self.id, frame(message))
        await self.server.flush(self.conn)

    async def send_raw(self, data: bytes) -> None:
        """Body bytes as they are, waiting for the peer's windows."""
        view = memoryview(data)
        while view:
            window = min(self.conn.local_flow_control_window(self.id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                await self.server.window_changed(self.conn)
                continue
            n = min(window, len(view))
            self.conn.send_data(self.id, view[:n].tobytes())
            view = view[n:]
            await self.server.flush(self.conn)

    async def finish(self, status: int = 0, message: bytes = b"") -> None:
        trailers = [(b"grpc-status", b"%d" % status)]
        if message:
            trailers.append((b"grpc-message", message))
        self.conn.send_headers(self.id, trailers, end_stream=True)
        await self.server.flush(self.conn)


class GrpcBackend:
    """An h2c server calling ``handler`` per stream (tests write unary and bidi handlers)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Headers] = []
        self._streams: dict[tuple[int, int], trio.abc.Stream] = {}
        self._windows: dict[int, trio.Event] = {}
        self._locks: dict[int, trio.Lock] = {}

    async def window_changed(self, conn: h2.connection.H2Connection) -> None:
        event = self._windows.setdefault(id(conn), trio.Event())
        await event.wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        listeners = [trio.SocketListener(listener)]
        task_status.started(port)
        await trio.serve_listeners(self._connection, listeners)

    async def flush(self, conn: h2.connection.H2Connection) -> None:
        stream = self._streams[id(conn), 0]
        async with self._locks.setdefault(id(conn), trio.Lock()):
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)

    async def _connection(self, stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        self._streams[id(conn), 0] = stream
        streams: dict[int, GrpcStream] = {}
        async with trio.open_nursery() as nursery:
            await self.flush(conn)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        headers = list(ev.headers)
                        self.requests.append(headers)
                        s = streams[ev.stream_id] = GrpcStream(self, conn, ev.stream_id,
                                                               headers)
                        nursery.start_soon(self.handler, s)
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        streams[ev.stream_id].inbox.send_nowait(ev.data)
                    elif isinstance(ev, h2.events.StreamEnded):
                        streams[ev.stream_id].inbox.send_nowait(None)
                    elif isinstance(ev, (h2.events.WindowUpdated,
                                         h2.events.RemoteSettingsChanged)):
                        self._windows.pop(id(conn), trio.Event()).set()
                await self.flush(conn)
            nursery.cancel_scope.cancel()
