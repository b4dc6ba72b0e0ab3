"""The L4 mesh path against a direct connection: pod → ztunnel → ztunnel → pod.

Two hand-built netns pods on a bridge (as in tests/netns), nginx in pod B, and two
ztunnel "nodes", each in its own process (one core each at most), both captured
pods enrolled from a hand-built snapshot.  Measured from pod A:

* small requests: ``wrk -t1 -c16 -d<seconds>s`` to nginx's short 200 (keep-alive);
* bulk: ``curl`` downloading a ``--bytes`` file from nginx (tmpfs), MB/s;
* connection churn: the same wrk run with ``Connection: close`` (one TCP connection, and
  one HBONE stream, per request).

First direct (no capture), then through the two ztunnels.  Compare with Envoy's HBONE
pair from ``bench/hbone_pair.py`` in the same run of the machine (ANCHORS.md targets:
>= 0.5x Envoy's requests/s, >= 0.8x its bulk throughput).

Run as root: ``.venv/bin/python bench/ztunnel_l4.py [--seconds 5] [--bytes 268435456]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.ca import CertificateAuthority  # noqa: E402
from common.logging import configure  # noqa: E402
from tests.netns.ztunnel_support import (  # noqa: E402
    Mesh,
    PodNs,
    pod_network,
    snapshot,
    workload,
)

NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    server {{
        listen 8080;
        location = / {{ return 200 "ok\\n"; }}
        location /bulk {{ alias {dir}/bulk; sendfile on; }}
    }}
}}
"""


def node_process(node: str, ca_dir: str, pods: dict[str, tuple[str, str]],
                 ready: multiprocessing.synchronize.Event) -> None:
    configure("warning")

    async def main() -> None:
        ca = CertificateAuthority.load(Path(ca_dir))
        a = workload(PodNs(*pods["a"]), name="client", namespace="bench", sa="client",
                     node="node1")
        b = workload(PodNs(*pods["b"]), name="server", namespace="bench", sa="server",
                     node="node2")
        mesh = Mesh(ca)
        async with trio.open_nursery() as nursery:
            await mesh.start(nursery, node)
            await mesh.publish(snapshot(1, [a, b]))
            ready.set()
            await trio.sleep_forever()

    trio.run(main)


def wrk(ns: str, url: str, seconds: int, *extra: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "wrk", "-t1", "-c16", f"-d{seconds}s",
                          "--latency", *extra, url], capture_output=True, text=True,
                         check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return (f"{float(rps.group(1)) if rps else 0:,.0f} req/s, p50 {p50 and p50.group(1)}, "
            f"p99 {p99 and p99.group(1)}")


def bulk(ns: str, url: str, size: int) -> str:
    started = time.perf_counter()
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w",
                          "%{size_download}", url], capture_output=True, text=True,
                         check=True).stdout
    elapsed = time.perf_counter() - started
    assert int(out) == size, out
    return f"{size / elapsed / 1e6:,.0f} MB/s"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=256 * 1024 * 1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp, pod_network(["a", "b"]) as pods:
        work = Path(tmp)
        (work / "bulk").write_bytes(b"\0" * args.bytes)
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp))
        ca_dir = work / "ca"
        CertificateAuthority.generate("cluster.local").save(ca_dir)
        nginx = subprocess.Popen(["ip", "netns", "exec", pods["b"].name, "nginx", "-c",
                                  str(work / "nginx.conf")])
        url = f"http://{pods['b'].ip}:8080"
        procs: list[multiprocessing.Process] = []
        try:
            time.sleep(0.5)  # nginx start-up (a benchmark, not a test)
            print("direct:          ", wrk(pods["a"].name, url + "/", args.seconds), "|",
                  bulk(pods["a"].name, url + "/bulk", args.bytes), "| new connection each:",
                  wrk(pods["a"].name, url + "/", args.seconds, "-H", "Connection: close"))
            spec = {k: (v.name, v.ip) for k, v in pods.items()}
            for node in ("node1", "node2"):
                ready = multiprocessing.Event()
                proc = multiprocessing.Process(target=node_process,
                                               args=(node, str(ca_dir), spec, ready))
                proc.start()
                procs.append(proc)
                assert ready.wait(30), f"ztunnel {node} did not start"
            print("via 2 ztunnels:  ", wrk(pods["a"].name, url + "/", args.seconds), "|",
                  bulk(pods["a"].name, url + "/bulk", args.bytes), "| new connection each:",
                  wrk(pods["a"].name, url + "/", args.seconds, "-H", "Connection: close"))
        finally:
            for proc in procs:
                proc.terminate()
                proc.join(10)
            nginx.terminate()
            nginx.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
