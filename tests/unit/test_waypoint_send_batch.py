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
from tests.unit.waypoint_helpers import Answer, FakeBackend, Harness, service
from waypoint.h1_shell import serve_h1
from waypoint.http import Data, ResponseHead, ResponseParser
from waypoint.proxy import PeerInfo
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


# --- the HTTP/1.1 shell on a plain TCP client (where it defers its responses) ----------

A = "10.0.0.1:8080"


async def _tcp_client(nursery: trio.Nursery, backend: FakeBackend | None = None
                      ) -> socket.socket:
    """A raw client socket served by a waypoint's serve_h1 over TCP (so its keep-alive
    responses go through the SendBatcher), routing ``echo`` to ``backend``."""
    h = await Harness(nursery, {"services": [service("echo", A)]},
                      {A: backend or FakeBackend("a")}).start()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    nursery.start_soon(serve_h1, TcpStream(theirs), h.waypoint.proxy,
                       PeerInfo(source_ip="10.0.0.9"))
    return ours


async def _read_until_closed(sock: socket.socket, responses: int) -> list[tuple[int, bytes]]:
    """Everything the waypoint sends until it closes the connection (a timeout fails the
    test if it never does), as (status, body) of the ``responses`` responses expected."""
    received = bytearray()
    with trio.fail_after(5):
        while True:
            await trio.lowlevel.wait_readable(sock)
            if not (chunk := sock.recv(65536)):
                break
            received += chunk
    parser = ResponseParser()
    for _ in range(responses):
        parser.expect_response(b"GET")
    parser.feed(bytes(received))
    parser.feed_eof()
    got: list[tuple[int, bytes]] = []
    for event in parser.events():
        if isinstance(event, ResponseHead):
            got.append((event.status, b""))
        elif isinstance(event, Data):
            got[-1] = (got[-1][0], got[-1][1] + bytes(event.data))
    return got


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: echo\r\n{extra}\r\n".encode()


async def test_pipelined_responses_over_tcp_keep_their_order(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a", lambda seen: Answer(body=seen.head.target))
    sock = await _tcp_client(nursery, backend)
    nowhere = b"GET /2 HTTP/1.1\r\nhost: nowhere\r\n\r\n"  # a local 404, no upstream wait
    sock.sendall(_get("/1") + nowhere + _get("/3") + _get("/4", "connection: close\r\n"))
    got = await _read_until_closed(sock, 4)
    assert got == [(200, b"/1"), (404, b""), (200, b"/3"), (200, b"/4")]
    sock.close()


async def test_a_deferred_response_arrives_before_the_close_on_client_eof(
        nursery: trio.Nursery) -> None:
    sock = await _tcp_client(nursery)
    sock.sendall(_get("/"))
    sock.shutdown(socket.SHUT_WR)  # the client's EOF ends the loop right after the answer
    assert await _read_until_closed(sock, 1) == [(200, b"ok")]
    sock.close()


async def test_a_bad_request_after_a_deferred_response_is_answered_after_it(
        nursery: trio.Nursery) -> None:
    sock = await _tcp_client(nursery)
    sock.sendall(_get("/") + b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
    got = await _read_until_closed(sock, 2)
    assert [status for status, _ in got] == [200, 400]
    sock.close()


async def test_large_pipelined_responses_to_a_client_that_reads_late_arrive_whole(
        nursery: trio.Nursery) -> None:
    # Each response is far larger than the socket buffers: the batch's writes end
    # partial, later responses queue behind them, and nothing is lost or reordered.
    backend = FakeBackend("a", lambda seen: Answer(body=seen.head.target * 40_000))
    sock = await _tcp_client(nursery, backend)
    paths = [f"/{i:02d}" for i in range(12)]
    sock.sendall(b"".join(_get(p) for p in paths[:-1]) + _get(paths[-1], "connection: close\r\n"))
    await trio.testing.wait_all_tasks_blocked()  # the waypoint is stuck on full buffers
    got = await _read_until_closed(sock, len(paths))
    assert got == [(200, p.encode() * 40_000) for p in paths]
    sock.close()
