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

``--pin`` runs the proxy under test (Envoy or the waypoint) on CPU 1 and nginx and wrk
on CPU 0 (``taskset``), the same for both proxies: on a 2-core machine this keeps the
load generator's and the backend's wake-ups from preempting the proxy mid-request,
which otherwise costs the slower proxy disproportionately.

Run: ``.venv/bin/python bench/l7.py [--seconds 10] [--rounds 3] [--pin]``.
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
    before = cpu_seconds(pid) if pid is not None else (0.0, 0.0)
    out = subprocess.run([*PIN_LOAD, "/usr/bin/wrk", "-t1", "-c16", f"-d{seconds}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    after = cpu_seconds(pid) if pid is not None else (0.0, 0.0)
    user = after[0] - before[0]
    system = after[1] - before[1]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        print(f"  warning: non-2xx responses from {url}", file=sys.stderr)

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    per_request = 1e6 / max(requests, 1)
    return rps, ms("50%"), ms("99%"), (user + system) * per_request, user * per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true",
                        help="proxies on CPU 1, nginx and wrk on CPU 0")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the waypoint with py-spy into this directory")
    args = parser.parse_args()
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
        env = {**os.environ, "PYAMBIENT_LOG": "warning"}
        try:
            procs.append(subprocess.Popen([*PIN_LOAD, "/usr/sbin/nginx", "-c",
                                           str(d / "nginx.conf"), "-p", tmp]))
            wait_port(backend, procs[-1], "nginx")
            procs.append(subprocess.Popen([*PIN_PROXY, str(REPO / ".venv/bin/envoy"), "-c",
                                           str(d / "envoy.yaml"), "--concurrency", "1",
                                           "--use-dynamic-base-id", "-l", "error"],
                                          stdout=subprocess.DEVNULL))
            wait_port(envoy_port, procs[-1], "envoy")
            procs.append(subprocess.Popen(
                [*PIN_PROXY, str(REPO / ".venv/bin/python"), "-m", "waypoint", "--name", "bench",
                 "--namespace", "bench", "--bench-config", str(d / "waypoint.yaml"),
                 "--bench-listen", f"127.0.0.1:{waypoint_port}", "--no-access-log"],
                cwd=REPO, env=env))
            wait_port(waypoint_port, procs[-1], "waypoint")
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
