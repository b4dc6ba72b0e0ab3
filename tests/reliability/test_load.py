"""Load through a bench waypoint process: many keep-alive connections, and churn.

The waypoint and its echo backend are real processes (their RSS and file descriptors
are read from /proc); the load client runs in the test process.  The full versions
are ``slow``; ``RELIABILITY_LOAD_SECONDS`` shortens them for a local try.
"""

from __future__ import annotations

import errno
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.reliability.loadclient import Stats, read_response
from tests.reliability.procs import (
    Proc,
    start_echo,
    start_waypoint,
    wait_serving,
    write_bench_config,
)
from waypoint.listener import DETECT_TIMEOUT

SECONDS = float(os.environ.get("RELIABILITY_LOAD_SECONDS", "60"))
RAMP_PER_SECOND = 200
REQUEST = b"GET /load HTTP/1.1\r\nHost: backend\r\n\r\n"


@pytest.fixture
def waypoint(tmp_path: Path) -> Iterator[Proc]:
    echoes = [start_echo(), start_echo()]
    proxy = start_waypoint(write_bench_config(tmp_path / "bench.yaml", [e.port for e in echoes]))
    try:
        yield proxy
    finally:
        for proc in (proxy, *echoes):
            proc.stop()


class Lag:
    """How far behind its own schedule the load client (this process) ran.

    The client shares two cores with the waypoint, the echo backends and whatever else
    the machine runs; when it falls far enough behind it is the client, not the
    waypoint, that is slow, and a zero-error verdict would measure the machine.
    """

    def __init__(self) -> None:
        self.worst = 0.0

    async def probe(self, until: float, every: float = 0.1) -> None:
        while trio.current_time() < until:
            planned = trio.current_time() + every
            await trio.sleep_until(planned)
            self.worst = max(self.worst, trio.current_time() - planned)


async def _keepalive(port: int, stats: Stats, until: float, pause: float,
                     late_first: list[float]) -> None:
    """One keep-alive connection: a request about every ``pause`` seconds until ``until``.

    Records how late the first request left after the connection was up, and errors by
    errno, so a refusal can be told from a client that fell behind.
    """
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        stats.error(f"connect {_errno_name(exc)}")
        return
    connected = trio.current_time()
    first = True
    buffer = bytearray()
    async with stream:
        try:
            while trio.current_time() < until:
                started = trio.current_time()
                if first:
                    late_first.append(started - connected)
                    first = False
                await stream.send_all(REQUEST)
                status = await read_response(stream, buffer)
                if status == 200:
                    stats.ok += 1
                    stats.latencies.append(trio.current_time() - started)
                else:
                    stats.error(f"status {status}")
                await trio.sleep(pause)
        except (OSError, EOFError, trio.BrokenResourceError) as exc:
            stats.error(f"{type(exc).__name__} {_errno_name(exc)}".strip())


def _errno_name(exc: BaseException | None) -> str:
    """The errno behind ``exc`` (trio chains the OSError as the cause, a failed connect
    as a group of the attempts' errors), or ''."""
    while exc is not None:
        code = getattr(exc, "errno", None)
        if code:
            return errno.errorcode.get(code, str(code))
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        else:
            exc = exc.__cause__
    return ""


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (this
    network namespace, all listeners): a client then sees ECONNRESET on a connection it
    took for established."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(fields.get("ListenOverflows", 0))
    return 0


async def _sample_rss(proc: Proc, samples: list[tuple[float, int]], start: float,
                      until: float) -> None:
    while trio.current_time() < until:
        samples.append((trio.current_time() - start, proc.rss_kib()))
        await trio.sleep(1)


@dataclass
class KeepaliveRun:
    stats: Stats
    lag: float  # how far the load client ran behind its own schedule, s
    ramp: float  # how long opening the connections took, s
    latest_first: float  # the latest first request after its connect, s
    overflows: int  # listen-queue overflows in this network namespace meanwhile
    growth: float  # RSS, median of the last third minus that of the first after the ramp, MiB


async def _keepalive_run(waypoint: Proc, connections: int) -> KeepaliveRun:
    await wait_serving(waypoint.port)
    stats = Stats()
    lag = Lag()
    late_first: list[float] = []
    samples: list[tuple[float, int]] = []
    overflows = listen_overflows()
    start = trio.current_time()
    until = start + SECONDS
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.probe, until)
        nursery.start_soon(_sample_rss, waypoint, samples, start, until)
        for i in range(connections):
            # Opened at 200/s, then each sends a request about every 4 s: 500 req/s
            # offered.  The waypoint gives a client of this (undeclared) port 15 s to send
            # its first bytes, as Istio's waypoint does (docs/architecture.md).
            await trio.sleep_until(start + i / RAMP_PER_SECOND)
            nursery.start_soon(_keepalive, waypoint.port, stats, until, 4.0, late_first)
        ramp = trio.current_time() - start
    third = max((SECONDS - ramp) / 3, 5)
    # Medians of each third: one sample taken mid-collection must not decide the verdict.
    first = [rss for t, rss in samples if ramp <= t < ramp + third] or [0]
    last = [rss for t, rss in samples if t >= SECONDS - third] or [0]
    return KeepaliveRun(stats, lag.worst, ramp, max(late_first, default=0.0),
                        listen_overflows() - overflows,
                        (statistics.median(last) - statistics.median(first)) / 1024)


@pytest.mark.slow
def test_2000_keepalive_connections_zero_errors_and_flat_rss(
        waypoint: Proc, record_property: Callable[[str, object], None]) -> None:
    """Run by ``trio.run`` inside a plain test so the verdict's skip and xfail reasons
    reach the report (pytest-trio drops them)."""
    connections = 2000
    run = trio.run(_keepalive_run, waypoint, connections)
    stats = run.stats
    p99 = stats.percentile(0.99) * 1000
    load = os.getloadavg()[0]
    for name, value in (("requests", stats.ok), ("errors", stats.errors),
                        ("listen_overflows", run.overflows), ("p99_ms", round(p99, 1)),
                        ("rss_growth_mib", round(run.growth, 1)),
                        ("client_lag_s", round(run.lag, 1)), ("ramp_s", round(run.ramp, 1)),
                        ("load_average", round(load, 1))):
        record_property(name, value)
    print(f"{stats.ok} requests, {stats.errors} errors {stats.error_kinds}, "
          f"p50 {stats.percentile(0.5) * 1000:.1f} ms, p99 {p99:.1f} ms, RSS growth "
          f"{run.growth:.1f} MiB; ramp {run.ramp:.1f} s, client lag up to {run.lag:.1f} s, "
          f"latest first request {run.latest_first:.1f} s after connect, listen-queue "
          f"overflows {run.overflows}, load average {load:.1f}")
    if run.lag > DETECT_TIMEOUT / 3 or run.ramp > SECONDS / 2:
        # The verdict would be about this machine: the client itself ran seconds behind
        # (a first request sent 15 s late is rightly closed by the waypoint), or the ramp
        # took so long that no steady state was left to compare RSS over.
        pytest.skip(f"not measurable here: the load client ran up to {run.lag:.1f} s behind "
                    f"its schedule and the ramp took {run.ramp:.0f} s (load average "
                    f"{load:.1f} on {os.cpu_count()} cores); {stats.errors} errors recorded")
    assert stats.errors == 0, (stats.error_kinds, f"listen-queue overflows {run.overflows}")
    assert stats.ok > connections
    assert run.growth < 8, f"RSS grew {run.growth:.1f} MiB between the first and last third"


async def _one_request(port: int, stats: Stats) -> None:
    """A fresh connection, one request, closed: the churn pattern."""
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"GET /churn HTTP/1.1\r\nHost: backend\r\n\r\n")
                status = await read_response(stream, bytearray())
        if status == 200:
            stats.ok += 1
            stats.latencies.append(trio.current_time() - started)
        else:
            stats.error(f"status {status}")
    except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        stats.error(type(exc).__name__)


@pytest.mark.slow
async def test_connection_churn_200_per_second_leaks_no_fd_or_memory(
        waypoint: Proc, record_property: Callable[[str, object], None]) -> None:
    await wait_serving(waypoint.port)
    stats = Stats()
    # Warm up (imports, pools, first connections), then count.
    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(_one_request, waypoint.port, stats)
    fds_before, rss_before = waypoint.fds(), waypoint.rss_kib()
    stats = Stats()
    overflows = listen_overflows()
    rate = 200
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for i in range(int(rate * SECONDS)):
            await trio.sleep_until(start + i / rate)
            nursery.start_soon(_one_request, waypoint.port, stats)
    # Closed connections are reaped by the waypoint as their FINs arrive: poll for it.
    with trio.move_on_after(10):
        while waypoint.fds() > fds_before + 2:  # noqa: ASYNC110 -- another process
            await trio.sleep(0.1)
    fds_after, rss_after = waypoint.fds(), waypoint.rss_kib()
    growth = (rss_after - rss_before) / 1024
    record_property("connections", stats.ok + stats.errors)
    record_property("fd_delta", fds_after - fds_before)
    record_property("errors", stats.errors)
    record_property("rss_growth_mib", round(growth, 1))
    record_property("listen_overflows", listen_overflows() - overflows)
    print(f"{stats.ok} connections ok, {stats.errors} errors {stats.error_kinds}; fds "
          f"{fds_before} -> {fds_after}; RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
    assert fds_after <= fds_before + 2
    assert growth < 8, f"RSS grew {growth:.1f} MiB"
    # What this test pins is leaks.  Errors are recorded (the table shows them) and held
    # under 1 % only on a machine that is not oversubscribed: on a shared one the
    # overloaded waypoint's listen queue (backlog 64) overflows, which resets connections,
    # and the 10 s client deadline fires (18 to 678 of 12,000 here at load averages of
    # 6-10 on 2 cores, measured when protocol detection also closed first requests that
    # came over 1 s late; it now waits 15 s).
    load = os.getloadavg()[0]
    record_property("load_average", round(load, 1))
    if load < (os.cpu_count() or 1):
        assert stats.errors <= 0.01 * (stats.ok + stats.errors), stats.error_kinds
