"""Case 3: connection churn, one request per new connection (wrk, ``Connection: close``).

Through the tunnel every new client connection is a new capture and a new HBONE stream
(the pooled HTTP/2 connection between the nodes stays up, as in Istio).
"""

from __future__ import annotations

from functools import partial

from bench.harness import SYSTEMS, CaseResult, Context, alternate, row, run_wrk

CASE = "l4_churn"


def run(ctx: Context) -> list[CaseResult]:
    env = ctx.l4()
    runs = alternate(
        {name: partial(run_wrk, env.targets[name].url(), ctx.seconds,
                       netns=env.targets[name].netns, headers=["Connection: close"])
         for name in SYSTEMS}, ctx.rounds, ctx.log)
    rows = []
    for field, name, unit in (("rps", "L4 new connections/s, 1 request each", "conn/s"),
                              ("p99_ms", "L4 churn p99", "ms")):
        samples = {n: [getattr(r, field) for r in results] for n, results in runs.items()}
        rows.append(row(CASE, name, unit, samples))
    errors = {n: sum(r.errors for r in results) for n, results in runs.items()}
    if any(errors.values()):
        rows[0].note = f"wrk errors: {errors}"
    return rows
