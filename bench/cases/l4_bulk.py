"""Case 2: one bulk download (1 GiB, 256 MiB with --quick) from nginx through the tunnel."""

from __future__ import annotations

from functools import partial

from bench.harness import SYSTEMS, CaseResult, Context, Target, alternate, row, run_curl

CASE = "l4_bulk"
# One unmeasured download per system first: the first 1 GiB through a fresh ztunnel pair
# ran 280 MB/s where the next ones ran 357-385 (two full runs, 2026-11-26); its buffers,
# heap and the tunnel's TCP state grow during it.  Envoy and direct get the same warm-up.


def run(ctx: Context) -> list[CaseResult]:
    env = ctx.l4()
    size = env.bulk_size
    downloads = {name: partial(run_curl, env.targets[name].url("/bulk"), size,
                               netns=env.targets[name].netns) for name in SYSTEMS}
    for download in downloads.values():
        download()
    samples = alternate(downloads, ctx.rounds, ctx.log)
    return [row(CASE, f"L4 bulk, one {size >> 20} MiB download (curl)", "MB/s", samples,
                target=Target(kind="ratio", op=">=", threshold=0.8))]
