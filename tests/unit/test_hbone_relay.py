"""common.relay: per-direction close, quiet resets, growing read sizes (in-memory streams)."""

from __future__ import annotations

import structlog
import trio
import trio.testing

from common.relay import relay


class RecordingStream(trio.abc.HalfCloseableStream):
    """Wraps a memory stream, recording the read sizes asked for."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sizes: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.sizes.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_eof_one_way_keeps_the_other_direction_flowing() -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, upstream = trio.testing.memory_stream_pair()
    result: list[tuple[int, int]] = []

    async def run_relay() -> None:
        result.append(await relay(proxy_a, proxy_b))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        await client.send_all(b"request")
        await client.send_eof()
        received = b""
        while data := await upstream.receive_some():
            received += data
        assert received == b"request"  # EOF arrived after the bytes
        # The other direction still works after the first one closed.
        await upstream.send_all(b"late reply")
        await upstream.send_eof()
        reply = b""
        while data := await client.receive_some():
            reply += data
        assert reply == b"late reply"
    assert result == [(7, 10)]


async def test_read_size_grows_only_as_the_direction_proves_busy() -> None:
    source, proxy_in = trio.testing.memory_stream_pair()
    proxy_out, sink = trio.testing.memory_stream_pair()
    recording = RecordingStream(proxy_in)
    total = 8 * 1024 * 1024

    async def feed() -> None:
        block = bytes(64 * 1024)
        for _ in range(total // len(block)):
            await source.send_all(block)
        await source.send_eof()

    async def drain() -> None:
        while await sink.receive_some():
            pass
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(drain)
        assert await relay(recording, proxy_out) == (total, 0)
    sizes = [size for size in recording.sizes if size is not None]
    assert sizes[0] == 1024
    assert 16 * 1024 in sizes
    assert 256 * 1024 in sizes
    assert sizes[-1] == 1024 * 1024  # bulk: proven over 4 MiB of full reads
    assert sizes == sorted(sizes)


async def test_idle_connection_keeps_the_small_buffer() -> None:
    a, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, b = trio.testing.memory_stream_pair()
    recording = RecordingStream(proxy_a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, recording, proxy_b)
        for _ in range(20):  # a chatty but tiny protocol
            await a.send_all(b"ping")
            assert await b.receive_some() == b"ping"
        await a.send_eof()
        await b.send_eof()
    assert set(recording.sizes) == {1024}


async def test_peer_reset_ends_both_directions_quietly() -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, upstream = trio.testing.memory_stream_pair()

    async with trio.open_nursery() as nursery:
        results: list[tuple[int, int]] = []

        async def run_relay() -> None:
            with structlog.testing.capture_logs() as logs:
                results.append(await relay(proxy_a, proxy_b, label="t"))
            assert all(entry["log_level"] == "debug" for entry in logs)

        nursery.start_soon(run_relay)
        await client.send_all(b"abc")
        assert await upstream.receive_some() == b"abc"
        # The upstream vanishes: the relay's sends to it break.
        await upstream.aclose()
        assert await client.receive_some() == b""  # upstream's close reached us as EOF
        await client.send_all(b"more")  # ... and this one finds the upstream gone
    assert results == [(3, 0)]
