"""The benchmark cases of issue 8, one module each, run in this order by ``python -m bench``.

Each module has ``run(ctx: bench.harness.Context) -> list[CaseResult]``.
"""

CASES = ("l4_requests", "l4_bulk", "l4_churn", "l7", "memory", "control_scale",
         "resilience_idle")
