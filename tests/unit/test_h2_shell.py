"""The HTTP/2 shell without sockets: frame guard, request mapping, and the connection
driven by an ``h2`` client over a memory stream with a stub pipeline."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing

from waypoint.h2_shell import CalmDown, FrameGuard, H2ServerConnection, H2Settings, request_head
from waypoint.http import RequestHead
from waypoint.proxy import PeerInfo

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def raw_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def test_guard_refuses_continuation_flood() -> None:
    guard = FrameGuard(H2Settings(max_continuation_frames=4), 0.0)
    guard.feed(PREFACE + raw_frame(0x1, 0, 1, b"x" * 10), 0.0)
    for _ in range(4):
        guard.feed(raw_frame(0x9, 0, 1, b"y" * 10), 0.0)
    with pytest.raises(CalmDown):
        guard.feed(raw_frame(0x9, 0, 1, b"y"), 0.0)


def test_guard_bounds_header_block_bytes() -> None:
    guard = FrameGuard(H2Settings(max_header_list_size=1000), 0.0)
    guard.feed(PREFACE + raw_frame(0x1, 0, 1, b"x" * 600), 0.0)
    with pytest.raises(CalmDown):
        guard.feed(raw_frame(0x9, 0, 1, b"y" * 600), 0.0)


def test_guard_allows_normal_blocks_split_anywhere() -> None:
    guard = FrameGuard(H2Settings(max_continuation_frames=2), 0.0)
    data = PREFACE
    for sid in range(1, 200, 2):
        data += raw_frame(0x1, 0, sid, b"h") + raw_frame(0x9, 0, sid, b"c")
        data += raw_frame(0x9, 0x4, sid, b"c") + raw_frame(0x0, 0x1, sid, b"d" * 100)
    for i in range(0, len(data), 7):  # byte boundaries never line up with frames
        guard.feed(data[i:i + 7], 0.0)


def test_guard_reset_bucket_refills_with_time() -> None:
    settings = H2Settings(reset_burst=10, reset_rate=10.0)
    guard = FrameGuard(settings, 0.0)
    guard.feed(PREFACE, 0.0)
    now = 0.0
    for _ in range(100):  # 10 per second forever is fine
        now += 0.1
        guard.feed(raw_frame(0x3, 0, 1, b"\0\0\0\x08"), now)
    with pytest.raises(CalmDown):
        for _ in range(12):
            guard.feed(raw_frame(0x3, 0, 1, b"\0\0\0\x08"), now)


def test_request_head_from_pseudo_headers() -> None:
    head = request_head([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:80"),
                         (b":path", b"/a?b=1"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                         (b"host", b"ignored")], ended=False)
    assert (head.method, head.target) == (b"POST", b"/a?b=1")
    assert head.headers[0] == (b"host", b"svc:80")
    assert (b"cookie", b"a=1; b=2") in head.headers
    assert not any(v == b"ignored" for _, v in head.headers)
    assert head.chunked and head.has_body
    sized = request_head([(b":method", b"PUT"), (b":path", b"/"), (b"content-length", b"5")],
                         ended=False)
    assert sized.content_length == 5 and not sized.chunked
    empty = request_head([(b":method", b"GET"), (b":path", b"/")], ended=True)
    assert not empty.has_body


Handler = Callable[[RequestHead, Any], Awaitable[None]]


class StubProxy:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def handle(self, head: RequestHead, down: Any, peer: PeerInfo) -> None:
        await self.handler(head, down)


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.events: list[h2.events.Event] = []

    async def start(self) -> None:
        self.h2.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def read_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not done():
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                self.events.extend(self.h2.receive_data(data))
                await self.flush()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def _pair(handler: Handler, settings: H2Settings | None = None
          ) -> tuple[Client, H2ServerConnection]:
    left, right = trio.testing.memory_stream_pair()
    conn = H2ServerConnection(right, StubProxy(handler), PeerInfo(source_ip="127.0.0.1"),  # type: ignore[arg-type]
                              settings)
    return Client(left), conn


async def test_trailers_and_body_reach_the_client() -> None:
    async def handler(head: RequestHead, down: Any) -> None:
        body = b""
        while (piece := await down.receive_body()) is not None:
            body += piece
        down.start_response(200, [(b"content-type", b"application/grpc"),
                                  (b"x-envoy-upstream-service-time", b"1"),
                                  (b"transfer-encoding", b"chunked")])
        down.write_data(b"echo:" + body)
        down.write_end([(b"grpc-status", b"0")])
        await down.flush()

    client, conn = _pair(handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.start()
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":authority", b"x"), (b":path", b"/s/m"),
                                     (b"content-type", b"application/grpc")])
        client.h2.send_data(sid, b"hello", end_stream=True)
        await client.flush()
        await client.read_until(lambda: bool(client.of(h2.events.StreamEnded)))
        response = client.of(h2.events.ResponseReceived)[0]
        assert (b"transfer-encoding", b"chunked") not in response.headers
        assert b"".join(e.data for e in client.of(h2.events.DataReceived)) == b"echo:hello"
        assert client.of(h2.events.TrailersReceived)[0].headers == [(b"grpc-status", b"0")]
        nursery.cancel_scope.cancel()


async def test_local_error_to_grpc_request_is_trailers_only() -> None:
    async def handler(head: RequestHead, down: Any) -> None:
        down.start_response(503, [(b"content-length", b"19"), (b"content-type", b"text/plain")])
        down.write_data(b"no healthy upstream")
        down.write_end()
        await down.flush()

    client, conn = _pair(handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.start()
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":authority", b"x"), (b":path", b"/s/m"),
                                     (b"content-type", b"application/grpc")], end_stream=True)
        await client.flush()
        await client.read_until(lambda: bool(client.of(h2.events.StreamEnded)))
        response = client.of(h2.events.ResponseReceived)[0]
        assert response.stream_ended is not None  # one HEADERS frame with END_STREAM
        headers = dict(response.headers)
        assert headers[b":status"] == b"200"
        assert headers[b"grpc-status"] == b"14"
        assert headers[b"grpc-message"] == b"no healthy upstream"
        assert not client.of(h2.events.DataReceived)
        nursery.cancel_scope.cancel()


async def test_request_body_is_credited_only_as_the_pipeline_reads() -> None:
    release = trio.Event()
    got = 0

    async def handler(head: RequestHead, down: Any) -> None:
        nonlocal got
        await release.wait()
        while (piece := await down.receive_body()) is not None:
            got += len(piece)
        down.start_response(200, [(b"content-length", b"0")])
        down.write_end()
        await down.flush()

    window = 64 * 1024
    client, conn = _pair(handler, H2Settings(stream_window=window))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.start()
        await client.read_until(lambda: bool(client.of(h2.events.RemoteSettingsChanged)))
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":authority", b"x"), (b":path", b"/")])
        sent = 0
        while client.h2.local_flow_control_window(sid) > 0:
            n = min(client.h2.local_flow_control_window(sid), 16384)
            client.h2.send_data(sid, b"z" * n)
            sent += n
        await client.flush()
        assert sent == window
        # The pipeline has not read: nothing is credited, however long we wait for it.
        with trio.move_on_after(0.2):
            await client.read_until(lambda: bool(client.of(h2.events.WindowUpdated)))
        assert not [e for e in client.of(h2.events.WindowUpdated) if e.stream_id == sid]
        release.set()
        await client.read_until(
            lambda: any(e.stream_id == sid for e in client.of(h2.events.WindowUpdated)))
        client.h2.end_stream(sid)
        await client.flush()
        await client.read_until(lambda: bool(client.of(h2.events.StreamEnded)))
        assert got == window
        nursery.cancel_scope.cancel()


async def test_continuation_flood_gets_goaway_enhance_your_calm() -> None:
    async def handler(head: RequestHead, down: Any) -> None:
        raise AssertionError("no request should reach the pipeline")

    left, right = trio.testing.memory_stream_pair()
    conn = H2ServerConnection(right, StubProxy(handler), PeerInfo(source_ip="127.0.0.1"))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await left.send_all(PREFACE + raw_frame(0x4, 0, 0) + raw_frame(0x1, 0, 1, b"\x82"))
        for _ in range(100):
            await left.send_all(raw_frame(0x9, 0, 1, b"\x00" * 100))
        data = b""
        with trio.fail_after(5):
            while b"\x07\x00\x00\x00\x00\x00" not in data:  # a GOAWAY frame header
                chunk = await left.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        goaway = data[data.index(b"\x07\x00\x00\x00\x00\x00") - 3:]
        assert struct.unpack(">L", goaway[13:17])[0] == 0xB  # ENHANCE_YOUR_CALM
        nursery.cancel_scope.cancel()


async def test_idle_connection_gets_goaway(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(head: RequestHead, down: Any) -> None:
        raise AssertionError("no request")

    client, conn = _pair(handler, H2Settings(idle=3.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.start()
        with trio.fail_after(60):
            await client.read_until(lambda: bool(client.of(h2.events.ConnectionTerminated)))
        assert client.of(h2.events.ConnectionTerminated)[0].error_code == 0
        assert trio.current_time() >= 3.0
        nursery.cancel_scope.cancel()


async def test_drain_sends_goaway_and_lets_open_streams_finish() -> None:
    release = trio.Event()

    async def handler(head: RequestHead, down: Any) -> None:
        await release.wait()
        down.start_response(200, [(b"content-length", b"4")])
        down.write_data(b"done")
        down.write_end()
        await down.flush()

    client, conn = _pair(handler)
    async with trio.open_nursery() as nursery:
        async def serve() -> None:  # as the listener does: close once served
            await conn.run()
            await conn.stream.aclose()

        nursery.start_soon(serve)
        await client.start()
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                     (b":authority", b"x"), (b":path", b"/")], end_stream=True)
        await client.flush()
        with trio.fail_after(5):
            while not conn.streams:
                await trio.testing.wait_all_tasks_blocked()
        await conn.drain()
        release.set()
        # h2's client state machine stops at a GOAWAY, so the frames are read raw here.
        data = b""
        with trio.fail_after(5):
            while chunk := await client.stream.receive_some(65536):
                data += chunk  # the connection ends once no stream is open
        frames = []
        while len(data) >= 9:
            hi, lo, ftype, flags, stream_id = struct.unpack(">HBBBL", data[:9])
            size = (hi << 8) | lo
            frames.append((ftype, flags, stream_id, data[9:9 + size]))
            data = data[9 + size:]
        goaways = [f for f in frames if f[0] == 0x7]
        assert goaways and struct.unpack(">LL", goaways[0][3][:8]) == (sid, 0)
        payload = b"".join(f[3] for f in frames if f[0] == 0x0 and f[2] == sid)
        assert payload == b"done"
        assert any(f[0] == 0x0 and f[2] == sid and f[1] & 0x1 for f in frames)
        nursery.cancel_scope.cancel()
