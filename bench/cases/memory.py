"""Case 5: memory per connection.

* ztunnel (and Envoy's pair) with N idle tunneled connections (10,000; 1,000 with
  --quick): a holder process in the client pod opens N keep-alive connections through the
  pair, sends one request on each, and holds them.  KiB per idle connection =
  (RSS with N - RSS with 0) / N, for the client-side and the server-side proxy each.
* per active connection: M connections (1,000; 200 with --quick) each sending requests
  back to back for a few seconds; (peak RSS - RSS with 0) / M.
* the waypoint (and Envoy L7) with 1,000 keep-alive clients (200 with --quick).

Each measurement starts from freshly started proxies: an allocator that already grew for
an earlier phase would reuse that memory and hide the cost being measured.  The holder is
a subprocess (``python -m bench.cases.memory --host H --port P --count N [--busy S]``) so
that its sockets live in the client pod's namespace.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import trio

from bench.harness import (
    PYTHON,
    REPO,
    BenchError,
    CaseResult,
    Context,
    Target,
    in_netns,
    row,
    rss_kib,
)
from bench.loadgen import Connection

CASE = "memory"
OPEN_CONCURRENCY = 100  #: connections being opened at once by the holder
SETTLE_SECONDS = 1.0  #: after the last connection opened, before RSS is read


def per_connection(pids: Sequence[int], host: str, port: int, count: int, netns: str | None,
                   busy: float = 0.0) -> list[float]:
    """KiB per connection of each of ``pids`` while a holder keeps ``count`` connections.

    Idle (``busy`` 0): RSS once all are open and settled.  Busy: peak RSS while every
    connection sends requests back to back for ``busy`` seconds.
    """
    before = [rss_kib(pid) for pid in pids]
    peak = list(before)
    argv = [PYTHON, "-m", "bench.cases.memory", "--host", host, "--port", str(port), "--count",
            str(count), "--busy", str(busy)]
    holder = subprocess.Popen(in_netns(netns, argv), cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for i, pid in enumerate(pids):
                peak[i] = max(peak[i], rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        if not line.startswith(b"holding"):
            assert holder.stderr is not None
            last = holder.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            raise BenchError(f"holder of {count} connections to {host}:{port} failed: {last}")
        if not busy:
            time.sleep(SETTLE_SECONDS)  # a benchmark, not a test: let the proxies settle
            peak = [rss_kib(pid) for pid in pids]
        holder.stdin.close()
        holder.wait(60)
    finally:
        stop.set()
        sampler.join()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    return [(p - b) / count for p, b in zip(peak, before, strict=True)]


def run(ctx: Context) -> list[CaseResult]:
    idle_n = 1_000 if ctx.quick else 10_000
    active_n = 200 if ctx.quick else 1_000
    clients = 200 if ctx.quick else 1_000
    busy = min(ctx.seconds, 5.0)
    idle: dict[str, list[list[float]]] = {"ours": [], "envoy": []}
    active: dict[str, list[list[float]]] = {"ours": [], "envoy": []}
    for phase, store, count, seconds in (("idle", idle, idle_n, 0.0),
                                          ("active", active, active_n, busy)):
        env = ctx.l4(fresh=True)
        for name in ("ours", "envoy"):
            t = env.targets[name]
            store[name].append(per_connection(t.pids, t.host, t.port, count, t.netns,
                                              busy=seconds))
            ctx.log(f"  {name}: KiB per {phase} connection (client, server side) "
                    f"{[round(v, 2) for v in store[name][-1]]}")
    rows: list[CaseResult] = []
    for side, i in (("client-side", 0), ("server-side", 1)):
        rows.append(row(CASE, f"{side} proxy KiB per idle tunneled connection ({idle_n:,})",
                        "KiB", {n: [r[i] for r in v] for n, v in idle.items()},
                        target=Target(kind="value", op="<=", threshold=20.0),
                        note="ours: ztunnel node1/node2; envoy: HBONE client/server"))
        rows.append(row(CASE, f"{side} proxy KiB per active connection ({active_n:,})", "KiB",
                        {n: [r[i] for r in v] for n, v in active.items()}))
    l7 = ctx.l7(fresh=True)
    per_client = {name: per_connection([l7.pids[name]], "127.0.0.1", l7.ports[name], clients,
                                       None)[0]
                  for name in ("ours", "envoy")}
    rows.append(row(CASE, f"L7 proxy KiB per keep-alive client ({clients:,})", "KiB",
                    {n: [v] for n, v in per_client.items()},
                    note="RSS after: " + ", ".join(f"{n} {rss_kib(l7.pids[n]) / 1024:.0f} MiB"
                                                   for n in ("ours", "envoy"))))
    return rows


async def hold(host: str, port: int, count: int, busy: float) -> None:
    """Open ``count`` connections with one request each (then keep them busy for ``busy``
    seconds), say ``holding``, and keep them open until stdin closes."""
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    conns = [Connection(host, port, request) for _ in range(count)]
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)

    async def open_one(conn: Connection) -> None:
        async with limiter:
            await conn.exchange()

    async def keep_busy(conn: Connection, until: float) -> None:
        while trio.current_time() < until:
            await conn.exchange()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(open_one, conn)
        if busy:
            until = trio.current_time() + busy
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(keep_busy, conn, until)
    print(f"holding {count}", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    for conn in conns:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="hold keep-alive connections open")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--busy", type=float, default=0.0)
    args = parser.parse_args()
    trio.run(hold, args.host, args.port, args.count, args.busy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
