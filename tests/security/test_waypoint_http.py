"""Hostile HTTP at the waypoint, over the wire: refused, logged once, nothing smuggled.

The parser's own table of bad shapes (every smuggling variant, invalid bytes, limits)
is ``tests/unit/test_h1_errors.py``; here a representative of each family goes through a
real waypoint, to pin what the parser cannot: the answer on the wire, that the
connection closes, that nothing reached the backend, that a good client on another
connection kept working, and the deadlines of the connection loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import structlog
import trio

from tests.security.conftest import HEADER_TIMEOUT, STREAM_IDLE, BenchWaypoint
from tests.security.support import traced_memory

BAD_REQUEST = "bad request from client"


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry.get("event") == name]


async def exchange(port: int, data: bytes, within: float = 10.0) -> bytes:
    """Send ``data`` and read until the waypoint closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(within):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return bytes(received)


async def good_request(port: int) -> None:
    reply = await exchange(port, b"GET /good HTTP/1.1\r\nHost: backend\r\n"
                                 b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


SMUGGLING = {
    "cl-and-te": b"POST /a HTTP/1.1\r\nHost: backend\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
                 b"Host: backend\r\n\r\n",
    "duplicate-cl": b"POST /a HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n"
                    b"Content-Length: 44\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: backend\r\n\r\n",
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: backend\r\nX-A: 1\r\n Transfer-Encoding: chunked"
                b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: backend\r\n\r\n",
    "te-lookalike": b"POST /a HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: xchunked\r\n"
                    b"Content-Length: 3\r\n\r\nabc",
    "nul-in-value": b"GET /a HTTP/1.1\r\nHost: backend\r\nX-A: a\x00b\r\n\r\n",
    "bare-cr": b"GET /a HTTP/1.1\r\nHost: backend\r\nX-A: a\rb\r\n\r\n",
    "non-ascii-name": b"GET /a HTTP/1.1\r\nHost: backend\r\nX-\xe9: 1\r\n\r\n",
}


@pytest.mark.parametrize("wire", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_hostile_request_is_refused_and_nothing_reaches_the_backend(
        bench: BenchWaypoint, wire: bytes) -> None:
    with structlog.testing.capture_logs() as logs:
        reply = await exchange(bench.port, wire)
    assert status_of(reply) == 400, reply[:200]
    assert b"connection: close" in reply.lower()
    assert bench.seen == [], bench.seen  # neither the outer nor a smuggled request
    assert len(events(logs, BAD_REQUEST)) == 1
    await good_request(bench.port)


async def test_a_megabyte_of_headers_is_refused_with_bounded_memory(bench: BenchWaypoint) -> None:
    head = b"GET / HTTP/1.1\r\nHost: backend\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(1100)) + b"\r\n"
    assert len(head) > 2**20
    with structlog.testing.capture_logs() as logs, traced_memory() as memory:
        stream = await trio.open_tcp_stream("127.0.0.1", bench.port)
        async with stream:
            received = bytearray()

            async def send() -> None:
                # The waypoint may answer and close before it took everything.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(head)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with trio.fail_after(10):
                    try:
                        while chunk := await stream.receive_some(65536):
                            received += chunk
                    except trio.BrokenResourceError:
                        pass
    assert status_of(bytes(received)) == 431, bytes(received[:200])
    assert bench.seen == []
    assert len(events(logs, BAD_REQUEST)) == 1
    assert memory.peak < 4 * 2**20, f"peak {memory.peak / 2**20:.1f} MiB"
    await good_request(bench.port)


async def test_slowloris_head_is_cut_at_the_header_timeout(bench: BenchWaypoint) -> None:
    """Headers a byte at a time (here a byte per 50 ms, sped up from a byte a second):
    the connection gets 408 and is closed once the header timeout passes, while a good
    client is served meanwhile."""
    head = b"GET /slow HTTP/1.1\r\nHost: backend\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", bench.port)
    started = trio.current_time()
    received = bytearray()
    sent = 0
    async with stream:
        with trio.fail_after(HEADER_TIMEOUT + 5):
            async with trio.open_nursery() as nursery:
                async def trickle() -> None:
                    nonlocal sent
                    try:
                        for byte in head:
                            await stream.send_all(bytes([byte]))
                            sent += 1
                            await trio.sleep(0.05)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(trickle)
                await good_request(bench.port)
                while chunk := await stream.receive_some(65536):
                    received += chunk
                nursery.cancel_scope.cancel()
    closed_after = trio.current_time() - started
    assert status_of(bytes(received)) == 408
    assert sent < len(head)
    assert HEADER_TIMEOUT <= closed_after < HEADER_TIMEOUT + 1.0, closed_after
    assert bench.seen == ["/good"]


async def test_a_body_that_stops_halfway_is_closed_at_the_stream_idle_timeout(
        bench: BenchWaypoint) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", bench.port)
    started = trio.current_time()
    async with stream:
        await stream.send_all(b"POST /half HTTP/1.1\r\nHost: backend\r\nContent-Length: 1000"
                              b"\r\n\r\n" + b"x" * 500)
        await good_request(bench.port)
        with trio.fail_after(STREAM_IDLE + 5):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass  # a reset is as good as a close: the point is that it ends
    elapsed = trio.current_time() - started
    assert elapsed < STREAM_IDLE + 1.5, elapsed
    assert "/half" not in bench.seen[1:]  # the backend never got a complete request


async def test_a_body_cut_by_a_client_half_close_ends_at_once(bench: BenchWaypoint) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", bench.port)
    async with stream:
        await stream.send_all(b"POST /cut HTTP/1.1\r\nHost: backend\r\nContent-Length: 1000"
                              b"\r\n\r\n" + b"x" * 500)
        await stream.send_eof()
        with trio.fail_after(STREAM_IDLE / 2):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
    await good_request(bench.port)


async def test_pipelined_requests_are_answered_in_order(bench: BenchWaypoint) -> None:
    paths = [f"/p{i}" for i in range(10)]
    wire = b"".join(b"GET %s HTTP/1.1\r\nHost: backend\r\n\r\n" % p.encode() for p in paths)
    wire += b"GET /last HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
    reply = await exchange(bench.port, wire)
    assert reply.count(b"HTTP/1.1 200") == len(paths) + 1
    order = [p for p in [*paths, "/last"] if f'"path": "{p}"'.encode() in reply
             or f'"path":"{p}"'.encode() in reply]
    positions = [reply.index(p.encode() + b'"') for p in order]
    assert order == [*paths, "/last"] and positions == sorted(positions)
    assert bench.seen == [*paths, "/last"]


async def test_h2c_continuation_flood_is_cut_off_with_bounded_memory(
        bench: BenchWaypoint) -> None:
    """CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION frames forever."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    stream = await trio.open_tcp_stream("127.0.0.1", bench.port)
    block = b"\x00" * 16_000  # never a complete HPACK block: the server must count bytes
    headers = b"\x00\x3e\x80\x01\x00\x00\x00\x00\x01" + block  # HEADERS, stream 1, no flags
    continuation = b"\x00\x3e\x80\x09\x00\x00\x00\x00\x01" + block
    sent = 0
    goaway = False
    with structlog.testing.capture_logs(), traced_memory() as memory:
        async with stream:
            await stream.send_all(client.data_to_send() + headers)
            with trio.fail_after(20):
                try:
                    for _ in range(1000):  # up to 16 MB of header block
                        await stream.send_all(continuation)
                        sent += len(continuation)
                        with trio.move_on_after(0):
                            data = await stream.receive_some(65536)
                            if not data:
                                break
                            goaway = goaway or any(
                                isinstance(e, h2.events.ConnectionTerminated)
                                for e in client.receive_data(data))
                        if goaway:
                            break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                if not goaway:
                    try:
                        while data := await stream.receive_some(65536):
                            goaway = goaway or any(
                                isinstance(e, h2.events.ConnectionTerminated)
                                for e in client.receive_data(data))
                    except trio.BrokenResourceError:
                        pass
    print(f"sent {sent} bytes of CONTINUATION before the cut; peak {memory.peak / 2**20:.1f} MiB")
    assert goaway, "no GOAWAY before the connection ended"
    assert sent < 4 * 2**20
    assert memory.peak < 8 * 2**20
    await good_request(bench.port)
