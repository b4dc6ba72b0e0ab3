"""Case 6: control-plane scale, by running bench/control_scale.py (its own figures).

Only ours: Envoy has no equivalent here.  The target is on the per-request outbound
decision with 10 hot destinations in a 10,000-pod mesh against a 10-pod mesh.
"""

from __future__ import annotations

import json
import subprocess

from bench.harness import PYTHON, REPO, BenchError, CaseResult, Context, Target

CASE = "control_scale"


def run(ctx: Context) -> list[CaseResult]:
    out = ctx.work / "control_scale.json"
    argv = [PYTHON, str(REPO / "bench" / "control_scale.py"), "--json", str(out)]
    if ctx.quick:
        argv.append("--quick")
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise BenchError(f"bench/control_scale.py failed: {done.stderr[-2000:]}")
    ctx.log(done.stdout.rstrip())
    figures = json.loads(out.read_text())
    pods = figures["mesh"]["pods"]
    rows = [
        CaseResult(case=CASE, name=f"snapshot build from API objects ({pods} pods)", unit="ms",
                   ours=figures["build"]["build_ms"]),
        CaseResult(case=CASE, name="one change applied (pod added)", unit="ms",
                   ours=figures["change"]["pod_added_ms"]),
        CaseResult(case=CASE, name="one change applied (namespace relabelled)", unit="ms",
                   ours=figures["change"]["namespace_relabelled_ms"]),
    ]
    for key, lookup in figures["lookup"].items():
        rows.append(CaseResult(
            case=CASE, name=f"lookup {key}: {pods} pods vs 10", unit="x",
            ours=lookup["ratio"],
            target=Target(kind="value", op="<=", threshold=1.2)
            if key == "decide_outbound[hot10]" else None,
            note=f"{lookup['small_ns']:.0f} ns vs {lookup['large_ns']:.0f} ns"))
    memory = figures["memory"]
    rows.append(CaseResult(case=CASE, name="translator + snapshot memory", unit="MiB",
                           ours=memory["translator_and_snapshot_mib"],
                           note=f"API objects {memory['api_objects_mib']} MiB"))
    return rows
