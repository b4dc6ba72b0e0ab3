"""One command for all benchmarks of issue 8: ours vs Envoy vs direct, same run.

    python -m bench [--quick] [--cases l4_requests l7 ...] [--json PATH] [--markdown PATH]

Runs as root (the L4 cases build network namespaces).  Prints a table, writes
``bench/results/<UTC date>.json`` (``<date>-quick.json`` or ``<date>-<cases>.json`` for a
quick or partial run; and ``--json PATH`` if given), and with ``--markdown``
the table as Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cases import CASES
from bench.harness import REPO, CaseResult, Context, machine, ratio

RESULTS = REPO / "bench" / "results"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_rows(results: Sequence[CaseResult]) -> list[list[str]]:
    rows = []
    for r in results:
        met = {True: "met", False: "MISSED", None: ""}[r.met]
        rows.append([r.name, r.unit, fmt(r.ours), fmt(r.envoy), fmt(r.direct),
                     fmt_ratio(ratio(r.ours, r.envoy)), fmt_ratio(ratio(r.ours, r.direct)),
                     f"{r.target.describe()}: {met}" if r.target else "", r.note])
    return rows


HEADER = ["case", "unit", "ours", "envoy", "direct", "ours/envoy", "ours/direct", "target",
          "note"]


def text_table(results: Sequence[CaseResult]) -> str:
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) if i < 2 else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def markdown_table(results: Sequence[CaseResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)


def result_suffix(args: argparse.Namespace) -> str:
    """Only a full run of every case owns ``<date>.json``; quick or partial runs are named."""
    if args.quick:
        return "-quick"
    if list(args.cases) != list(CASES):
        return "-" + "+".join(args.cases)
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 2 s loads, 256 MiB bulk, fewer connections (< 2 min)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--rounds", type=int, help="A/B rounds (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="per load run (default 10, 3 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.monotonic()
    results: list[CaseResult] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="pyambient-bench-") as tmp:
        work = Path(tmp)
        ctx = Context(quick=args.quick, rounds=args.rounds or (1 if args.quick else 3),
                      seconds=args.seconds or (2.0 if args.quick else 10.0), work=work,
                      log=lambda line: print(line, flush=True))
        try:
            for name in args.cases:
                print(f"== {name}", flush=True)
                case_started = time.monotonic()
                try:
                    module = importlib.import_module(f"bench.cases.{name}")
                    results.extend(module.run(ctx))
                except Exception as exc:  # one broken case must not lose the others
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                print(f"   ({time.monotonic() - case_started:.0f} s)", flush=True)
        finally:
            ctx.close()
    elapsed = time.monotonic() - started
    print()
    print(text_table(results))
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    print(f"total {elapsed:.0f} s")
    document: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command, "quick": args.quick, "seconds": round(elapsed, 1),
        "machine": machine(), "cases": [r.to_json() for r in results], "failures": failures}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}{result_suffix(args)}.json"
    for path in (out, args.json):
        if path is not None:
            path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {out}")
    if args.markdown:
        m = document["machine"]
        args.markdown.write_text(
            f"Command: `{command}` ({elapsed:.0f} s), {document['date']}\n\n"
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
            f"Python {m['python']}, Envoy {m['envoy']}\n\n{markdown_table(results)}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
