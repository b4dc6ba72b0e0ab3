"""An in-process keep-alive HTTP/1.1 load client (trio), with latency and error counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

_REQUEST = b"GET /load HTTP/1.1\r\nHost: backend\r\n\r\n"


@dataclass
class Stats:
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_times: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_times.append(trio.current_time())
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> int:
    """Read one response with a content-length body; return its status."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed before a response")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed inside a response body")
        rest += chunk
    buffer[:] = rest[length:]
    return int(head.split(b" ", 2)[1])


async def keepalive_worker(port: int, stats: Stats, until: float, *, pause: float = 0.0,
                           reconnect: bool = True) -> None:
    """Requests one after another on one connection until ``until`` (trio time)."""
    while trio.current_time() < until:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            stats.error("connect")
            if not reconnect:
                return
            await trio.sleep(0.01)
            continue
        buffer = bytearray()
        async with stream:
            try:
                while trio.current_time() < until:
                    started = trio.current_time()
                    await stream.send_all(_REQUEST)
                    status = await read_response(stream, buffer)
                    if status == 200:
                        stats.ok += 1
                        stats.latencies.append(trio.current_time() - started)
                    else:
                        stats.error(f"status {status}")
                    if pause:
                        await trio.sleep(pause)
            except (OSError, EOFError, trio.BrokenResourceError) as exc:
                stats.error(type(exc).__name__)
                if not reconnect:
                    return
