"""Packet loss and delay between two nodes: bytes intact, throughput degrades.

Two network namespaces made by this test (``pa-rel<pid>-a``/``-b``) joined by a veth
pair stand in for two nodes; an HBONE client (``python -m common.hbone client``) in
``a`` and an HBONE server plus a TCP echo in ``b``, as processes.  ``tc netem`` shapes
the veth ends inside those namespaces only.  The same 8 MiB goes through the tunnel
and back without and with loss and delay; the test compares digests and speed.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from deploy.local import netns
from tests.reliability.procs import REPO

pytestmark = pytest.mark.netns

A_IP, B_IP = "10.250.9.1", "10.250.9.2"
CLIENT_PORT, HBONE_PORT, ECHO_PORT = 15001, 15008, 9000
NETEM = ["delay", "10ms", "2ms", "loss", "1%"]
TBF = ["tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[str, str]]:
    tag = f"pa-rel{os.getpid()}"
    a, b = f"{tag}-a", f"{tag}-b"
    veth_a, veth_b = f"rla{os.getpid() % 100000}", f"rlb{os.getpid() % 100000}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        netns.add(a)
        netns.add(b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _ip("link", "set", veth_a, "netns", a)
        _ip("link", "set", veth_b, "netns", b)
        _ip("-n", a, "addr", "add", f"{A_IP}/24", "dev", veth_a)
        _ip("-n", b, "addr", "add", f"{B_IP}/24", "dev", veth_b)
        _ip("-n", a, "link", "set", veth_a, "up")
        _ip("-n", b, "link", "set", veth_b, "up")
        certs = tmp_path / "certs"
        subprocess.run([sys.executable, "-m", "common.hbone", "certs", str(certs)], cwd=REPO,
                       check=True, capture_output=True)

        def spawn(ns: str, *argv: str) -> None:
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv],
                                          cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))

        spawn(b, "-m", "deploy.local.echo", "--tcp", "--host", B_IP, "--port", str(ECHO_PORT))
        spawn(b, "-m", "common.hbone", "server", "--listen", f"{B_IP}:{HBONE_PORT}",
              "--cert-dir", str(certs))
        spawn(a, "-m", "common.hbone", "client", "--listen", f"127.0.0.1:{CLIENT_PORT}",
              "--hbone", f"{B_IP}:{HBONE_PORT}", "--authority", f"{B_IP}:{ECHO_PORT}",
              "--cert-dir", str(certs))
        yield a, b
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        netns.delete(a)
        netns.delete(b)


def _shape(ns: str) -> str:
    """Loss and delay on the namespace's veth end (inside the namespace only).

    ``tc netem`` when the kernel has it; otherwise (sch_netem missing, as in some
    sandboxes) 1 % random loss with nftables ``numgen`` on that veth plus a ``tbf`` rate
    limit with its queueing delay.  Returns what was applied.
    """
    dev = next(line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "type", "veth"], capture_output=True,
        text=True, check=True).stdout.splitlines())
    tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
    if subprocess.run([*tc, "netem", *NETEM], capture_output=True).returncode == 0:
        return "netem " + " ".join(NETEM)
    rules = (f'table inet rel_loss {{ chain input {{ type filter hook input priority 0; '
             f'policy accept; iifname "{dev}" numgen random mod 100 < 1 drop; }}; }}')
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True, capture_output=True)
    subprocess.run([*tc, *TBF], check=True, capture_output=True)
    return "nft 1% loss + " + " ".join(TBF)


async def _through(ns: str, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` into the HBONE client in ``ns`` and read the echo to EOF."""
    sock = await netns.trio_socket_in(ns)
    with trio.fail_after(10):
        while True:  # the client process may still be starting: poll, bounded
            try:
                await sock.connect(("127.0.0.1", CLIENT_PORT))
                break
            except OSError:
                sock.close()
                await trio.sleep(0.05)
                sock = await netns.trio_socket_in(ns)
    stream = trio.SocketStream(sock)
    started = trio.current_time()
    received = bytearray()
    async with stream:
        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await stream.receive_some(256 * 1024):
                    received += data
    return bytes(received), trio.current_time() - started


async def test_loss_and_delay_between_nodes_keep_bytes_intact_and_slow_the_tunnel(
        nodes: tuple[str, str], record_property: Callable[[str, object], None]) -> None:
    a, b = nodes
    payload = random.Random(9).randbytes(8 * 2**20)
    digest = hashlib.sha256(payload).digest()
    # The server process may still be starting (the client then resets us): poll with
    # a small round trip, bounded.
    with trio.fail_after(20):
        while True:
            try:
                if (await _through(a, b"ping"))[0] == b"ping":
                    break
            except (trio.BrokenResourceError, ExceptionGroup):
                pass  # reset by the client: its server is not listening yet
            await trio.sleep(0.1)
    clean, clean_seconds = await _through(a, payload)
    for ns in (a, b):
        shaping = await trio.to_thread.run_sync(_shape, ns)
    lossy, lossy_seconds = await _through(a, payload)
    lost = abs(len(payload) - len(lossy)) + abs(len(payload) - len(clean))
    record_property("bytes_lost", lost)
    record_property("shaping", shaping)
    record_property("clean_MBps", round(len(payload) / clean_seconds / 1e6, 1))
    record_property("netem_MBps", round(len(payload) / lossy_seconds / 1e6, 1))
    print(f"clean {len(payload) / clean_seconds / 1e6:.1f} MB/s, with {shaping} "
          f"{len(payload) / lossy_seconds / 1e6:.1f} MB/s")
    assert hashlib.sha256(clean).digest() == digest
    assert hashlib.sha256(lossy).digest() == digest
    assert lossy_seconds > clean_seconds
