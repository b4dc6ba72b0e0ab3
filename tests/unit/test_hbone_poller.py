"""The HBONE connection's poller: one task reads the pod-side sockets of all relays
sending into the connection's streams (HboneStream.pump_from, used by common.relay for
TcpStream -> HboneStream), falling back to the relay's own task when a write would
block, at EOF, on errors and for bulk sources."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket

import pytest
import trio
import trio.testing

from common.hbone.stream import StreamResetError
from common.relay import relay
from tests.unit.test_hbone_fastpath import _read_all, connection_pair, sink_pair


async def _drain_then_end(stream: trio.abc.HalfCloseableStream, digest: hashlib._Hash,
                          pace: float = 0.0) -> None:
    """Read everything, then end our direction too, so that the relay can finish."""
    await _read_all(stream, digest, pace)
    await stream.send_eof()


async def _read_to_eof(stream: trio.abc.HalfCloseableStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    return received


async def _send_then_end(app: trio.abc.HalfCloseableStream, messages: list[bytes]) -> None:
    for message in messages:
        await app.send_all(message)
    await app.send_eof()


async def _echo(stream: trio.abc.HalfCloseableStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def test_request_response_through_the_poller_in_order() -> None:
    """Two relays (two apps) on one connection: every request is read by the poller and
    its response arrives in order."""
    async with connection_pair() as pair:
        async with sink_pair() as (proxy1, app1), sink_pair() as (proxy2, app2):
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for proxy in (proxy1, proxy2):
                        stream, peer = await pair.open()
                        nursery.start_soon(relay, proxy, stream)
                        nursery.start_soon(_echo, peer)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(pair.client._polled) == 2  # both sources polled
                    for i in range(300):
                        for app in (app1, app2):
                            message = f"request {i}".encode()
                            await app.send_all(message)
                            got = b""
                            while len(got) < len(message):
                                got += await app.receive_some(1024)
                            assert got == message
                    for app in (app1, app2):
                        await app.send_eof()
                        assert await app.receive_some() == b""
        assert pair.client._polled == {}


async def test_sources_ready_together_go_out_in_one_write() -> None:
    """Eight apps' requests waiting when the poller wakes: one transport write carries
    all eight, and each stream gets its own request."""
    async with connection_pair() as pair, contextlib.AsyncExitStack() as stack:
        apps, peers = [], []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    proxy, app = await stack.enter_async_context(sink_pair())
                    stream, peer = await pair.open()
                    nursery.start_soon(relay, proxy, stream)
                    apps.append(app)
                    peers.append(peer)
                await trio.testing.wait_all_tasks_blocked()
                assert len(pair.client._polled) == 8
                writes = pair.client_transport.writes
                for index, app in enumerate(apps):  # no checkpoint: all ready at once
                    assert app.try_send(f"request {index}".encode()) == len(f"request {index}")
                await trio.testing.wait_all_tasks_blocked()
                assert pair.client_transport.writes == writes + 1
                for index, peer in enumerate(peers):
                    assert await peer.receive_some() == f"request {index}".encode()
                nursery.cancel_scope.cancel()


async def test_many_sources_on_a_slow_tunnel_arrive_whole_and_in_order() -> None:
    """Several polled sources and small buffers: the pass's one write often stops
    half-way, every source of the pass then waits for the writer, and each stream's
    bytes still arrive whole and in order."""
    rng = random.Random(13)
    streams = [[rng.randbytes(rng.randrange(1, 6_000)) for _ in range(80)] for _ in range(4)]
    digests = [hashlib.sha256() for _ in streams]
    async with connection_pair(small=True) as pair, contextlib.AsyncExitStack() as stack:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for messages, digest in zip(streams, digests, strict=True):
                    proxy, app = await stack.enter_async_context(sink_pair(small=True))
                    stream, peer = await pair.open()
                    nursery.start_soon(relay, proxy, stream)
                    nursery.start_soon(_drain_then_end, peer, digest, 0.001)
                    nursery.start_soon(_send_then_end, app, messages)
        assert pair.client_transport.partial_writes > 0
        for messages, digest in zip(streams, digests, strict=True):
            assert digest.digest() == hashlib.sha256(b"".join(messages)).digest()


async def test_half_close_from_the_app_reaches_the_peer_and_the_reply_comes_back() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy, app):
        stream, peer = await pair.open()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, proxy, stream)
                await app.send_all(b"whole request")
                await app.send_eof()
                assert await _read_to_eof(peer) == b"whole request"
                await peer.send_all(b"reply after EOF")
                await peer.send_eof()
                assert await _read_to_eof(app) == b"reply after EOF"


async def test_bulk_source_is_handed_back_and_arrives_intact() -> None:
    payload = random.Random(11).randbytes(6 * 1024 * 1024)
    digest = hashlib.sha256()
    async with connection_pair() as pair, sink_pair() as (proxy, app):
        stream, peer = await pair.open()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, proxy, stream)
                nursery.start_soon(_drain_then_end, peer, digest)
                nursery.start_soon(_send_then_end, app, [payload])
        assert digest.digest() == hashlib.sha256(payload).digest()


async def test_slow_tunnel_makes_the_poller_hand_back_and_keeps_order() -> None:
    """Small socket buffers and a paced reader at the far end: the poller's writes
    would block, the relay's task finishes them, and reading resumes in order."""
    rng = random.Random(12)
    messages = [rng.randbytes(rng.randrange(1, 30_000)) for _ in range(200)]
    digest = hashlib.sha256()
    async with connection_pair(small=True) as pair, sink_pair(small=True) as (proxy, app):
        stream, peer = await pair.open()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, proxy, stream)
                nursery.start_soon(_drain_then_end, peer, digest, 0.001)
                await _send_then_end(app, messages)
        assert pair.client_transport.partial_writes > 0
        assert digest.digest() == hashlib.sha256(b"".join(messages)).digest()


async def test_cancelled_relay_leaves_nothing_polled_and_resets_the_stream() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy, app):
        stream, peer = await pair.open()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def proxied() -> None:
                    with scope:
                        async with stream:
                            await relay(proxy, stream)

                nursery.start_soon(proxied)
                await trio.testing.wait_all_tasks_blocked()
                assert len(pair.client._polled) == 1
                scope.cancel()
            assert pair.client._polled == {}
            with pytest.raises(StreamResetError):
                while await peer.receive_some():
                    pass
            # The source socket is a plain stream again, usable by its owner.
            await app.send_all(b"late")
            assert await proxy.receive_some() == b"late"


async def test_source_closed_by_another_task_ends_the_relay() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy, _app):
        stream, _peer = await pair.open()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, proxy, stream)
                await trio.testing.wait_all_tasks_blocked()
                proxy.close()  # e.g. a timer's callback
            # relay() returned (the error is a peer-gone one, logged at debug level).
        assert pair.client._polled == {}


async def test_connection_lost_while_polled_ends_the_relay() -> None:
    async with connection_pair() as pair, sink_pair() as (proxy, _app):
        stream, _peer = await pair.open()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay, proxy, stream)
                await trio.testing.wait_all_tasks_blocked()
                pair.client_transport.socket.shutdown(socket.SHUT_RDWR)
        assert pair.client._polled == {}
