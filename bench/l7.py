"""The waypoint's HTTP/1.1 data path against Envoy with the same route config, and direct.

Starts, all on 127.0.0.1 with free ports:

* nginx (``/usr/sbin/nginx``, private config) answering ``return 200 "ok";``;
* Envoy (``.venv/bin/envoy --concurrency 1``) with /work/shared/bench/envoy-l7.yaml:
  90/10 weighted split, 2 s timeout, retries on ``5xx,connect-failure`` x2, the fault
  filter present but inactive;
* the waypoint in bench mode (one process, no access log) with bench/waypoint-l7.yaml,
  the same routes as Istio objects (VirtualService with weights, timeout, retries and
  a fault policy that injects nothing).

Then runs ``wrk -t1 -c16 -d<seconds>s --latency`` against Envoy and the waypoint
alternately (A B A B ..., ``--rounds`` rounds), and once per round directly against
nginx, and prints the median req/s, p50 and p99 of each with the ratios, and for the two
proxies the CPU time each spent per request (user + system time of the process, all
threads, from ``/proc/<pid>/stat``, divided by the requests wrk completed).  On a shared
machine CPU time per request is the robust figure: it does not move when a neighbour
steals the core, while req/s does.

``--profile DIR`` also records the waypoint with py-spy (``--nonblocking``, raw
folded stacks, one file per round) while its load runs.

``--compare LABEL=DIR ...`` measures waypoint builds against each other instead (no
Envoy, no direct): one waypoint per source tree ``DIR`` (a copy of ``common/`` and
``waypoint/``, e.g. from ``git archive``), run from that directory, alternately
(A B B A ...); with ``--together`` all of them under load at the same time, so a
neighbour's burst hits every build alike (the steadiest CPU-per-request comparison on a
busy machine).  Prints the median and the minimum CPU per request of each.

``--pin`` runs the proxy under test (Envoy or the waypoint) on CPU 1 and nginx and wrk
on CPU 0 (``taskset``), the same for both proxies: on a 2-core machine this keeps the
load generator's and the backend's wake-ups from preempting the proxy mid-request,
which otherwise costs the slower proxy disproportionately.

Run: ``.venv/bin/python bench/l7.py [--seconds 10] [--rounds 3] [--pin]``, or
``.venv/bin/python bench/l7.py --compare before=/tmp/a after=. [--together]``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENVOY_TEMPLATE = Path("/work/shared/bench/envoy-l7.yaml")
WAYPOINT_TEMPLATE = REPO / "bench" / "waypoint-l7.yaml"
NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
           location / {{ return 200 "ok"; }} }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, deadline: float = 20.0
              ) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {deadline} s")


PIN_LOAD: list[str] = []
PIN_PROXY: list[str] = []


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


Sample = tuple[float, float, float, float, float]


def wrk(url: str, seconds: int, pid: int | None = None) -> Sample:
    """req/s, p50 ms, p99 ms, and the CPU µs per request of process ``pid``: user +
    system, and user alone (0.0 without a pid)."""
    return wrk_many([(url, pid)], seconds)[0]


def wrk_many(jobs: list[tuple[str, int | None]], seconds: int) -> list[Sample]:
    """:func:`wrk` for each ``(url, pid)``, all loads running at the same time."""
    before = [cpu_seconds(pid) if pid is not None else (0.0, 0.0) for _, pid in jobs]
    loads = [subprocess.Popen([*PIN_LOAD, "/usr/bin/wrk", "-t1", "-c16", f"-d{seconds}s",
                               "--latency", url], stdout=subprocess.PIPE, text=True)
             for url, _ in jobs]
    outs = [load.communicate(timeout=seconds + 60)[0] for load in loads]
    samples = []
    for (url, pid), out, start in zip(jobs, outs, before, strict=True):
        after = cpu_seconds(pid) if pid is not None else (0.0, 0.0)
        user = after[0] - start[0]
        system = after[1] - start[1]
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        if "Non-2xx" in out:
            print(f"  warning: non-2xx responses from {url}", file=sys.stderr)

        def ms(label: str, out: str = out) -> float:
            value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
            return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        per_request = 1e6 / max(requests, 1)
        samples.append((rps, ms("50%"), ms("99%"), (user + system) * per_request,
                        user * per_request))
    return samples


def start_waypoint(tree: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    """The waypoint in bench mode, from the source tree ``tree``."""
    proc = subprocess.Popen(
        [*PIN_PROXY, str(REPO / ".venv/bin/python"), "-m", "waypoint", "--name", "bench",
         "--namespace", "bench", "--bench-config", str(config),
         "--bench-listen", f"127.0.0.1:{port}", "--no-access-log"],
        cwd=tree, env={**os.environ, "PYAMBIENT_LOG": "warning"})
    wait_port(port, proc, f"waypoint from {tree}", deadline=60.0)
    return proc


def compare(trees: dict[str, Path], config: Path, args: argparse.Namespace,
            procs: list[subprocess.Popen[bytes]]) -> int:
    """The ``--compare`` mode: waypoint builds against each other."""
    ports = {label: free_port() for label in trees}
    pids: dict[str, int | None] = {}
    for label, tree in trees.items():
        procs.append(start_waypoint(tree, config, ports[label]))
        pids[label] = procs[-1].pid
    urls = {label: f"http://127.0.0.1:{port}/" for label, port in ports.items()}
    wrk_many([(url, None) for url in urls.values()], 1)  # warm up
    results: dict[str, list[Sample]] = {label: [] for label in trees}
    labels = list(trees)
    for rnd in range(args.rounds):
        order = labels if rnd % 2 == 0 else labels[::-1]
        groups = [order] if args.together else [[label] for label in order]
        for group in groups:
            samples = wrk_many([(urls[label], pids[label]) for label in group], args.seconds)
            for label, sample in zip(group, samples, strict=True):
                results[label].append(sample)
                print(f"round {rnd + 1} {label:10s} {sample[0]:8.0f} req/s  cpu "
                      f"{sample[3]:6.1f} us/req (user {sample[4]:6.1f})", flush=True)
    how = "at the same time" if args.together else "alternately"
    print(f"\n{args.rounds} rounds of wrk -t1 -c16 -d{args.seconds}s, builds loaded {how}:")
    for label, rs in results.items():
        print(f"  {label:10s} cpu us/req median {statistics.median(r[3] for r in rs):6.1f} "
              f"min {min(r[3] for r in rs):6.1f}  (user median "
              f"{statistics.median(r[4] for r in rs):6.1f} min {min(r[4] for r in rs):6.1f})  "
              f"req/s median {statistics.median(r[0] for r in rs):7.0f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true",
                        help="proxies on CPU 1, nginx and wrk on CPU 0")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the waypoint with py-spy into this directory")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=DIR", default=None,
                        help="compare waypoint builds from these source trees (no Envoy)")
    parser.add_argument("--together", action="store_true",
                        help="with --compare: load all builds at the same time")
    args = parser.parse_args()
    trees = None
    if args.compare is not None:
        trees = {label: Path(tree).resolve() for label, _, tree in
                 (item.partition("=") for item in args.compare)}
    if args.pin:
        PIN_LOAD[:] = ["taskset", "-c", "0"]
        PIN_PROXY[:] = ["taskset", "-c", "1"]
    backend, envoy_port, admin_port, waypoint_port = (free_port() for _ in range(4))
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-l7-") as tmp:
        d = Path(tmp)
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=backend))
        (d / "envoy.yaml").write_text(
            ENVOY_TEMPLATE.read_text().replace("@ADMIN_PORT@", str(admin_port))
            .replace("@LISTEN_PORT@", str(envoy_port)).replace("@BACKEND_PORT@", str(backend)))
        (d / "waypoint.yaml").write_text(
            WAYPOINT_TEMPLATE.read_text().replace("@BACKEND@", f"127.0.0.1:{backend}"))
        try:
            procs.append(subprocess.Popen([*PIN_LOAD, "/usr/sbin/nginx", "-c",
                                           str(d / "nginx.conf"), "-p", tmp]))
            wait_port(backend, procs[-1], "nginx")
            if trees is not None:
                return compare(trees, d / "waypoint.yaml", args, procs)
            procs.append(subprocess.Popen([*PIN_PROXY, str(REPO / ".venv/bin/envoy"), "-c",
                                           str(d / "envoy.yaml"), "--concurrency", "1",
                                           "--use-dynamic-base-id", "-l", "error"],
                                          stdout=subprocess.DEVNULL))
            wait_port(envoy_port, procs[-1], "envoy")
            procs.append(start_waypoint(REPO, d / "waypoint.yaml", waypoint_port))
            targets = {"envoy": f"http://127.0.0.1:{envoy_port}/",
                       "waypoint": f"http://127.0.0.1:{waypoint_port}/",
                       "direct": f"http://127.0.0.1:{backend}/"}
            for url in targets.values():  # warm up (connections, caches)
                wrk(url, 1)
            pids = {"envoy": procs[1].pid, "waypoint": procs[2].pid, "direct": None}
            results: dict[str, list[Sample]] = {k: [] for k in targets}
            for rnd in range(args.rounds):
                for name in ("envoy", "waypoint", "direct"):
                    spy = None
                    if args.profile is not None and name == "waypoint":
                        args.profile.mkdir(parents=True, exist_ok=True)
                        spy = subprocess.Popen(
                            [str(REPO / ".venv/bin/py-spy"), "record", "-p", str(pids[name]),
                             "-d", str(args.seconds), "-r", "250", "-f", "raw",
                             "--nonblocking", "-o", str(args.profile / f"round{rnd + 1}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    result = wrk(targets[name], args.seconds, pids[name])
                    if spy is not None:
                        spy.wait(timeout=30)
                    results[name].append(result)
                    cpu_text = (f"  cpu {result[3]:6.1f} us/req (user {result[4]:6.1f})"
                                if pids[name] else "")
                    print(f"round {rnd + 1} {name:8s} {result[0]:10.0f} req/s  "
                          f"p50 {result[1]:7.2f} ms  p99 {result[2]:7.2f} ms{cpu_text}", flush=True)
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    med = {name: tuple(statistics.median(r[i] for r in rs) for i in range(5))
           for name, rs in results.items()}
    print(f"\nmedians of {args.rounds} rounds, wrk -t1 -c16 -d{args.seconds}s --latency:")
    for name, (rps, p50, p99, cpu, user) in med.items():
        extra = f"  cpu {cpu:6.1f} us/req (user {user:6.1f})" if name != "direct" else ""
        print(f"  {name:8s} {rps:10.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms{extra}")
    print(f"  waypoint / envoy  req/s {med['waypoint'][0] / med['envoy'][0]:.2f}x  "
          f"cpu/req {med['waypoint'][3] / med['envoy'][3]:.2f}x")
    print(f"  waypoint / direct req/s {med['waypoint'][0] / med['direct'][0]:.3f}x")
    print(f"  envoy / direct    req/s {med['envoy'][0] / med['direct'][0]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
