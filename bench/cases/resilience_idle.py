"""Case: what an idle resilience config costs the waypoint (issue 6), A/B in one process.

One waypoint in bench mode serves two services that both forward to the same nginx on
loopback, chosen by the Host header:

* ``plain``: a VirtualService with a bare route (retries unset, so Istio's default
  policy applies, as for any route an operator writes without ``retries``);
* ``resilient``: the same route with ``retries`` (3 attempts on
  ``5xx,connect-failure,reset``) and a DestinationRule with a circuit breaker
  (``connectionPool`` limits far above the load) and ``outlierDetection``; nothing fails,
  so no retry, overflow or ejection ever happens: only the bookkeeping runs.

Three measurements, each alternating A B A B (plain, resilient):

1. ``wrk -t1 -c16`` against the same waypoint process, each run ``seconds`` long: the
   median requests/s of each side and the overhead ``1 - resilient / plain``;
2. during the same runs, the waypoint's CPU time per request (``/proc/<pid>/stat``),
   which other load on the machine disturbs less than wall-clock rates;
3. without sockets, the resilience calls the proxy makes for one successful request
   (retry state, breaker, pick, outlier report, retry verdict) on each side's route and
   cluster, best of several runs: the extra microseconds the idle config adds, divided
   by the waypoint's CPU per request from 2.  On a shared 2-core machine 1 and 2 spread
   by tens of percent per round, so the target (issue 6: at most 5 %) is judged on 3.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import (
    PYTHON,
    REPO,
    BenchError,
    CaseResult,
    Context,
    Processes,
    Target,
    WrkResult,
    alternate,
    bulk_file,
    free_port,
    median,
    row,
    run_wrk,
    start_nginx,
    wait_tcp,
)

if TYPE_CHECKING:
    from waypoint.clusters import ClusterState
    from waypoint.resilience.config import RetryPolicy

CASE = "resilience_idle"
SIDES = ("plain", "resilient")
#: Issue 6: an idle resilience config costs at most 5 % of the waypoint's requests/s.
MAX_OVERHEAD_PERCENT = 5.0
#: Alternations: the effect looked for is a few percent, so more than the default 3.
MIN_ROUNDS = 5


def _service(name: str, vip: str, backend: str) -> dict[str, Any]:
    return {"name": name, "ports": [80], "vips": [vip], "endpoints": [{"address": backend}]}


def _route(name: str, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"hosts": [name], "http": [{**extra,
                                                "route": [{"destination": {"host": name}}]}]}}


def bench_config(backend: str) -> dict[str, Any]:
    """The waypoint's bench YAML (as a dict): the two services and their objects."""
    idle = {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "resilient", "namespace": "bench"},
        "spec": {"host": "resilient", "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 10_000},
                "http": {"http1MaxPendingRequests": 10_000, "http2MaxRequests": 10_000,
                         "maxRetries": 1_000}},
            "outlierDetection": {"consecutive5xxErrors": 5, "consecutiveGatewayErrors": 5,
                                 "interval": "1s", "baseEjectionTime": "30s",
                                 "maxEjectionPercent": 100}}}}
    return {
        "namespace": "bench",
        "services": [_service("plain", "10.96.0.1", backend),
                     _service("resilient", "10.96.0.2", backend)],
        "objects": [_route("plain"),
                    _route("resilient", retries={"attempts": 3,
                                                 "retryOn": "5xx,connect-failure,reset"}),
                    idle],
    }


def run(ctx: Context) -> list[CaseResult]:
    work = Path(tempfile.mkdtemp(prefix="resilience-idle-", dir=ctx.work))
    work.chmod(0o755)
    with Processes(work) as procs:
        backend, listen = free_port(), free_port()
        start_nginx(procs, work, f"127.0.0.1:{backend}", bulk_file(work, 1),
                    name="nginx-resilience")
        config = work / "waypoint.yaml"
        # JSON is YAML: the waypoint reads it with yaml.safe_load.
        config.write_text(json.dumps(bench_config(f"127.0.0.1:{backend}"), indent=1))
        waypoint = procs.popen("waypoint-resilience", [
            PYTHON, "-m", "waypoint", "--name", "bench", "--namespace", "bench",
            "--bench-config", str(config), "--bench-listen", f"127.0.0.1:{listen}",
            "--no-access-log", "--log-level", "warning"], cwd=REPO)
        wait_tcp("127.0.0.1", listen, what="waypoint (bench mode)",
                 alive=lambda: waypoint.poll() is None)
        url = f"http://127.0.0.1:{listen}/"

        def measure(side: str, seconds: float) -> Sample:
            before = cpu_seconds(waypoint.pid)
            result = run_wrk(url, seconds, headers=[f"Host: {side}"])
            used = cpu_seconds(waypoint.pid) - before
            return Sample(wrk=result, cpu_us=1e6 * used / (result.rps * max(1, round(seconds))))

        for side in SIDES:  # warm up: connections, caches, the first pick's rebuild
            warm = measure(side, 1).wrk
            if warm.errors:
                raise BenchError(f"{side}: {warm.errors} failed requests in the warm-up: "
                                 f"see {work}/waypoint-resilience.log")
        rounds = ctx.rounds if ctx.quick else max(ctx.rounds, MIN_ROUNDS)
        runs = alternate({side: partial(measure, side, ctx.seconds) for side in SIDES},
                         rounds, ctx.log)
    return [*_rows(runs, rounds, ctx.seconds), *_decision_rows(decision_ab(), runs)]


@dataclass(frozen=True)
class Sample:
    """One wrk run and the waypoint's CPU time per request during it."""

    wrk: WrkResult
    cpu_us: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _overhead(plain: float, resilient: float, *, per_request: bool = False) -> float:
    """Percent of requests/s the resilient side loses (from CPU time per request when
    ``per_request``: requests per CPU-second is its inverse)."""
    ratio = plain / resilient if per_request else resilient / plain
    return 100.0 * (1.0 - ratio)


def _rows(runs: dict[str, list[Sample]], rounds: int, seconds: float) -> list[CaseResult]:
    rps = {side: [s.wrk.rps for s in samples] for side, samples in runs.items()}
    cpu = {side: [s.cpu_us for s in samples] for side, samples in runs.items()}
    errors = {side: sum(s.wrk.errors for s in samples) for side, samples in runs.items()}
    wall = _overhead(median(rps["plain"]), median(rps["resilient"]))
    per_cpu = _overhead(median(cpu["plain"]), median(cpu["resilient"]), per_request=True)
    wall_rounds = [_overhead(a, b) for a, b in zip(rps["plain"], rps["resilient"], strict=True)]
    cpu_rounds = [_overhead(a, b, per_request=True)
                  for a, b in zip(cpu["plain"], cpu["resilient"], strict=True)]
    note = (f"{rounds} A/B rounds of wrk -t1 -c16 -d{max(1, round(seconds))}s; per round "
            + ", ".join(f"{p:+.1f} %" for p in wall_rounds))
    if any(errors.values()):
        note += f"; wrk errors: {errors}"
    return [
        row(CASE, "waypoint req/s, plain route", "req/s", {"ours": rps["plain"]}),
        row(CASE, "waypoint req/s, idle retries + breaker + outlier", "req/s",
            {"ours": rps["resilient"]}),
        # No target on the wall-clock and CPU-time rows: on a shared 2-core machine their
        # per-round spread is many times the 5 % looked for (see the notes); the target is
        # judged on the bookkeeping row below, which resolves a fraction of a percent.
        CaseResult(case=CASE, name="idle resilience overhead on req/s (wall, medians)",
                   unit="%", ours=wall, note=note, samples={"per_round": wall_rounds}),
        row(CASE, "waypoint CPU per request, plain route", "us", {"ours": cpu["plain"]}),
        row(CASE, "waypoint CPU per request, idle resilience", "us",
            {"ours": cpu["resilient"]}),
        CaseResult(case=CASE, name="idle resilience overhead on req/s per CPU-second",
                   unit="%", ours=per_cpu,
                   note="from the waypoint's CPU time per request, which other load on the "
                   "machine disturbs less than wall-clock req/s; per round "
                   + ", ".join(f"{p:+.1f} %" for p in cpu_rounds),
                   samples={"per_round": cpu_rounds}),
        row(CASE, "waypoint p50, plain route", "ms",
            {"ours": [s.wrk.p50_ms for s in runs["plain"]]}),
        row(CASE, "waypoint p50, idle resilience", "ms",
            {"ours": [s.wrk.p50_ms for s in runs["resilient"]]}),
    ]


# --- the decisions the resilient side adds, per request, without sockets ----------------------

_FAKE_BACKEND = "10.0.0.1:80"
#: Requests per timing run; best of ``_REPEAT`` runs (damps the noise of a shared machine).
_CALLS = 20_000
_REPEAT = 9


def decision_ab() -> dict[str, float]:
    """Nanoseconds per request of the resilience bookkeeping the proxy does for one
    successful request (``waypoint/proxy.py`` ``_forward``/``_tries``: retry state, breaker
    admission, pick, attempt count, outlier report, retry verdict, releases), with the
    route and cluster the bench config gives each side."""
    import random

    import trio

    from waypoint.app import bench_config_from
    from waypoint.clusters import Clusters, static_endpoints
    from waypoint.routing.match import Request, route
    from waypoint.upstream import TcpTransport

    config = bench_config_from(bench_config(_FAKE_BACKEND))
    clusters = Clusters(TcpTransport())
    trio.run(clusters.update, config.table, static_endpoints(config.endpoints))
    rng = random.Random(1)
    subjects = {}
    for side in SIDES:
        decision = route(config.table, Request(method="GET", authority=side, path="/"), rng)
        if decision.resilience is None or decision.cluster is None:
            raise BenchError(f"{side}: the bench config does not route / to a cluster")
        subjects[side] = (decision.resilience.retries, clusters.get(decision.cluster))
    best = dict.fromkeys(SIDES, math.inf)
    for _ in range(_REPEAT):  # A B A B ..., best of each
        for side, (policy, state) in subjects.items():
            started = time.perf_counter_ns()
            _requests(policy, state, rng, _CALLS)
            best[side] = min(best[side], (time.perf_counter_ns() - started) / _CALLS)
    return best


def _requests(policy: RetryPolicy, state: ClusterState, rng: random.Random, calls: int
              ) -> None:
    """``calls`` successful requests' worth of the proxy's resilience calls."""
    from waypoint.resilience import OutcomeKind, RetryState, TryOutcome

    ok = TryOutcome(OutcomeKind.RESPONSE, status=200)
    headers: dict[str, str] = {}
    picker, breaker = state.picker, state.breaker
    for _ in range(calls):
        retry = RetryState(policy, headers)
        breaker.try_request()
        host = picker.pick(1.0, rng, None, retry.excluded_hosts(),
                           avoid_excluded_levels=retry.avoid_previous_localities)
        if host is None:
            raise BenchError("no host picked: the bench cluster has no endpoint")
        retry.start_try(host)
        picker.request_started(host)
        picker.report_response(host, 200, 1.0)
        retry.decide(ok, body_held=True, rng=rng)
        picker.request_finished(host)
        breaker.release_request()


def _decision_rows(ns: dict[str, float], runs: dict[str, list[Sample]]) -> list[CaseResult]:
    extra_us = (ns["resilient"] - ns["plain"]) / 1000.0
    waypoint_us = median([s.cpu_us for s in runs["plain"]])
    return [
        CaseResult(case=CASE, name="resilience bookkeeping per request, plain route",
                   unit="us", ours=ns["plain"] / 1000.0,
                   note=f"best of {_REPEAT} x {_CALLS:,} calls"),
        CaseResult(case=CASE, name="resilience bookkeeping per request, idle resilience",
                   unit="us", ours=ns["resilient"] / 1000.0,
                   note=f"best of {_REPEAT} x {_CALLS:,} calls"),
        CaseResult(case=CASE, name="idle resilience overhead: extra bookkeeping / waypoint CPU",
                   unit="%", ours=100.0 * extra_us / waypoint_us,
                   note=f"{extra_us:+.2f} us per request against the {waypoint_us:.0f} us of "
                   "CPU the waypoint spent per request under wrk (plain route)",
                   target=Target(kind="value", op="<=", threshold=MAX_OVERHEAD_PERCENT)),
    ]
