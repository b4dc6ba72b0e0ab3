"""The waypoint's SendBatcher: writes deferred by many connections go out together,
in order per stream, whole even when the kernel takes them in part, and never to a
stream its owner closed; and the HTTP/1.1 shell's use of it on plain TCP clients."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from common.tcp import TcpStream
from waypoint.upstream import SendBatcher

Pairs = list[tuple[TcpStream, socket.socket]]


@pytest.fixture
async def pairs() -> AsyncIterator[Pairs]:
    """Connected (stream, peer socket) pairs made by ``make``; all closed afterwards."""
    made: Pairs = []
    yield made
    for stream, peer in made:
        stream.close()
        peer.close()


def make(pairs: Pairs) -> tuple[TcpStream, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    pair = (TcpStream(a), b)
    pairs.append(pair)
    return pair


async def read_exactly(peer: socket.socket, size: int) -> bytes:
    got = b""
    with trio.fail_after(5):
        while len(got) < size:
            await trio.lowlevel.wait_readable(peer)
            chunk = peer.recv(size - len(got))
            assert chunk, "peer closed early"
            got += chunk
    return got


async def test_deferred_writes_wait_for_the_pass_then_go_out_in_order(pairs: Pairs) -> None:
    batcher = SendBatcher()
    (s1, p1), (s2, p2) = make(pairs), make(pairs)
    batcher.defer(s1, b"one ")
    batcher.defer(s2, b"two")
    batcher.defer(s1, b"more")
    with pytest.raises(BlockingIOError):
        p1.recv(100)  # nothing is written until this task yields
    assert await read_exactly(p1, 8) == b"one more"
    assert await read_exactly(p2, 3) == b"two"
    batcher.defer(s2, b"again")  # the parked sender wakes for a later pass
    assert await read_exactly(p2, 5) == b"again"


async def test_drain_sends_the_deferred_bytes_before_the_owners_own(pairs: Pairs) -> None:
    batcher = SendBatcher()
    stream, peer = make(pairs)
    batcher.defer(stream, b"first,")
    await batcher.drain(stream)
    await stream.send_all(b"second")
    assert await read_exactly(peer, 12) == b"first,second"


async def test_a_partial_write_is_finished_and_later_writes_queue_behind_it(
        pairs: Pairs) -> None:
    batcher = SendBatcher()
    stream, peer = make(pairs)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffer
    batcher.defer(stream, big)
    await trio.testing.wait_all_tasks_blocked()
    batcher.defer(stream, b"tail")  # while the finisher still waits for room
    drained = False

    async def owner() -> None:
        nonlocal drained
        await batcher.drain(stream)
        drained = True
        await stream.send_all(b"own")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        assert await read_exactly(peer, len(big) + 7) == big + b"tail" + b"own"
    assert drained


async def test_a_stream_closed_by_its_owner_is_skipped_and_a_broken_one_closed(
        pairs: Pairs) -> None:
    batcher = SendBatcher()
    (closed, _), (broken, broken_peer), (fine, fine_peer) = (make(pairs), make(pairs),
                                                            make(pairs))
    batcher.defer(closed, b"never")
    closed.close()
    broken_peer.close()
    batcher.defer(broken, b"x" * 100_000)
    batcher.defer(fine, b"ok")
    assert await read_exactly(fine_peer, 2) == b"ok"
    with trio.fail_after(5):
        while True:  # the failed write closed the stream, so its reader learns it
            try:
                broken.try_send(b"")
            except trio.ClosedResourceError:
                break
            await trio.sleep(0.01)


async def test_release_writes_what_the_kernel_takes_without_waiting(pairs: Pairs) -> None:
    batcher = SendBatcher()
    stream, peer = make(pairs)
    batcher.defer(stream, b"last response")
    batcher.release(stream)
    stream.close()
    await trio.lowlevel.checkpoint()
    assert peer.recv(100) == b"last response"
