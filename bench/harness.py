"""The benchmark harness: peers, load runners, A/B alternation, medians, ratios, targets.

Every case compares up to three systems on the same machine in the same run:

* ``ours``: pyambient (the ztunnel pair for L4, the waypoint in bench mode for L7);
* ``envoy``: Envoy 1.40 with the reference configs of ``/work/shared/bench`` (one worker);
* ``direct``: the client talking to the backend itself, the physical limit.

The machine is shared and noisy, so a case runs its systems alternately (A B C A B C ...,
``rounds`` times) and reports the median of each and the ratios of medians: a burst of
load from a neighbour then hurts one sample of each system instead of all samples of one.

L4 topology (:func:`l4_env`): four network namespaces on one bridge, as in
``tests/netns``: pods ``a`` -> ``b`` through two ztunnel processes (node1 captures ``a``,
node2 serves ``b``), and pods ``c`` -> ``d`` for Envoy's HBONE pair (client Envoy in ``c``,
server Envoy in ``d``) and for direct.  nginx runs in ``b`` and ``d`` with the same config,
so every system crosses the same veth/bridge hop between two namespaces.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal, TypeVar

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/bench")
PYTHON = str(REPO / ".venv" / "bin" / "python")
ENVOY = str(REPO / ".venv" / "bin" / "envoy")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
CURL = shutil.which("curl") or "/usr/bin/curl"
BACKEND_PORT = 8080  #: nginx's port inside the L4 server pods
ENVOY_LISTEN_PORT = 18001  #: the client Envoy's plain TCP listener (inside pod c)
ENVOY_HBONE_PORT = 18008  #: the server Envoy's HBONE listener (inside pod d)
T = TypeVar("T")
System = Literal["ours", "envoy", "direct"]
SYSTEMS: tuple[System, ...] = ("ours", "envoy", "direct")


class BenchError(Exception):
    """A peer did not start or a load tool failed; the message names what to check."""


# --- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  #: non-2xx/3xx responses plus socket errors


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def duration_ms(text: str) -> float:
    """wrk's duration notation (``315.00us``, ``1.20ms``, ``2.00s``, ``1.00m``) in ms."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise BenchError(f"cannot read wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Requests/s, p50, p99 and error count from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    p50 = re.search(r"^\s+50(?:\.000)?%\s+(\S+)", text, re.MULTILINE)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+(\S+)", text, re.MULTILINE)
    if rps is None or p50 is None or p99 is None:
        raise BenchError(f"wrk output without Requests/sec or --latency percentiles:\n{text}")
    errors = 0
    if non2xx := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        errors += int(non2xx.group(1))
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         text):
        errors += sum(int(g) for g in sock.groups())
    return WrkResult(rps=float(rps.group(1)), p50_ms=duration_ms(p50.group(1)),
                     p99_ms=duration_ms(p99.group(1)), errors=errors)


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("median of no samples")
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the divisor is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal from issue 8: ``ours / envoy`` (kind ``ratio``) or ``ours`` (kind ``value``)."""

    kind: Literal["ratio", "value"]
    op: Literal[">=", "<="]
    threshold: float

    def describe(self) -> str:
        subject = "ours/envoy" if self.kind == "ratio" else "ours"
        return f"{subject} {self.op} {self.threshold:g}"

    def met(self, ours: float | None, envoy: float | None) -> bool | None:
        """None when undecidable: a figure is missing, or a ratio's base is not positive."""
        if self.kind == "ratio" and (envoy is None or envoy <= 0):
            return None
        value = ratio(ours, envoy) if self.kind == "ratio" else ours
        if value is None or math.isnan(value):
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass(kw_only=True)
class CaseResult:
    """One row of the table and one entry of ``bench/results/<date>.json``."""

    case: str  #: the case module (``l4_requests``)
    name: str
    unit: str
    ours: float | None = None
    envoy: float | None = None
    direct: float | None = None
    target: Target | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ours, self.envoy)

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "name": self.name, "unit": self.unit, "ours": self.ours,
                "envoy": self.envoy, "direct": self.direct,
                "ours_vs_envoy": ratio(self.ours, self.envoy),
                "ours_vs_direct": ratio(self.ours, self.direct),
                "target": self.target.describe() if self.target else None, "met": self.met,
                "note": self.note, "samples": self.samples}


def row(case: str, name: str, unit: str, samples: Mapping[str, Sequence[float]], *,
        target: Target | None = None, note: str = "") -> CaseResult:
    """A table row whose figures are the medians of ``samples`` (keys: system names)."""
    mids = medians(samples)
    return CaseResult(case=case, name=name, unit=unit, ours=mids.get("ours"),
                      envoy=mids.get("envoy"), direct=mids.get("direct"), target=target,
                      note=note, samples={k: list(v) for k, v in samples.items()})


def alternate(systems: Mapping[str, Callable[[], T]], rounds: int,
              report: Callable[[str], None] | None = None) -> dict[str, list[T]]:
    """Run each system's measurement once per round, in turn (A B C A B C ...)."""
    results: dict[str, list[T]] = {name: [] for name in systems}
    for number in range(1, rounds + 1):
        for name, measure in systems.items():
            value = measure()
            results[name].append(value)
            if report is not None:
                report(f"  round {number} {name:6}: {value}")
    return results


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: median(values) for name, values in samples.items() if values}


# --- processes -------------------------------------------------------------------------------


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (``ip netns exec`` execs, same pid)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise this process's (and its future children's) open-file limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(target, soft)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}: did it exit?")


def connect_socket(host: str, port: int, netns: str | None = None) -> socket.socket:
    """A TCP socket created in ``netns`` (the namespace sticks to it) and connected."""
    if netns is None:
        sock = socket.socket()
    else:
        from common.netns import call_in_netns

        sock = call_in_netns(netns_path(netns), socket.socket)
    try:
        sock.settimeout(1.0)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def wait_tcp(host: str, port: int, *, what: str, netns: str | None = None,
             alive: Callable[[], bool] = lambda: True, deadline: float = 30.0) -> None:
    """Poll until ``host:port`` (seen from ``netns``) accepts a connection."""
    end = time.monotonic() + deadline
    while True:
        if not alive():
            raise BenchError(f"{what} exited before listening on {host}:{port}: see its log")
        try:
            connect_socket(host, port, netns).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise BenchError(f"{what} not listening on {host}:{port} after {deadline} s"
                                 ) from None
            time.sleep(0.05)


class Processes:
    """Child processes of one benchmark run, stopped in reverse order on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._stack = ExitStack()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def popen(self, name: str, argv: Sequence[str], *, netns: str | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        env = {**os.environ, "PYAMBIENT_LOG": "warning"}
        child = subprocess.Popen(in_netns(netns, argv), stdout=log, stderr=log, cwd=cwd,
                                 env=env)
        self._stack.callback(log.close)
        self._stack.callback(stop_process, child)
        return child

    def fork(self, target: Callable[..., None], *args: Any) -> BaseProcess:
        """``target(*args, ready)`` in a forked process; returns once it set ``ready``."""
        context = multiprocessing.get_context("fork")
        ready = context.Event()
        proc = context.Process(target=target, args=(*args, ready), daemon=True)
        proc.start()
        self._stack.callback(_stop_forked, proc)
        if not ready.wait(60):
            raise BenchError(f"{getattr(target, '__name__', target)}{args[:1]} not ready "
                             "after 60 s")
        return proc


def stop_process(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _stop_forked(proc: BaseProcess) -> None:
    if proc.is_alive() and proc.pid is not None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- peers -----------------------------------------------------------------------------------


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    server {{
        listen {listen};
        location = / {{ return 200 "ok\\n"; }}
        location = /bulk {{ alias {bulk}; sendfile on; }}
    }}
}}
"""


def bulk_file(directory: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes (no disk cost for its zeros), read once here.

    The first read of a hole still fills the page cache with zero pages: nginx spent
    3.3 CPU s/GiB serving the cold file and 0.1 s warm, which made whichever system
    downloaded first in round 1 slower by a third.  Reading it once first makes every
    measured download a warm one.
    """
    path = directory / f"bulk-{size}"
    if not path.exists():
        with path.open("wb") as f:
            f.truncate(size)
    with path.open("rb", buffering=0) as f:
        chunk = bytearray(1 << 20)
        while f.readinto(chunk):
            pass
    # nginx's workers run unprivileged: the (private, 0700) work directory must let them in.
    directory.chmod(0o755)
    path.chmod(0o644)
    return path


def start_nginx(procs: Processes, directory: Path, listen: str, bulk: Path,
                netns: str | None = None, name: str = "nginx") -> subprocess.Popen[bytes]:
    """nginx answering ``/`` with a short 200 and ``/bulk`` with ``bulk``; waits for it."""
    home = directory / name
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=home, listen=listen, bulk=bulk))
    child = procs.popen(name, [NGINX, "-c", str(conf), "-p", str(home), "-e",
                               str(home / "nginx-error.log")], netns=netns)
    host, _, port = listen.rpartition(":")
    wait_tcp("127.0.0.1" if host in ("", "0.0.0.0") else host, int(port), what=name,
             netns=netns, alive=lambda: child.poll() is None)
    return child


def fill_template(name: str, **values: object) -> str:
    """A reference config from ``/work/shared/bench`` with its ``@KEY@`` placeholders set."""
    text = (SHARED / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    if "@" in re.sub(r'"@type"', "", text):
        raise BenchError(f"{name}: a placeholder is left unfilled")
    return text


#: Envoy's default circuit breakers allow 1,024 connections/requests per cluster, so a
#: reference config drops tunnels beyond that (Istio raises these limits in what it
#: generates).  The harness raises them too, for the memory case's 10,000 connections.
_NO_BREAKER = ("connect_timeout: 1s\n    circuit_breakers: {thresholds: [{max_connections: "
               "1000000, max_pending_requests: 1000000, max_requests: 1000000}]}")


def without_breakers(config: str) -> str:
    """``config`` with each cluster's circuit-breaker limits raised (see ``_NO_BREAKER``)."""
    raised = config.replace("connect_timeout: 1s", _NO_BREAKER)
    if raised == config:
        raise BenchError("no 'connect_timeout: 1s' cluster line to add circuit breakers to")
    return raised


def envoy_argv(config: Path, base_id: int) -> list[str]:
    return [ENVOY, "-c", str(config), "--concurrency", "1", "-l", "warning",
            "--base-id", str(base_id), "--disable-hot-restart"]


def write_certs(directory: Path) -> Path:
    """CA + client/server leaves with the SPIFFE SANs the Envoy pair configs expect."""
    from common.hbone.__main__ import write_certs as hbone_certs

    hbone_certs(directory)
    return directory


# --- the L4 environment ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class L4Target:
    """Where a system's client connects from (``netns``) and to (``host:port``)."""

    netns: str
    host: str
    port: int
    pids: tuple[int, ...]  #: the proxy processes (client side first); none for direct

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"


@dataclass(frozen=True, kw_only=True)
class L4Env:
    targets: dict[System, L4Target]
    bulk_size: int


def start_envoy_pair(procs: Processes, work: Path, client: Any, server: Any) -> tuple[int, int]:
    """Envoy's HBONE pair: the client Envoy on ``client``'s loopback, the server Envoy on
    ``server``'s address (``.name``: its netns, ``.ip``); their pids."""
    certs = write_certs(work / "certs")
    server_conf = work / "envoy-hbone-server.yaml"
    server_conf.write_text(without_breakers(fill_template(
        "envoy-hbone-server.yaml", ADMIN_PORT=19001, HBONE_PORT=ENVOY_HBONE_PORT,
        BACKEND_PORT=BACKEND_PORT, CERT_DIR=certs,
    ).replace(f"address: 127.0.0.1, port_value: {ENVOY_HBONE_PORT}",
              f"address: 0.0.0.0, port_value: {ENVOY_HBONE_PORT}")))
    client_conf = work / "envoy-hbone-client.yaml"
    client_conf.write_text(without_breakers(fill_template(
        "envoy-hbone-client.yaml", ADMIN_PORT=19000, LISTEN_PORT=ENVOY_LISTEN_PORT,
        BACKEND_PORT=BACKEND_PORT, HBONE_PORT=ENVOY_HBONE_PORT, CERT_DIR=certs,
    ).replace(f"address: 127.0.0.1, port_value: {ENVOY_HBONE_PORT}",
              f"address: {server.ip}, port_value: {ENVOY_HBONE_PORT}")))
    envoy_s = procs.popen("envoy-hbone-server", envoy_argv(server_conf, 11), netns=server.name)
    wait_tcp(server.ip, ENVOY_HBONE_PORT, what="envoy HBONE server", netns=server.name,
             alive=lambda: envoy_s.poll() is None)
    envoy_c = procs.popen("envoy-hbone-client", envoy_argv(client_conf, 12), netns=client.name)
    wait_tcp("127.0.0.1", ENVOY_LISTEN_PORT, what="envoy HBONE client", netns=client.name,
             alive=lambda: envoy_c.poll() is None)
    return envoy_c.pid, envoy_s.pid


def _ztunnel_node(node: str, ca_dir: str, pods: dict[str, tuple[str, str]],
                  ready: Any) -> None:
    # bench/ztunnel_l4.py (another helper's) runs one ztunnel "node" per process: reuse it.
    importlib.import_module("bench.ztunnel_l4").node_process(node, ca_dir, pods, ready)


@contextmanager
def l4_env(work: Path, bulk_size: int) -> Iterator[L4Env]:
    """Pods a..d, nginx in b and d, ztunnels for a->b, Envoy's HBONE pair for c->d.

    Everything started here stops (then the namespaces go) when the context exits.
    """
    sys.path.insert(0, str(REPO))
    from common.ca import CertificateAuthority
    from tests.netns.ztunnel_support import pod_network

    raise_nofile()
    bulk = bulk_file(work, bulk_size)
    work = Path(tempfile.mkdtemp(prefix="l4-", dir=work))  # this instance's files
    work.chmod(0o755)
    with pod_network(["a", "b", "c", "d"]) as pods, Processes(work) as procs:
        for pod in ("b", "d"):
            start_nginx(procs, work, f"0.0.0.0:{BACKEND_PORT}", bulk, netns=pods[pod].name,
                        name=f"nginx-{pod}")
        ca_dir = work / "ca"
        CertificateAuthority.generate("cluster.local").save(ca_dir)
        spec = {k: (pods[k].name, pods[k].ip) for k in ("a", "b")}
        nodes = [procs.fork(_ztunnel_node, node, str(ca_dir), spec) for node in
                 ("node1", "node2")]
        client_pid, server_pid = start_envoy_pair(procs, work, pods["c"], pods["d"])
        yield L4Env(bulk_size=bulk_size, targets={
            "ours": L4Target(netns=pods["a"].name, host=pods["b"].ip, port=BACKEND_PORT,
                             pids=tuple(p.pid for p in nodes if p.pid is not None)),
            "envoy": L4Target(netns=pods["c"].name, host="127.0.0.1", port=ENVOY_LISTEN_PORT,
                              pids=(client_pid, server_pid)),
            "direct": L4Target(netns=pods["c"].name, host=pods["d"].ip, port=BACKEND_PORT,
                               pids=()),
        })


# --- the L7 environment ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class L7Env:
    ports: dict[System, int]  #: on 127.0.0.1
    pids: dict[System, int]


@contextmanager
def l7_env(work: Path) -> Iterator[L7Env]:
    """nginx, Envoy with envoy-l7.yaml and the waypoint in bench mode, all on loopback."""
    work = Path(tempfile.mkdtemp(prefix="l7-", dir=work))
    work.chmod(0o755)
    with Processes(work) as procs:
        yield _start_l7(procs, work)


def _start_l7(procs: Processes, work: Path) -> L7Env:
    backend, envoy_port, admin, waypoint_port = (free_port() for _ in range(4))
    nginx = start_nginx(procs, work, f"127.0.0.1:{backend}", bulk_file(work, 1),
                        name="nginx-l7")
    envoy_conf = work / "envoy-l7.yaml"
    envoy_conf.write_text(without_breakers(fill_template(
        "envoy-l7.yaml", ADMIN_PORT=admin, LISTEN_PORT=envoy_port, BACKEND_PORT=backend)))
    envoy = procs.popen("envoy-l7", envoy_argv(envoy_conf, 13))
    wait_tcp("127.0.0.1", envoy_port, what="envoy L7", alive=lambda: envoy.poll() is None)
    waypoint_conf = work / "waypoint-l7.yaml"
    waypoint_conf.write_text((REPO / "bench" / "waypoint-l7.yaml").read_text()
                             .replace("@BACKEND@", f"127.0.0.1:{backend}"))
    waypoint = procs.popen("waypoint", [
        PYTHON, "-m", "waypoint", "--name", "bench", "--namespace", "bench", "--bench-config",
        str(waypoint_conf), "--bench-listen", f"127.0.0.1:{waypoint_port}", "--no-access-log",
        "--log-level", "warning"], cwd=REPO)
    wait_tcp("127.0.0.1", waypoint_port, what="waypoint (bench mode)",
             alive=lambda: waypoint.poll() is None)
    return L7Env(ports={"ours": waypoint_port, "envoy": envoy_port, "direct": backend},
                 pids={"ours": waypoint.pid, "envoy": envoy.pid, "direct": nginx.pid})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- load ------------------------------------------------------------------------------------


def run_wrk(url: str, seconds: float, *, netns: str | None = None, connections: int = 16,
            headers: Sequence[str] = ()) -> WrkResult:
    """``wrk -t1 -c<connections> -d<seconds>s --latency`` from ``netns``."""
    argv = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    done = subprocess.run(in_netns(netns, [*argv, url]), capture_output=True, text=True,
                          timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk {url} failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def run_wrk_fixed_rate(url: str, *, rate: float, seconds: float, netns: str | None = None,
                       connections: int = 16) -> WrkResult:
    """wrk paced to ``rate`` requests/s by bench/fixed_rate.lua (see there) from ``netns``;
    ``rps`` is the achieved rate."""
    argv = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "-s", str(REPO / "bench" / "fixed_rate.lua"), url]
    done = subprocess.run(in_netns(netns, argv), capture_output=True, text=True,
                          timeout=seconds + 60, env={**os.environ, "WRK_RATE": str(rate)})
    if done.returncode != 0:
        raise BenchError(f"wrk at {rate:g}/s against {url} failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return parse_wrk(done.stdout)


def run_curl(url: str, size: int, *, netns: str | None = None) -> float:
    """Download ``url`` (``size`` bytes) with curl from ``netns``; MB/s (10^6 bytes/s)."""
    started = time.perf_counter()
    done = subprocess.run(in_netns(netns, [CURL, "-sS", "-o", "/dev/null", "-w",
                                           "%{size_download}", url]),
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or int(done.stdout or 0) != size:
        raise BenchError(f"curl {url}: got {done.stdout!r} of {size} bytes: {done.stderr}")
    return size / elapsed / 1e6


# --- one run ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Context:
    """What every case gets: the run's settings and the shared, lazily started peers."""

    quick: bool
    rounds: int
    seconds: float  #: per load run
    work: Path
    log: Callable[[str], None] = print
    _l4: tuple[ExitStack, L4Env] | None = None
    _l7: tuple[ExitStack, L7Env] | None = None

    @property
    def bulk_size(self) -> int:
        return (256 if self.quick else 1024) * 1024 * 1024

    def l4(self, *, fresh: bool = False) -> L4Env:
        """The L4 peers, started on first use; ``fresh``: restarted (new processes)."""
        if fresh and self._l4 is not None:
            self._l4[0].close()
            self._l4 = None
        if self._l4 is None:
            self.log("starting the L4 peers: 4 netns pods, 2 ztunnels, Envoy's HBONE pair")
            stack = ExitStack()
            self._l4 = (stack, stack.enter_context(l4_env(self.work, self.bulk_size)))
        return self._l4[1]

    def l7(self, *, fresh: bool = False) -> L7Env:
        """The L7 peers, started on first use; ``fresh``: restarted (new processes)."""
        if fresh and self._l7 is not None:
            self._l7[0].close()
            self._l7 = None
        if self._l7 is None:
            self.log("starting the L7 peers: nginx, Envoy (envoy-l7.yaml), the waypoint")
            stack = ExitStack()
            self._l7 = (stack, stack.enter_context(l7_env(self.work)))
        return self._l7[1]

    def close(self) -> None:
        for env in (self._l4, self._l7):
            if env is not None:
                env[0].close()
        self._l4 = self._l7 = None


# --- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """nproc, CPU model, kernel and Python: what a reader needs to place the figures."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    envoy = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": os.uname().release,
            "python": sys.version.split()[0], "envoy": version.group(1) if version else "?"}
