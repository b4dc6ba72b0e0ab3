"""HBONE fast paths: sends written from the sender's task, DATA written by the reader task.

Two HboneConnections over a socketpair (TcpStream transports, which have ``try_send``,
so the connection's fast send path is on), small kernel buffers where a write must
block half-way.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import h2.events
import pytest
import trio
import trio.testing

from common.hbone.connection import HboneConnection
from common.hbone.protocol import STREAM_WINDOW
from common.hbone.stream import HboneStream, StreamResetError
from common.relay import relay
from common.tcp import TcpStream

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:9")]


class RecordingTcpStream(TcpStream):
    """Counts the synchronous writes, and those that could not take everything."""

    writes = 0
    partial_writes = 0

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        self.writes += 1
        sent = super().try_send(data)
        if sent < len(data):
            self.partial_writes += 1
        return sent


def _small_buffers(*socks: socket.socket) -> None:
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


Transport = TypeVar("Transport", bound=trio.abc.HalfCloseableStream)


@dataclass
class Pair(Generic[Transport]):
    client: HboneConnection
    server: HboneConnection
    client_transport: Transport
    accepted: trio.MemoryReceiveChannel[HboneStream]
    nursery: trio.Nursery
    start_server: Callable[[], None] = field(default=lambda: None)

    async def open(self) -> tuple[HboneStream, HboneStream]:
        stream = self.client.open_stream(CONNECT)
        peer = await self.accepted.receive()
        assert await stream._wait_response() == 200
        return stream, peer


@asynccontextmanager
async def connection_pair(*, small: bool = False, server_running: bool = True
                          ) -> AsyncIterator[Pair[RecordingTcpStream]]:
    """HBONE over a socketpair, the client side's writes counted."""
    a, b = socket.socketpair()
    if small:
        _small_buffers(a, b)
    async with hbone_pair(RecordingTcpStream(a), TcpStream(b),
                          server_running=server_running) as pair:
        yield pair


@asynccontextmanager
async def hbone_pair(client_transport: Transport, server_transport: trio.abc.HalfCloseableStream,
                     *, server_running: bool = True) -> AsyncIterator[Pair[Transport]]:
    """Two HboneConnections over the given transports; the server accepts every CONNECT."""
    send_accepted, accepted = trio.open_memory_channel[HboneStream](16)

    def on_request(connection: HboneConnection, event: h2.events.RequestReceived) -> None:
        stream = connection.accept_stream(event.stream_id)
        connection.respond(stream, 200)
        send_accepted.send_nowait(stream)

    client = HboneConnection(client_transport, client_side=True)
    server = HboneConnection(server_transport, client_side=False, on_request=on_request)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        pair = Pair(client, server, client_transport, accepted, nursery)
        pair.start_server = lambda: nursery.start_soon(server.run)
        if server_running:
            pair.start_server()
        yield pair
        nursery.cancel_scope.cancel()


async def _read_all(stream: trio.abc.Stream, digest: hashlib._Hash,
                    pace: float = 0.0) -> int:
    total = 0
    while data := await stream.receive_some(65536):
        digest.update(data)
        total += len(data)
        if pace:
            await trio.sleep(pace)
    return total


async def test_small_send_goes_out_from_the_senders_task() -> None:
    async with connection_pair() as pair:
        stream, peer = await pair.open()
        writes: list[int] = []
        original = pair.client._write

        async def counting_write(pieces: list[bytes | memoryview]) -> None:
            writes.append(len(pieces))
            await original(pieces)

        pair.client._write = counting_write  # type: ignore[method-assign]
        with trio.fail_after(5):
            for message in (b"GET / HTTP/1.1\r\n\r\n", b"second"):
                await stream.send_all(message)
                assert await peer.receive_some() == message
        assert writes == []  # the writer task was never needed


async def test_send_blocked_midway_finishes_from_the_backlog_in_order() -> None:
    """Several streams send large buffers through a socket that keeps filling up: the
    fast path leaves the rest to the writer, and every stream's bytes arrive intact."""
    rng = random.Random(5)
    payloads = [rng.randbytes(3 * 1024 * 1024 + i) for i in range(3)]
    async with connection_pair(small=True) as pair:
        streams = [await pair.open() for _ in payloads]
        digests = [hashlib.sha256() for _ in payloads]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for (stream, peer), payload, digest in zip(streams, payloads, digests,
                                                          strict=True):
                    async def send(stream: HboneStream = stream, payload: bytes = payload
                                   ) -> None:
                        view = memoryview(payload)
                        for start in range(0, len(view), 256 * 1024):
                            await stream.send_all(view[start:start + 256 * 1024])
                        await stream.send_eof()

                    nursery.start_soon(send)
                    nursery.start_soon(_read_all, peer, digest)
        assert pair.client_transport.partial_writes > 0  # the backlog path was taken
        for payload, digest in zip(payloads, digests, strict=True):
            assert digest.digest() == hashlib.sha256(payload).digest()


async def test_cancelled_send_in_the_backlog_resets_only_its_stream() -> None:
    async with connection_pair(small=True, server_running=False) as pair:
        stream = pair.client.open_stream(CONNECT)
        with trio.move_on_after(0.2) as scope:
            # Nobody reads the other end: the fast path writes what fits, then waits.
            # (Within the default window: the peer never sent its SETTINGS.)
            await stream.send_all(bytes(60_000))
        assert scope.cancelled_caught
        assert pair.client_transport.partial_writes > 0
        with pytest.raises(StreamResetError):
            await stream.send_all(b"more")
        pair.start_server()
        with trio.fail_after(10):
            first = await pair.accepted.receive()
            other, peer = await pair.open()
            await other.send_all(b"still fine")
            assert await peer.receive_some() == b"still fine"
            with pytest.raises(StreamResetError):
                while await first.receive_some():
                    pass


@asynccontextmanager
async def sink_pair(*, small: bool = False) -> AsyncIterator[tuple[TcpStream, TcpStream]]:
    a, b = socket.socketpair()
    if small:
        _small_buffers(a, b)
    async with TcpStream(a) as proxy_side, TcpStream(b) as app_side:
        yield proxy_side, app_side


async def _app_reads_all(app_side: TcpStream, digest: hashlib._Hash) -> None:
    await _read_all(app_side, digest)
    await app_side.send_eof()  # ends the relay's other direction


async def test_received_data_goes_straight_into_the_sink() -> None:
    payload = random.Random(2).randbytes(12 * 1024 * 1024)  # three stream windows
    received = hashlib.sha256()
    async with connection_pair() as pair, sink_pair() as (proxy_side, app_side):
        stream, peer = await pair.open()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, peer, proxy_side)
                nursery.start_soon(_app_reads_all, app_side, received)
                await trio.testing.wait_all_tasks_blocked()  # the relay waits for data
                await stream.send_all(payload)
                await stream.send_eof()
            # The relay forwarded the EOF: the app's read loop ended.
        assert received.digest() == hashlib.sha256(payload).digest()
        assert peer.direct_bytes > 0


async def test_sink_that_blocks_midway_gets_the_rest_in_order_and_bounds_the_buffer() -> None:
    payload = random.Random(4).randbytes(8 * 1024 * 1024)
    received = hashlib.sha256()
    peak = [0]
    async with connection_pair() as pair, sink_pair(small=True) as (proxy_side, app_side):
        stream, peer = await pair.open()

        async def slow_app() -> None:
            while data := await app_side.receive_some(16384):
                received.update(data)
                peak[0] = max(peak[0], peer.buffered)
                await trio.sleep(0.0005)
            await app_side.send_eof()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, peer, proxy_side)
                nursery.start_soon(slow_app)
                await trio.testing.wait_all_tasks_blocked()  # the relay waits for data
                await stream.send_all(payload)
                await stream.send_eof()
        assert received.digest() == hashlib.sha256(payload).digest()
        assert 0 < peer.direct_bytes < len(payload)  # both paths carried bytes
        assert peak[0] <= STREAM_WINDOW


async def test_half_close_during_direct_delivery_keeps_the_reply() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy_side, app_side):
        stream, peer = await pair.open()

        async def app() -> None:
            data = b""
            while chunk := await app_side.receive_some():
                data += chunk
            await app_side.send_all(b"saw " + str(len(data)).encode())
            await app_side.send_eof()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, peer, proxy_side)
                nursery.start_soon(app)
                await stream.send_all(b"x" * 100_000)
                await stream.send_eof()
                reply = b""
                while chunk := await stream.receive_some():
                    reply += chunk
        assert reply == b"saw 100000"


async def test_failed_sink_ends_the_relay_and_resets_the_tunnel() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy_side, app_side):
        stream, peer = await pair.open()
        app_side.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await app_side.aclose()  # the application went away with a reset
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def proxy() -> None:
                    async with peer:
                        await relay(peer, proxy_side)

                nursery.start_soon(proxy)
                with pytest.raises(StreamResetError):
                    for _ in range(100):
                        await stream.send_all(bytes(65536))
                        await trio.sleep(0.01)
