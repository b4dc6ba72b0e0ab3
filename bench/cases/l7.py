"""Case 4: L7 through the waypoint (bench mode, waypoint-l7.yaml) vs Envoy (envoy-l7.yaml).

Both run the same route: a 90/10 weighted split, a 2 s timeout, retries on
``5xx,connect-failure`` and a fault policy that injects nothing, to nginx on loopback.
One worker each: the waypoint has no multi-worker mode yet, so the all-cores figure is
not measured (the row's note says so).
"""

from __future__ import annotations

from functools import partial

from bench.harness import SYSTEMS, CaseResult, Context, Target, alternate, row, run_wrk

CASE = "l7"


def run(ctx: Context) -> list[CaseResult]:
    env = ctx.l7()
    urls = {name: f"http://127.0.0.1:{port}/" for name, port in env.ports.items()}
    for url in urls.values():
        run_wrk(url, 1)
    runs = alternate({name: partial(run_wrk, urls[name], ctx.seconds) for name in SYSTEMS},
                     ctx.rounds, ctx.log)
    errors = {n: sum(r.errors for r in results) for n, results in runs.items()}
    rows = [
        row(CASE, "L7 req/s per worker (wrk -t1 -c16)", "req/s",
            {n: [r.rps for r in results] for n, results in runs.items()},
            target=Target(kind="ratio", op=">=", threshold=0.5),
            note="1 worker each; the waypoint has no multi-worker mode, so no all-cores figure"
            + (f"; wrk errors: {errors}" if any(errors.values()) else "")),
        row(CASE, "L7 p50 at saturation", "ms",
            {n: [r.p50_ms for r in results] for n, results in runs.items()}),
        row(CASE, "L7 p99 at saturation", "ms",
            {n: [r.p99_ms for r in results] for n, results in runs.items()}),
    ]
    return rows
