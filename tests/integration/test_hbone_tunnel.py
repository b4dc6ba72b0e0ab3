"""HBONE over real mTLS on loopback: tunnels, half-close, backpressure, status codes."""

from __future__ import annotations

import hashlib
import random
import tracemalloc

import pytest
import trio

from common.errors import TunnelRejectedError
from common.hbone import ConnectRequest, HboneStream, Responder, forward_tcp
from common.hbone.protocol import STREAM_WINDOW
from common.hbone.request import Baggage
from common.relay import relay
from tests.integration.hbone_support import (
    CLIENT_ID,
    SERVER_ID,
    make_mesh,
    pool_for,
    round_trip,
    start_echo,
    start_server,
)


async def test_tunnel_carries_bytes_and_istio_headers() -> None:
    mesh = make_mesh()
    seen: list[ConnectRequest] = []

    async def handler(request: ConnectRequest, responder: Responder) -> None:
        seen.append(request)
        await forward_tcp(request, responder)

    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh, handler)
        async with pool_for(mesh) as pool:
            stream = await pool.connect(
                CLIENT_ID, address, expected={SERVER_ID}, authority=f"127.0.0.1:{echo_port}",
                forwarded_for="10.1.2.3:4567",
                baggage=Baggage(namespace="default", workload_name="sleep",
                                service_name="sleep"))
            payload = random.Random(7).randbytes(3_000_000)
            async with stream:
                assert await round_trip(stream, payload) == payload
        nursery.cancel_scope.cancel()
    request = seen[0]
    assert request.peer_identity == CLIENT_ID
    assert (request.host, request.port) == ("127.0.0.1", echo_port)
    assert request.forwarded_for == "10.1.2.3:4567"
    assert request.baggage["k8s.namespace.name"] == "default"
    assert request.baggage["k8s.deployment.name"] == "sleep"
    assert request.traceparent is not None and request.traceparent.startswith("00-")


async def test_half_close_client_still_receives_full_reply() -> None:
    """The upstream answers only after it saw EOF: the reply must survive our send_eof."""
    mesh = make_mesh()
    reply_size = 5 * 1024 * 1024

    async def digest_then_reply(stream: trio.SocketStream) -> None:
        async with stream:
            digest = hashlib.sha256()
            while data := await stream.receive_some(65536):
                digest.update(data)
            await stream.send_all(digest.digest() + b"r" * reply_size)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, digest_then_reply, 0)
        port = listeners[0].socket.getsockname()[1]
        _server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{port}")
            request = b"q" * 1_000_000
            with trio.fail_after(20):
                reply = await round_trip(stream, request)
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert reply[:32] == hashlib.sha256(request).digest()
    assert len(reply) == 32 + reply_size


@pytest.mark.slow
async def test_slow_reader_bounds_memory_and_keeps_bytes_intact() -> None:
    """64 MiB into a reader 10x slower than the writer: intact, and nothing piles up."""
    mesh = make_mesh()
    total = 64 * 1024 * 1024
    chunk = 256 * 1024
    writer_chunk_seconds = 0.0012  # ~210 MB/s, what one process moves through a tunnel
    received = hashlib.sha256()
    peak_buffered = [0]
    server_streams: list[HboneStream] = []

    async def slow_sink(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(chunk):
                received.update(data)
                for tunnel in server_streams:
                    peak_buffered[0] = max(peak_buffered[0], tunnel.buffered)
                # 10x the writer's per-chunk time: the writer must be slowed, not buffered.
                await trio.sleep(writer_chunk_seconds * 10 * len(data) / chunk)

    async def handler(request: ConnectRequest, responder: Responder) -> None:
        upstream = await trio.open_tcp_stream(request.host, request.port)
        async with upstream:
            stream = responder.accept()
            server_streams.append(stream)
            await relay(stream, upstream)

    rng = random.Random(3)
    blocks = [rng.randbytes(chunk) for _ in range(8)]
    sent = hashlib.sha256()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, slow_sink, 0)
        port = listeners[0].socket.getsockname()[1]
        _server, address = await start_server(nursery, mesh, handler)
        async with pool_for(mesh) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{port}")
            tracemalloc.start()
            try:
                with trio.fail_after(120):
                    for index in range(total // chunk):
                        block = blocks[index % len(blocks)]
                        sent.update(block)
                        await stream.send_all(block)
                    await stream.send_eof()
                    assert await stream.receive_some() == b""
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert received.digest() == sent.digest()
    assert peak_buffered[0] <= STREAM_WINDOW
    print(f"peak traced memory {peak / 2**20:.1f} MiB, peak buffered {peak_buffered[0]}")
    assert peak < 32 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


async def test_upstream_refused_is_503_and_handler_denial_is_401() -> None:
    mesh = make_mesh()

    async def deny_or_forward(request: ConnectRequest, responder: Responder) -> None:
        if request.port == 1:
            responder.reject(401, "policy says no")
            return
        await forward_tcp(request, responder)

    async with trio.open_nursery() as nursery:
        _server, address = await start_server(nursery, mesh, deny_or_forward)
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        async with pool_for(mesh) as pool:
            with pytest.raises(TunnelRejectedError, match="503") as info:
                await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                   authority=f"127.0.0.1:{dead_port}")
            assert info.value.status == 503
            with pytest.raises(TunnelRejectedError, match="policy") as info:
                await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                   authority="127.0.0.1:1")
            assert info.value.status == 401
            # Rejections cost only their streams: one connection, still in use.
            assert len(pool.connections()) == 1
        nursery.cancel_scope.cancel()


async def test_handler_that_fails_without_answering_gives_503() -> None:
    mesh = make_mesh()

    async def broken(request: ConnectRequest, responder: Responder) -> None:
        raise RuntimeError("bug in handler")

    async with trio.open_nursery() as nursery:
        _server, address = await start_server(nursery, mesh, broken)
        async with pool_for(mesh) as pool:
            with pytest.raises(TunnelRejectedError) as info:
                await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                   authority="127.0.0.1:9")
            assert info.value.status == 503
        nursery.cancel_scope.cancel()


async def test_many_concurrent_tunnels_each_intact() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            failures: list[int] = []

            async def one(index: int) -> None:
                stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                            authority=f"127.0.0.1:{echo_port}")
                payload = random.Random(index).randbytes(200_000 + index)
                async with stream:
                    if await round_trip(stream, payload) != payload:
                        failures.append(index)

            with trio.fail_after(30):
                async with trio.open_nursery() as clients:
                    for index in range(40):
                        clients.start_soon(one, index)
            assert failures == []
            assert len(pool.connections()) == 1
        nursery.cancel_scope.cancel()


async def test_pool_on_a_certificate_store() -> None:
    from common.certs import CertificateStore, local_issuer
    from common.hbone import HbonePool, store_connector

    mesh = make_mesh()
    store = CertificateStore(local_issuer(mesh.ca))
    async with trio.open_nursery() as nursery:
        echo_port = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        async with HbonePool(store_connector(store, connect_timeout=5.0)) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo_port}")
            async with stream:
                assert await round_trip(stream, b"from the store") == b"from the store"
        nursery.cancel_scope.cancel()
    assert store.cached(CLIENT_ID) is not None
