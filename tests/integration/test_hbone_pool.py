"""The HBONE connection pool: stream limits, idle release, peers that go away, cancellation."""

from __future__ import annotations

import functools

import trio
import trio.testing

from common.hbone import ConnectRequest, HboneStream, Responder, forward_tcp
from tests.integration.hbone_support import (
    CLIENT_ID,
    SERVER_ID,
    listen,
    make_mesh,
    pool_for,
    round_trip,
    start_echo,
    start_server,
    wait_until,
)


async def test_more_than_100_streams_open_a_second_connection() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            streams: list[HboneStream] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as openers:
                    async def open_one() -> None:
                        streams.append(await pool.connect(
                            CLIENT_ID, address, expected={SERVER_ID},
                            authority=f"127.0.0.1:{echo}"))
                    for _ in range(150):
                        openers.start_soon(open_one)
            connections = pool.connections()
            assert len(connections) == 2
            assert sorted(c.active_streams for c in connections) == [50, 100]
            # Every one of them is a working tunnel.
            async with trio.open_nursery() as users:
                for stream in streams:
                    users.start_soon(round_trip, stream, b"ping")
            for stream in streams:
                await stream.aclose()
            assert sum(c.active_streams for c in pool.connections()) == 0
        nursery.cancel_scope.cancel()


async def test_idle_connection_is_released_after_the_timeout() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server, address = await start_server(nursery, mesh)
        async with pool_for(mesh, idle_timeout=0.3) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                assert await round_trip(stream, b"x") == b"x"
            assert len(pool.connections()) == 1
            started = trio.current_time()
            await wait_until(lambda: not pool.connections() and not server.connections)
            assert trio.current_time() - started >= 0.25
        nursery.cancel_scope.cancel()


async def test_server_closes_connections_idle_past_its_timeout() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server, address = await start_server(nursery, mesh, idle_timeout=0.3)
        async with pool_for(mesh, idle_timeout=60) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                assert await round_trip(stream, b"x") == b"x"
            # The server's GOAWAY retires the client's connection long before its own
            # 60 s idle timeout; the next stream simply gets a new connection.
            await wait_until(lambda: not pool.connections() and not server.connections)
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                assert await round_trip(stream, b"y") == b"y"
        nursery.cancel_scope.cancel()


async def test_busy_connection_is_not_released() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        async with pool_for(mesh, idle_timeout=0.1) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            connection = pool.connections()[0]
            # Ten idle timeouts pass while the stream is open: the connection stays.
            for _ in range(10):
                await stream.send_all(b"a")
                assert await stream.receive_some() == b"a"
                await trio.sleep(0.1)
            assert pool.connections() == [connection]
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_peer_restart_next_stream_gets_fresh_connection() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        async with trio.open_nursery() as first:
            _server, address = await start_server(first, mesh)
            async with pool_for(mesh) as pool:
                stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                            authority=f"127.0.0.1:{echo}")
                async with stream:
                    assert await round_trip(stream, b"before") == b"before"
                old = pool.connections()
                first.cancel_scope.cancel()
                # The old server is gone (its sockets closed) and a new one takes its port.
                await trio.lowlevel.checkpoint()
                _server2, address2 = await start_server(nursery, mesh, port=address[1])
                assert address2 == address
                # No waiting for the pool to notice: the very next connect must work.
                stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                            authority=f"127.0.0.1:{echo}")
                async with stream:
                    assert await round_trip(stream, b"after") == b"after"
                assert pool.connections() and pool.connections() != old
        nursery.cancel_scope.cancel()


async def test_graceful_drain_sends_goaway_and_next_stream_uses_fresh_connection() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            long_lived = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                            authority=f"127.0.0.1:{echo}")
            old = pool.connections()[0]
            for connection in list(server.connections):
                connection.close()  # GOAWAY(NO_ERROR), as drain does
            await wait_until(lambda: not old.available)
            # The stream already open keeps working after the GOAWAY ...
            assert await round_trip(long_lived, b"in flight") == b"in flight"
            await long_lived.aclose()
            # ... and a new stream goes to the (still running) server on a fresh connection.
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                assert await round_trip(stream, b"new") == b"new"
            assert old not in pool.connections()
        nursery.cancel_scope.cancel()


async def test_server_drain_lets_streams_finish_then_stops() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            finished = trio.Event()

            async def finish_stream() -> None:
                assert await round_trip(stream, b"last words") == b"last words"
                await stream.aclose()
                finished.set()

            async def drain() -> None:
                with trio.fail_after(10):
                    await server.drain(grace=5.0)

            async with trio.open_nursery() as work:
                work.start_soon(drain)
                await trio.lowlevel.checkpoint()
                work.start_soon(finish_stream)
            assert finished.is_set()
            assert not server.connections
        nursery.cancel_scope.cancel()


async def test_cancelled_connects_leak_no_pool_capacity() -> None:
    mesh = make_mesh()
    answer = trio.Event()

    async def slow_handler(request: ConnectRequest, responder: Responder) -> None:
        await answer.wait()
        await forward_tcp(request, responder)

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh, slow_handler)
        async with pool_for(mesh) as pool:
            with trio.move_on_after(0.5):
                async with trio.open_nursery() as openers:
                    for _ in range(120):
                        openers.start_soon(functools.partial(
                            pool.connect, CLIENT_ID, address, expected={SERVER_ID},
                            authority=f"127.0.0.1:{echo}"))
            # Everything was cancelled mid-way: no stream still counts against the pool.
            assert sum(c.active_streams for c in pool.connections()) == 0
            answer.set()
            stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                        authority=f"127.0.0.1:{echo}")
            async with stream:
                assert await round_trip(stream, b"ok") == b"ok"
            assert len(pool.connections()) <= 2
        nursery.cancel_scope.cancel()


async def test_cancelled_opener_does_not_fail_the_callers_waiting_for_its_connection() -> None:
    """Plain TCP under HBONE here: the pool logic, not TLS, is under test."""
    import socket as stdlib_socket

    from common.hbone import HbonePool, HboneServer, PoolKey

    async def plain_handshake(sock: stdlib_socket.socket) -> tuple[trio.SocketStream, None]:
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), None

    first_call = trio.Event()
    calls = 0

    async def connector(key: PoolKey) -> tuple[trio.SocketStream, None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_call.set()
            await trio.sleep_forever()  # the first opener hangs until cancelled
        return await trio.open_tcp_stream(*key.address), None

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        sock = listen()
        await nursery.start(HboneServer(forward_tcp, plain_handshake).serve, sock)
        address = sock.getsockname()
        async with HbonePool(connector) as pool:
            results: list[bytes] = []
            opener_scope = trio.CancelScope()

            async def opener() -> None:
                with opener_scope:
                    await pool.connect(None, address, authority=f"127.0.0.1:{echo}")

            async def waiter() -> None:
                stream = await pool.connect(None, address, authority=f"127.0.0.1:{echo}")
                async with stream:
                    results.append(await round_trip(stream, b"waited"))

            with trio.fail_after(10):
                async with trio.open_nursery() as callers:
                    callers.start_soon(opener)
                    await first_call.wait()
                    callers.start_soon(waiter)
                    await trio.testing.wait_all_tasks_blocked()
                    opener_scope.cancel()
            assert results == [b"waited"]
            assert calls == 2
        nursery.cancel_scope.cancel()
