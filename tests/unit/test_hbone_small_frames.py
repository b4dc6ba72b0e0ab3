"""The one-buffer fast path for small messages: H2Protocol.frame_small and its use by
HboneConnection's fast send (would-block mid-message, half-close right after a fast
send, windows exhausted by fast sends, queued control frames keeping their order)."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio

from common.hbone.protocol import DataChunk, H2Protocol
from common.hbone.stream import HboneStream, StreamResetError
from tests.unit.test_hbone_fastpath import _read_all, connection_pair
from tests.unit.test_hbone_protocol import _data, _handshake, _open, _pump


def test_frame_small_is_one_frame_the_peer_decodes_and_debits_both_windows() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    conn_before = client._h2.outbound_flow_control_window
    stream_before = client.send_window(stream_id)
    frame = client.frame_small(stream_id, memoryview(b"GET / HTTP/1.1\r\n\r\n"))
    assert frame is not None and len(frame) == 9 + 18
    assert client._h2.outbound_flow_control_window == conn_before - 18
    assert client.send_window(stream_id) == stream_before - 18
    events = server.receive_data(frame)
    assert [type(e) for e in events] == [DataChunk]
    assert _data(events, stream_id) == b"GET / HTTP/1.1\r\n\r\n"


def test_frame_small_declines_while_other_frames_are_queued() -> None:
    """Queued frames (a WINDOW_UPDATE, a PING ACK) must leave first: the caller then
    takes the ordinary path, which writes them in front of the DATA."""
    client, server = _handshake()
    stream_id = _open(client, server)
    client.acknowledge(stream_id, 4 * 1024 * 1024)  # a WINDOW_UPDATE is now due
    assert client.has_output()
    window = client.send_window(stream_id)
    assert client.frame_small(stream_id, memoryview(b"x")) is None
    assert client.send_window(stream_id) == window  # nothing debited
    _pump(client, server)
    assert client.frame_small(stream_id, memoryview(b"x")) is not None


def test_frame_small_declines_beyond_the_window_or_frame_size() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    client._h2.max_outbound_frame_size = 16_384
    assert client.frame_small(stream_id, memoryview(bytes(16_385))) is None
    client._h2.streams[stream_id].outbound_flow_control_window = 10
    assert client.frame_small(stream_id, memoryview(bytes(11))) is None
    assert client.send_window(stream_id) == 10
    assert client.frame_small(stream_id, memoryview(bytes(10))) is not None
    assert client.send_window(stream_id) == 0


def test_frame_small_on_a_closed_stream_declines() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    client.reset_stream(stream_id)
    assert client.frame_small(stream_id, memoryview(b"x")) is None
    assert isinstance(client, H2Protocol)


async def test_small_messages_blocked_midway_arrive_whole_and_in_order() -> None:
    """Thousands of small messages from three streams into a socket that keeps filling
    up (small buffers, paced reader): partial writes go to the backlog, and every
    stream's bytes arrive intact."""
    rng = random.Random(7)
    messages = [[rng.randbytes(rng.randrange(1, 60_000)) for _ in range(60)]
                for _ in range(3)]
    async with connection_pair(small=True) as pair:
        streams = [await pair.open() for _ in messages]
        digests = [hashlib.sha256() for _ in messages]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for (stream, peer), batch, digest in zip(streams, messages, digests,
                                                        strict=True):
                    async def send(stream: HboneStream = stream,
                                   batch: list[bytes] = batch) -> None:
                        for message in batch:
                            await stream.send_all(message)
                        await stream.send_eof()

                    nursery.start_soon(send)
                    nursery.start_soon(_read_all, peer, digest, 0.001)
        assert pair.client_transport.partial_writes > 0  # the backlog path was taken
        for batch, digest in zip(messages, digests, strict=True):
            assert digest.digest() == hashlib.sha256(b"".join(batch)).digest()


async def test_half_close_right_after_a_fast_send_keeps_the_bytes_and_the_reply() -> None:
    async with connection_pair() as pair:
        stream, peer = await pair.open()
        with trio.fail_after(5):
            await stream.send_all(b"request")
            await stream.send_eof()
            assert await peer.receive_some() == b"request"
            assert await peer.receive_some() == b""
            await peer.send_all(b"reply")
            await peer.send_eof()
            assert await stream.receive_some() == b"reply"
            assert await stream.receive_some() == b""


async def test_fast_sends_that_exhaust_the_window_wait_for_credit() -> None:
    """A reader that does not read: fast sends fill the 4 MiB stream window, the next
    send waits (bounded buffering), and reading releases it."""
    async with connection_pair() as pair:
        stream, peer = await pair.open()
        chunk = bytes(60_000)
        sent = 0
        with trio.move_on_after(1.0):
            while True:
                await stream.send_all(chunk)
                sent += len(chunk)
        assert 4 * 1024 * 1024 - len(chunk) <= sent <= 4 * 1024 * 1024 + len(chunk)
        assert peer.buffered <= 4 * 1024 * 1024
        # That send was cancelled mid-way: the stream is reset, as trio's contract says.
        with pytest.raises(StreamResetError):
            await stream.send_all(b"x")


async def test_send_cancelled_on_entry_sends_nothing_and_the_stream_goes_on() -> None:
    async with connection_pair() as pair:
        stream, peer = await pair.open()
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.send_all(b"lost")
        assert scope.cancelled_caught
        await stream.send_all(b"kept")
        with trio.fail_after(5):
            assert await peer.receive_some() == b"kept"
