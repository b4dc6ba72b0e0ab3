"""The benchmark harness's arithmetic and parsers, and the fixed-rate load client."""

from __future__ import annotations

import pytest
import trio
import yaml

from bench.harness import (
    SHARED,
    BenchError,
    Target,
    alternate,
    duration_ms,
    fill_template,
    median,
    parse_wrk,
    ratio,
    row,
    without_breakers,
)
from bench.loadgen import LoadgenError, content_length, percentile, run_fixed_rate

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:38079/x
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   505.17us  774.96us   4.91ms   85.46%
    Req/Sec    16.09k     4.38k   24.13k    60.00%
  Latency Distribution
     50%  116.00us
     75%  580.00us
     90%    1.67ms
     99%    3.43ms
  15999 requests in 1.00s, 5.71MB read
  Non-2xx or 3xx responses: 15999
Requests/sec:  15993.48
Transfer/sec:      5.70MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(15993.48)
    assert result.p50_ms == pytest.approx(0.116)
    assert result.p99_ms == pytest.approx(3.43)
    assert result.errors == 15999


def test_parse_wrk_counts_socket_errors() -> None:
    text = (WRK_OUTPUT.replace("  Non-2xx or 3xx responses: 15999\n", "")
            + "  Socket errors: connect 1, read 2, write 3, timeout 4\n")
    assert parse_wrk(text).errors == 10


def test_parse_wrk_without_latency_distribution_is_an_error() -> None:
    with pytest.raises(BenchError, match="--latency"):
        parse_wrk("Requests/sec:  100.0\n")


@pytest.mark.parametrize(("text", "ms"), [("315.00us", 0.315), ("1.20ms", 1.2), ("2.00s", 2000.0),
                                          ("1.00m", 60_000.0)])
def test_duration_units(text: str, ms: float) -> None:
    assert duration_ms(text) == pytest.approx(ms)


def test_duration_garbage_is_an_error() -> None:
    with pytest.raises(BenchError):
        duration_ms("fast")


def test_percentile_is_nearest_rank() -> None:
    samples = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_median_and_ratio() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    with pytest.raises(BenchError):
        median([])
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 4.0) is None


def test_row_takes_medians_per_system() -> None:
    r = row("c", "n", "req/s", {"ours": [1.0, 9.0, 5.0], "envoy": [10.0, 12.0, 11.0]},
            target=Target(kind="ratio", op=">=", threshold=0.5))
    assert (r.ours, r.envoy, r.direct) == (5.0, 11.0, None)
    assert r.met is False
    assert r.to_json()["ours_vs_envoy"] == pytest.approx(5 / 11)


def test_targets() -> None:
    at_least_half = Target(kind="ratio", op=">=", threshold=0.5)
    assert at_least_half.met(6.0, 10.0) is True
    assert at_least_half.met(4.0, 10.0) is False
    assert at_least_half.met(4.0, None) is None
    at_most_twice = Target(kind="ratio", op="<=", threshold=2.0)
    assert at_most_twice.met(0.3, 0.2) is True
    assert at_most_twice.met(0.3, -0.1) is None  # no ratio over a non-positive base
    value = Target(kind="value", op="<=", threshold=20.0)
    assert value.met(19.0, None) is True
    assert value.met(21.0, 1.0) is False
    assert value.describe() == "ours <= 20"


def test_alternate_interleaves_systems_each_round() -> None:
    order: list[str] = []

    def measure(name: str) -> float:
        order.append(name)
        return float(len(order))

    results = alternate({"a": lambda: measure("a"), "b": lambda: measure("b")}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert results == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}


def test_content_length_of_a_response_head() -> None:
    assert content_length(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 3") == 3
    with pytest.raises(LoadgenError, match="status"):
        content_length(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0")
    with pytest.raises(LoadgenError, match="Content-Length"):
        content_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")


async def _serve(listeners: list[trio.SocketListener], stall_on: int | None = None,
                 stall: float = 0.0) -> None:
    """A tiny keep-alive HTTP server: 'ok' to each request; optionally one slow answer."""
    served = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal served
        buffer = b""
        async with stream:
            while data := await stream.receive_some(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    served += 1
                    if served == stall_on:
                        await trio.sleep(stall)
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    await trio.serve_listeners(handle, listeners)


async def _listen() -> tuple[list[trio.SocketListener], int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners, listeners[0].socket.getsockname()[1]


async def test_loadgen_holds_the_target_rate() -> None:
    listeners, port = await _listen()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, listeners)
        with trio.fail_after(10):
            result = await run_fixed_rate("127.0.0.1", port, rate=200, seconds=1.0,
                                          connections=4)
        nursery.cancel_scope.cancel()
    assert result.errors == 0
    assert result.completed == 200
    assert 180 <= result.rate <= 220
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


async def test_loadgen_counts_time_waiting_behind_a_stall() -> None:
    """No coordinated omission: requests scheduled during a 300 ms stall are all late."""
    listeners, port = await _listen()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, listeners, 10, 0.3)
        with trio.fail_after(10):
            result = await run_fixed_rate("127.0.0.1", port, rate=100, seconds=1.0,
                                          connections=1)
        nursery.cancel_scope.cancel()
    assert result.completed == 100
    # ~30 of 100 requests were due while the only connection was stalled: a closed-loop
    # client would report one slow request and a p90 near zero.
    assert result.p90_ms > 50
    assert result.max_ms >= 250


@pytest.mark.parametrize("name", ["envoy-l7.yaml", "envoy-hbone-client.yaml",
                                  "envoy-hbone-server.yaml"])
def test_reference_configs_fill_and_lose_their_circuit_breaker_limits(name: str) -> None:
    if not (SHARED / name).exists():
        pytest.skip(f"{SHARED / name} not present")
    text = without_breakers(fill_template(name, ADMIN_PORT=1, LISTEN_PORT=2, BACKEND_PORT=3,
                                          HBONE_PORT=4, CERT_DIR="/certs"))
    clusters = yaml.safe_load(text)["static_resources"]["clusters"]
    assert clusters
    for cluster in clusters:
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
