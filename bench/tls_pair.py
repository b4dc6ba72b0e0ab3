"""Bulk throughput of a TLSStream pair on loopback (mTLS, TLS 1.3, 256 KiB reads).

    .venv/bin/python bench/tls_pair.py [--mib 1024] [--processes 1|2] [--stdlib]

``--processes 2`` runs the receiver in a child process (one core each on a 2-core
machine); ``--stdlib`` disables the libssl helper (no read-ahead, stdlib paths).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio


def _ctx(server: bool, ca_dir: str):  # type: ignore[no-untyped-def]
    from common.ca import CertificateAuthority
    from common.identity import SpiffeId
    from common.tls import client_context, server_context

    ca = CertificateAuthority.load(Path(ca_dir))
    if server:
        return server_context(ca.issue(SpiffeId(ca.trust_domain, "bench", "server")))
    return client_context(ca.issue(SpiffeId(ca.trust_domain, "bench", "client")))


async def _receive(lsock: socket.socket, ca_dir: str) -> tuple[int, float, float]:
    from common.tls import accept_tls

    ctx = _ctx(True, ca_dir)
    await trio.lowlevel.wait_readable(lsock)
    stream = await accept_tls(lsock.accept()[0], ctx, trust_domain="cluster.local")
    buf = memoryview(bytearray(256 * 1024))
    total, start, cpu = 0, 0.0, 0.0
    while n := await stream.receive_into(buf):
        if not total:
            start, cpu = time.perf_counter(), time.process_time()
        total += n
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await stream.aclose()
    return total, elapsed, cpu


async def _send(port: int, mib: int, ca_dir: str) -> float:
    from common.identity import SpiffeId
    from common.tls import connect_tls

    stream = await connect_tls("127.0.0.1", port, _ctx(False, ca_dir),
                               expected={SpiffeId("cluster.local", "bench", "server")})
    block = os.urandom(1 << 20)
    cpu = time.process_time()
    for _ in range(mib):
        await stream.send_all(block)
    await stream.send_eof()
    cpu = time.process_time() - cpu
    while await stream.receive_some():
        pass
    await stream.aclose()
    return cpu


def _child(lsock: socket.socket, ca_dir: str,
           queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(trio.run(_receive, lsock, ca_dir))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--stdlib", action="store_true")
    args = parser.parse_args()
    if args.stdlib:
        os.environ["PYAMBIENT_TLS_NATIVE"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.ca import CertificateAuthority

    with tempfile.TemporaryDirectory() as ca_dir:
        CertificateAuthority.generate("cluster.local").save(Path(ca_dir))
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        if args.processes == 2:
            queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            child = multiprocessing.get_context("fork").Process(
                target=_child, args=(lsock, ca_dir, queue))
            child.start()
            send_cpu = trio.run(_send, port, args.mib, ca_dir)
            total, elapsed, receive_cpu = queue.get()
            child.join()
        else:
            async def both() -> tuple[int, float, float]:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send, port, args.mib, ca_dir)
                    return await _receive(lsock, ca_dir)
            total, elapsed, receive_cpu = trio.run(both)
            send_cpu = 0.0  # one process: the receiver's CPU time covers both
    from common import tls
    print(f"{total / elapsed / 1e6:.0f} MB/s  ({total >> 20} MiB in {elapsed:.2f} s, "
          f"processes={args.processes}, native={tls._libssl is not None}); CPU s per GB: "
          f"receiver {receive_cpu / total * 1e9:.2f}, sender {send_cpu / total * 1e9:.2f}")


if __name__ == "__main__":
    main()
