"""The L4 mesh path's CPU cost: pod → ztunnel → ztunnel → pod, against Envoy's HBONE pair.

Hand-built netns pods on one bridge (as in tests/netns), nginx in every server pod, and
for each system under test a client pod and a server pod:

* ``ours`` (or each ``--compare LABEL=DIR`` build): two ztunnel "nodes", each a process
  of its own run from that source tree (node1 captures the client pod, node2 serves the
  server pod), enrolled from a hand-built snapshot;
* ``envoy``: Envoy's HBONE pair from the reference configs (ANCHORS.md), one worker each,
  client Envoy on the client pod's loopback, server Envoy on the server pod's IP.

Measured from each client pod, alternately (A B A B ..., ``--rounds`` rounds):

* small requests: ``wrk -t1 -c16 -d<seconds>s`` to nginx's short 200 (keep-alive):
  req/s, p50, p99, and the **CPU time per request** of the system's two proxy processes
  (user + system, all threads, from ``/proc/<pid>/stat``, divided by the requests wrk
  completed).  On a machine shared with other work CPU per request is the steady figure:
  it does not move when a neighbour steals the core, while req/s does;
* with ``--bulk BYTES``: one ``curl`` download of a sparse file of that size, MB/s and CPU
  seconds per GiB.

``--profile DIR`` records each of the first build's ztunnels with py-spy during its load
in the last round (raw folded stacks; idle samples excluded, so shares are of CPU).

Run as root: ``.venv/bin/python bench/ztunnel_l4.py [--seconds 5] [--rounds 3]
[--bulk 268435456] [--compare before=/tmp/before after=.] [--profile /tmp/prof]``
(a build's tree: e.g. ``git archive HEAD | tar -x -C /tmp/before``, with ``common/``,
``ztunnel/`` and ``tests/netns/`` in it).  ``--floor`` measures only trio's cost per
wake-up (a request/response ping-pong in one process, no proxy).  ``node_process`` is also
the harness's ztunnel node (``python -m bench``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.synchronize
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    BACKEND_PORT,
    CURL,
    ENVOY_LISTEN_PORT,
    PYTHON,
    WRK,
    Processes,
    bulk_file,
    in_netns,
    parse_wrk,
    raise_nofile,
    start_envoy_pair,
    start_nginx,
    stop_process,
)
from common.ca import CertificateAuthority  # noqa: E402
from common.logging import configure  # noqa: E402
from tests.netns.ztunnel_support import (  # noqa: E402
    Mesh,
    PodNs,
    pod_network,
    snapshot,
    workload,
)


def node_process(node: str, ca_dir: str, pods: dict[str, tuple[str, str]],
                 ready: multiprocessing.synchronize.Event) -> None:
    """One ztunnel node over pods ``a`` (client, node1) and ``b`` (server, node2)."""
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


# A node run from another source tree (cwd): only that tree's modules are imported, and
# only the test-support API every tree has.  Prints "ready" once enrolled.
_NODE_RUNNER = """
import json, os, signal, sys
from collections import Counter
from pathlib import Path
import trio
from common.ca import CertificateAuthority
from common.logging import configure
from tests.netns.ztunnel_support import Mesh, PodNs, snapshot, workload
node, ca_dir, pods = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
configure("warning")
stacks = Counter()
def sample(signum, frame):
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_qualname} ({code.co_filename.rpartition('/site-packages/')[2]}"
                     f":{frame.f_lineno})")
        frame = frame.f_back
    stacks[";".join(reversed(names))] += 1
def toggle(signum, frame):
    # First SIGUSR1: sample on CPU time (ITIMER_PROF counts user + system time of the
    # process), so a preempted process is not sampled; second: stop and write the stacks.
    if signal.getitimer(signal.ITIMER_PROF)[0] == 0:
        stacks.clear()
        signal.signal(signal.SIGPROF, sample)
        signal.setitimer(signal.ITIMER_PROF, 0.0005, 0.0005)
    else:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        with open(os.environ["ZTUNNEL_L4_CPUPROF"] + f"-{node}.txt", "w") as out:
            for stack, count in stacks.items():
                out.write(f"{stack} {count}\\n")
if os.environ.get("ZTUNNEL_L4_CPUPROF"):
    signal.signal(signal.SIGUSR1, toggle)
async def main():
    a = workload(PodNs(*pods["a"]), name="client", namespace="bench", sa="client", node="node1")
    b = workload(PodNs(*pods["b"]), name="server", namespace="bench", sa="server", node="node2")
    mesh = Mesh(CertificateAuthority.load(Path(ca_dir)))
    async with trio.open_nursery() as nursery:
        await mesh.start(nursery, node)
        await mesh.publish(snapshot(1, [a, b]))
        print("ready", flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


@dataclass
class System:
    label: str
    netns: str  #: the client pod
    host: str
    port: int
    pids: tuple[int, ...]  #: client-side proxy first
    samples: list[dict[str, float]] = field(default_factory=list)
    bulk: list[dict[str, float]] = field(default_factory=list)


def cpu_seconds(pids: tuple[int, ...]) -> tuple[float, float, float]:
    """(user, system, first pid's user + system) CPU time of ``pids`` so far, all
    threads (Linux /proc)."""
    user = system = first = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
        if pid == pids[0]:
            first = int(fields[11]) + int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick, first / tick


def syscalls(pids: tuple[int, ...]) -> int:
    """Read-type plus write-type system calls ``pids`` made so far, all threads
    (``syscr`` + ``syscw`` of /proc/<pid>/io: reads, recvs, writes, sends)."""
    count = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("syscr", "syscw"):
                count += int(value)
    return count


def start_ours(procs: Processes, stack: ExitStack, tree: Path, label: str,
               client: PodNs, server: PodNs, ca_dir: Path,
               cpuprof: Path | None) -> tuple[int, ...]:
    spec = json.dumps({"a": [client.name, client.ip], "b": [server.name, server.ip]})
    pids = []
    for node in ("node1", "node2"):
        log = (procs.logs / f"{label}-{node}.log").open("wb")
        stack.callback(log.close)
        child = subprocess.Popen([PYTHON, "-c", _NODE_RUNNER, node, str(ca_dir), spec],
                                 cwd=tree, stdout=subprocess.PIPE, stderr=log,
                                 env={**os.environ, "PYTHONPATH": str(tree),
                                      "ZTUNNEL_L4_CPUPROF": str(cpuprof or "")})
        stack.callback(stop_process, child)
        assert child.stdout is not None
        if not child.stdout.readline().startswith(b"ready"):
            raise RuntimeError(f"ztunnel {label}/{node} did not start: see {log.name}")
        pids.append(child.pid)
    return tuple(pids)


def requests(system: System, seconds: int, profile: Path | None = None,
             profiler: str = "sigprof", churn: bool = False) -> dict[str, float]:
    close = ["-H", "Connection: close"] if churn else []
    argv = in_netns(system.netns, [WRK, "-t1", "-c16", f"-d{seconds}s", "--latency", *close,
                                   f"http://{system.host}:{system.port}/"])
    spies = []
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        for index, pid in enumerate(system.pids):
            out = profile / f"{system.label}-{'client' if index == 0 else 'server'}"
            if profiler == "sigprof":
                os.kill(pid, signal.SIGUSR1)
            elif profiler == "perf":
                spies.append(subprocess.Popen(
                    ["perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o",
                     f"{out}.perf", "--", "sleep", str(seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            else:
                spies.append(subprocess.Popen(
                    # --gil: only samples holding the GIL, i.e. the interpreter working
                    # (a socket call or epoll wait releases it), not the process waiting.
                    [str(Path(PYTHON).parent / "py-spy"), "record", "-p", str(pid), "-d",
                     str(seconds), "-r", "250", "-f", "raw", "--nonblocking", "--gil",
                     "-o", f"{out}.txt"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
    before, calls_before = cpu_seconds(system.pids), syscalls(system.pids)
    done = subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=seconds + 60)
    after, calls_after = cpu_seconds(system.pids), syscalls(system.pids)
    user, kernel, client = (after[i] - before[i] for i in range(3))
    for spy in spies:
        spy.wait(timeout=seconds + 30)
    if profile is not None and profiler == "sigprof":
        for pid in system.pids:
            os.kill(pid, signal.SIGUSR1)
    result = parse_wrk(done.stdout)
    total = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
    sample = {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
              "cpu_us": (user + kernel) / max(total, 1) * 1e6,
              "sys_us": kernel / max(total, 1) * 1e6,
              "client_us": client / max(total, 1) * 1e6, "errors": float(result.errors),
              "io_calls": (calls_after - calls_before) / max(total, 1)}
    system.samples.append(sample)
    return sample


def download(system: System, size: int) -> dict[str, float]:
    argv = in_netns(system.netns, [CURL, "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                   f"http://{system.host}:{system.port}/bulk"])
    before = cpu_seconds(system.pids)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if int(done.stdout or 0) != size:
        raise RuntimeError(f"curl through {system.label}: {done.stdout!r} of {size} bytes")
    after = cpu_seconds(system.pids)
    gib = size / 2**30
    sample = {"mb_s": size / elapsed / 1e6,
              "cpu_s_gib": (sum(after[:2]) - sum(before[:2])) / gib,
              # The client-side proxy's share (the receiving, decrypting end): a
              # single-threaded proxy busy for the whole download is the bottleneck.
              "client_busy": (after[2] - before[2]) / elapsed}
    system.bulk.append(sample)
    return sample


@contextmanager
def environment(work: Path, builds: dict[str, Path], with_envoy: bool,
                bulk_size: int, cpuprof: Path | None) -> Iterator[list[System]]:
    raise_nofile()
    bulk = bulk_file(work, max(bulk_size, 1))
    names = [f"{i}{side}" for i in range(len(builds) + with_envoy) for side in "cs"]
    with pod_network(names) as pods, Processes(work) as procs, ExitStack() as stack:
        ca_dir = work / "ca"
        CertificateAuthority.generate("cluster.local").save(ca_dir)
        systems = []
        for i, (label, tree) in enumerate(builds.items()):
            client, server = pods[f"{i}c"], pods[f"{i}s"]
            start_nginx(procs, work, f"0.0.0.0:{BACKEND_PORT}", bulk, netns=server.name,
                        name=f"nginx-{label}")
            pids = start_ours(procs, stack, tree, label, client, server, ca_dir,
                              cpuprof and cpuprof / label)
            systems.append(System(label, client.name, server.ip, BACKEND_PORT, pids))
        if with_envoy:
            i = len(builds)
            client, server = pods[f"{i}c"], pods[f"{i}s"]
            start_nginx(procs, work, f"0.0.0.0:{BACKEND_PORT}", bulk, netns=server.name,
                        name="nginx-envoy")
            pids = start_envoy_pair(procs, work, client, server)
            systems.append(System("envoy", client.name, "127.0.0.1", ENVOY_LISTEN_PORT, pids))
        yield systems


def scheduler_floor(rounds: int = 20_000) -> None:
    """CPU per request/response round trip over a socketpair in one process, two task
    wake-ups each: bare trio, through TcpStream, and with no scheduler (selectors)."""
    import selectors
    import socket

    from common.tcp import TcpStream

    async def bare() -> float:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        wait = trio.lowlevel.wait_readable

        async def echo() -> None:
            for _ in range(rounds):
                await wait(b)
                b.send(b.recv(1024))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            started = time.process_time()
            for _ in range(rounds):
                a.send(b"x" * 100)
                await wait(a)
                a.recv(1024)
            return time.process_time() - started

    async def streams() -> float:
        a, b = (TcpStream(s) for s in socket.socketpair())

        async def echo() -> None:
            for _ in range(rounds):
                await b.send_all(await b.receive_some(1024))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            started = time.process_time()
            for _ in range(rounds):
                await a.send_all(b"x" * 100)
                await a.receive_some(1024)
            return time.process_time() - started

    def plain() -> float:
        a, b = socket.socketpair()
        selector = selectors.EpollSelector()
        selector.register(a, selectors.EVENT_READ, a)
        selector.register(b, selectors.EVENT_READ, b)
        started = time.process_time()
        a.send(b"x" * 100)
        done = 0
        while done < rounds:
            for key, _ in selector.select():
                data = key.data.recv(1024)
                if key.data is b:
                    b.send(data)
                else:
                    done += 1
                    a.send(b"x" * 100)
        return time.process_time() - started

    for name, seconds in (("trio wait_readable + recv/send", trio.run(bare)),
                          ("trio through common.tcp.TcpStream", trio.run(streams)),
                          ("selectors, no task switch", plain())):
        print(f"{name:34} {seconds / rounds * 1e6:6.1f} us CPU per round trip")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--churn", action="store_true",
                        help="one request per connection (wrk -H 'Connection: close')")
    parser.add_argument("--bulk", type=int, default=0, metavar="BYTES",
                        help="also one download of BYTES per system and round")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=DIR",
                        help="builds to compare (default: ours=this tree)")
    parser.add_argument("--no-envoy", action="store_true")
    parser.add_argument("--floor", action="store_true",
                        help="only the scheduler floor: a ping-pong in one process")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="keep the processes' logs and configs there")
    parser.add_argument("--profile", type=Path, metavar="DIR")
    parser.add_argument("--profiler", choices=("sigprof", "py-spy", "perf"), default="sigprof")
    args = parser.parse_args()
    if args.floor:
        scheduler_floor()
        return 0
    builds = {"ours": REPO}
    if args.compare:
        builds = {}
        for spec in args.compare:
            label, _, tree = spec.partition("=")
            builds[label] = Path(tree).resolve()
    with tempfile.TemporaryDirectory(prefix="ztunnel-l4-") as tmp:
        work = args.logs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)
        cpuprof = args.profile if args.profile and args.profiler == "sigprof" else None
        if cpuprof is not None:
            cpuprof.mkdir(parents=True, exist_ok=True)
        with environment(work, builds, not args.no_envoy, args.bulk, cpuprof) as systems:
            for system in systems:  # warm-up: tunnels and pooled connections open
                requests(system, 1)
                system.samples.clear()
            for round_number in range(1, args.rounds + 1):
                last = round_number == args.rounds
                for system in systems if round_number % 2 else reversed(systems):
                    profile = (args.profile if last and system.label == systems[0].label
                               else None)
                    s = requests(system, args.seconds, profile, args.profiler, args.churn)
                    print(f"round {round_number} {system.label:8} {s['rps']:8,.0f} req/s "
                          f"p50 {s['p50_ms']:6.2f} ms p99 {s['p99_ms']:7.2f} ms "
                          f"{s['cpu_us']:6.1f} us CPU/request ({s['sys_us']:.0f} system, "
                          f"{s['client_us']:.0f} client side; "
                          f"{s['io_calls']:.1f} I/O calls/request)",
                          flush=True)
                    if args.bulk:
                        b = download(system, args.bulk)
                        print(f"round {round_number} {system.label:8} {b['mb_s']:8,.0f} MB/s "
                              f"{b['cpu_s_gib']:.2f} CPU s/GiB, "
                              f"client side {b['client_busy']:.0%} busy",
                              flush=True)
    envoy = next((s for s in systems if s.label == "envoy"), None)
    print("median:")
    for system in systems:
        rps = statistics.median(s["rps"] for s in system.samples)
        cpu = statistics.median(s["cpu_us"] for s in system.samples)
        line = f"  {system.label:8} {rps:8,.0f} req/s {cpu:6.1f} us CPU/request"
        if envoy is not None and system is not envoy:
            e_rps = statistics.median(s["rps"] for s in envoy.samples)
            e_cpu = statistics.median(s["cpu_us"] for s in envoy.samples)
            line += f"  (vs envoy: {rps / e_rps:.2f}x req/s, {cpu / e_cpu:.2f}x CPU/request)"
        if system.bulk:
            mb = statistics.median(b["mb_s"] for b in system.bulk)
            gib = statistics.median(b["cpu_s_gib"] for b in system.bulk)
            line += f"; bulk {mb:,.0f} MB/s {gib:.2f} CPU s/GiB"
            if envoy is not None and system is not envoy and envoy.bulk:
                e_mb = statistics.median(b["mb_s"] for b in envoy.bulk)
                line += f" ({mb / e_mb:.2f}x envoy)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
