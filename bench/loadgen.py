"""A fixed-rate HTTP/1.1 load client: latency measured from the scheduled time.

``wrk`` runs a closed loop (a connection sends its next request only when the last one
answered), so a slow response delays the requests behind it and they are never counted
as late: coordinated omission.  ``wrk2`` fixes that, but Debian does not ship it.

Theory of operation: request ``i`` is *scheduled* at ``start + i / rate``.  A scheduler
task wakes at each scheduled time and starts a request task, whatever the state of the
previous requests; the request task takes an idle keep-alive connection from a pool
(waiting if all are busy), sends, reads the response, and records ``done - scheduled``.
Time spent waiting for a free connection is therefore part of the latency, as it would
be for a real client that wanted to send at that moment.

Run: ``python -m bench.loadgen --host H --port P --rate 1000 --seconds 5 [--connections 16]``;
prints one JSON object (``rate``, ``completed``, ``errors``, ``p50_ms``, ``p99_ms``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import trio

#: Requests still waiting or in flight beyond this are counted as errors (not started),
#: so a stalled target cannot make the client grow without bound.
MAX_OUTSTANDING = 10_000
#: A response slower than this counts as an error.
REQUEST_TIMEOUT = 10.0
READ_SIZE = 64 * 1024


class LoadgenError(Exception):
    """The target answered something this client cannot read (not a 2xx with a length)."""


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    target_rate: float
    seconds: float
    completed: int
    errors: int
    rate: float  #: completed responses per second, until the last one arrived
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, nearest-rank; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def content_length(head: bytes) -> int:
    """The body length announced in a response head; raises if it is not a 2xx with one."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].startswith(b"2"):
        raise LoadgenError(f"unexpected status line {lines[0]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    raise LoadgenError("response without Content-Length (chunked is not supported)")


class Connection:
    """One keep-alive HTTP/1.1 connection sending GET requests one at a time.

    After a failure the connection is dropped and the next exchange opens a new one, so
    the pool keeps its size whatever happens to single connections.
    """

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.address = (host, port)
        self.request = request
        self.stream: trio.SocketStream | None = None
        self.buffer = bytearray()

    async def connect(self) -> None:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(*self.address)

    async def exchange(self) -> None:
        try:
            await self.connect()
            await self._exchange()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.stream is not None:
            self.stream.socket.close()
        self.stream = None
        self.buffer.clear()

    async def _exchange(self) -> None:
        assert self.stream is not None
        await self.stream.send_all(self.request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        total = end + 4 + content_length(bytes(self.buffer[:end]))
        while len(self.buffer) < total:
            await self._fill()
        del self.buffer[:total]

    async def _fill(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(READ_SIZE)
        if not data:
            raise LoadgenError("connection closed by the target")
        self.buffer += data


async def run_fixed_rate(host: str, port: int, *, rate: float, seconds: float,
                         connections: int = 16, path: str = "/") -> LoadResult:
    """Send GET ``path`` at ``rate`` requests/s for ``seconds`` over ``connections``."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    idle_send, idle_receive = trio.open_memory_channel[Connection](connections)
    pool = [Connection(host, port, request) for _ in range(connections)]
    for conn in pool:
        await conn.connect()
        idle_send.send_nowait(conn)
    latencies: list[float] = []
    errors = 0
    outstanding = 0
    total = int(rate * seconds)

    async def one(scheduled: float) -> None:
        nonlocal errors, outstanding
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                conn = await idle_receive.receive()
                try:
                    await conn.exchange()
                finally:
                    idle_send.send_nowait(conn)
            latencies.append(trio.current_time() - scheduled)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, LoadgenError):
            errors += 1
        finally:
            outstanding -= 1

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for i in range(total):
            scheduled = start + i / rate
            await trio.sleep_until(scheduled)
            if outstanding >= MAX_OUTSTANDING:
                errors += 1
                continue
            outstanding += 1
            nursery.start_soon(one, scheduled)
    # A target that cannot keep up finishes late: the achieved rate shows it.
    elapsed = max(seconds, trio.current_time() - start)
    for conn in pool:
        conn.close()
    ms = [s * 1000 for s in latencies]
    return LoadResult(target_rate=rate, seconds=seconds, completed=len(ms), errors=errors,
                      rate=len(ms) / elapsed, p50_ms=percentile(ms, 50),
                      p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99),
                      max_ms=max(ms, default=0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    result = trio.run(lambda: run_fixed_rate(
        args.host, args.port, rate=args.rate, seconds=args.seconds,
        connections=args.connections, path=args.path))
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
