"""Case 1: small keep-alive requests through the node-to-node tunnel.

At saturation: ``wrk -t1 -c16`` from the client pod to nginx's short 200, req/s, p50, p99.
At a fixed 1,000 req/s (wrk paced by bench/fixed_rate.lua: latency measured in C from each
request's send): p50, p99, and the p99 a system *adds* over the direct connection measured
in the same round.
"""

from __future__ import annotations

from functools import partial

from bench.harness import (
    SYSTEMS,
    CaseResult,
    Context,
    Target,
    WrkResult,
    alternate,
    median,
    row,
    run_wrk,
    run_wrk_fixed_rate,
)

CASE = "l4_requests"
FIXED_RATE = 1000.0
# A p99 from one 10 s run at 1,000 req/s rests on its 100 slowest requests, and a pause
# of the shared 2-core machine moves it by several times: Envoy's ranged 1.13-5.18 ms
# across the rounds of one run.  The paired medians need more rounds than the other
# figures to say anything (5 x 10 s per system; --quick keeps its one round).
FIXED_RATE_ROUNDS = 5


def run(ctx: Context) -> list[CaseResult]:
    env = ctx.l4()
    for peer in env.targets.values():  # warm-up: tunnels and pooled connections open
        run_wrk(peer.url(), 1, netns=peer.netns)
    targets = env.targets
    saturation = alternate(
        {name: partial(run_wrk, targets[name].url(), ctx.seconds, netns=targets[name].netns)
         for name in SYSTEMS}, ctx.rounds, ctx.log)
    fixed = alternate(
        {name: partial(run_wrk_fixed_rate, targets[name].url(), rate=FIXED_RATE,
                       seconds=ctx.seconds, netns=targets[name].netns)
         for name in SYSTEMS}, ctx.rounds if ctx.quick else max(ctx.rounds, FIXED_RATE_ROUNDS),
        ctx.log)

    def figures(field: str, runs: dict[str, list[WrkResult]]) -> dict[str, list[float]]:
        return {name: [getattr(r, field) for r in results] for name, results in runs.items()}

    rows: list[CaseResult] = []
    for field, name, unit, target in (
            ("rps", "L4 keep-alive req/s (wrk -t1 -c16)", "req/s",
             Target(kind="ratio", op=">=", threshold=0.5)),
            ("p50_ms", "L4 keep-alive p50 at saturation", "ms", None),
            ("p99_ms", "L4 keep-alive p99 at saturation", "ms", None)):
        rows.append(row(CASE, name, unit, figures(field, saturation), target=target))
    for key in ("p50_ms", "p99_ms"):
        rows.append(row(CASE, f"L4 {key[:3]} at {FIXED_RATE:,.0f} req/s", "ms",
                        figures(key, fixed)))
    # Added latency is paired per round (system minus direct of the same round), so a noisy
    # round shifts both terms together.
    added = {name: [r.p99_ms - d.p99_ms for r, d in zip(fixed[name], fixed["direct"],
                                                            strict=True)]
             for name in ("ours", "envoy")}
    rows.append(row(
        CASE, f"L4 p99 added over direct at {FIXED_RATE:,.0f} req/s", "ms", added,
        target=Target(kind="ratio", op="<=", threshold=2.0),
        note="achieved rates: " + ", ".join(
            f"{n} {median([r.rps for r in fixed[n]]):,.0f}/s"
            f" ({sum(r.errors for r in fixed[n])} errors)" for n in SYSTEMS)))
    errors = {name: sum(r.errors for r in results) for name, results in saturation.items()}
    if any(errors.values()):
        rows[0].note = f"wrk errors: {errors}"
    return rows
