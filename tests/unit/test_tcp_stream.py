"""common.tcp.TcpStream: syscall first, wait second, with trio's stream contract intact."""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from common.tcp import TcpStream, open_tcp


@pytest.fixture
async def pair() -> AsyncIterator[tuple[TcpStream, TcpStream]]:
    a, b = socket.socketpair()
    left, right = TcpStream(a), TcpStream(b)
    yield left, right
    await left.aclose()
    await right.aclose()


def _shrink(stream: TcpStream) -> None:
    # Small kernel buffers, so that a write of a few hundred KiB would block.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def test_try_send_takes_what_fits_and_send_all_finishes_in_order(
        pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    _shrink(left)
    payload = random.Random(1).randbytes(2 * 1024 * 1024)
    taken = left.try_send(payload)
    assert 0 < taken < len(payload)  # the socket was full before the payload was in
    assert left.try_send(payload[taken:]) == 0  # still full: nothing taken, no waiting
    received = hashlib.sha256()
    count = 0

    async def drain() -> None:
        nonlocal count
        while count < len(payload):
            data = await right.receive_some(65536)
            received.update(data)
            count += len(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await left.send_all(payload[taken:])
    assert received.digest() == hashlib.sha256(payload).digest()


async def test_cancelled_receive_loses_nothing(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    await left.send_all(b"x")
    assert await right.receive_some(10) == b"x"  # a short read: the next one waits first
    with trio.move_on_after(0.05) as scope:
        await right.receive_some(10)
    assert scope.cancelled_caught
    await left.send_all(b"after")
    with trio.fail_after(5):
        assert await right.receive_some(10) == b"after"


async def test_receive_into_a_callers_buffer(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    await left.send_all(b"hello")
    buffer = memoryview(bytearray(16))
    with trio.fail_after(5):
        count = await right.receive_into(buffer)
    assert bytes(buffer[:count]) == b"hello"


async def test_send_eof_half_closes(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    await left.send_all(b"request")
    await left.send_eof()
    with trio.fail_after(5):
        data = b""
        while chunk := await right.receive_some():
            data += chunk
        assert data == b"request"
        await right.send_all(b"reply after EOF")
        assert await left.receive_some() == b"reply after EOF"


async def test_close_wakes_a_waiting_receiver_with_closed_error(
        pair: tuple[TcpStream, TcpStream]) -> None:
    _left, right = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await right.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await right.aclose()
    with pytest.raises(trio.ClosedResourceError):
        right.try_send(b"x")


async def test_peer_reset_is_broken_resource(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    right.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(3):  # the first write may still be accepted
            await left.send_all(b"x" * 65536)


async def test_open_tcp_refused_is_an_oserror() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError, match=r"connect to 127\.0\.0\.1"):
        await open_tcp("127.0.0.1", port)


async def test_open_tcp_connects_with_nagle_off() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        stream = await open_tcp("127.0.0.1", server.getsockname()[1])
        async with stream:
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
