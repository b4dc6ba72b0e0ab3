"""Bulk throughput of an mTLS pair on loopback (TLS 1.3, 256 KiB reads).

    .venv/bin/python bench/tls_pair.py [--mib 1024] [--processes 1|2]
                                       [--impl native|trio-ssl] [--stdlib]
    .venv/bin/python bench/tls_pair.py --pingpong 20000   # 100-byte round trips, one process
    .venv/bin/python bench/tls_pair.py --handshakes 2000  # mTLS handshakes, one process

``--impl native`` is common.tls.TLSStream; ``trio-ssl`` is trio.SSLStream (MemoryBIO)
with the same contexts, for comparison in the same run.  ``--processes 2`` runs the
receiver in a child process (one core each on a 2-core machine).  ``--stdlib``
disables the libssl helper in common.tls (no read-ahead, stdlib shutdown).
Prints wall-clock MB/s and CPU seconds per GB of each side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import trio

TD = "cluster.local"
READ = 256 * 1024


def _ctx(server: bool, ca_dir: str) -> ssl.SSLContext:
    from common.ca import CertificateAuthority
    from common.identity import SpiffeId
    from common.tls import client_context, server_context

    ca = CertificateAuthority.load(Path(ca_dir))
    if server:
        return server_context(ca.issue(SpiffeId(TD, "bench", "server")))
    return client_context(ca.issue(SpiffeId(TD, "bench", "client")))


async def _receive(lsock: socket.socket, ca_dir: str, impl: str) -> tuple[int, float, float]:
    from common.tls import accept_tls

    ctx = _ctx(True, ca_dir)
    await trio.lowlevel.wait_readable(lsock)
    conn = lsock.accept()[0]
    stream: trio.abc.Stream
    if impl == "native":
        stream = await accept_tls(conn, ctx, trust_domain=TD)
    else:
        conn.setblocking(False)
        stream = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(conn)), ctx,
                                server_side=True)
        await stream.do_handshake()
    total, start, cpu = 0, 0.0, 0.0
    while chunk := await stream.receive_some(READ):
        if not total:
            start, cpu = time.perf_counter(), time.process_time()
        total += len(chunk)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await stream.aclose()
    return total, elapsed, cpu


async def _send(port: int, mib: int, ca_dir: str, impl: str) -> float:
    from common.identity import SpiffeId
    from common.tls import connect_tls

    ctx = _ctx(False, ca_dir)
    block = os.urandom(1 << 20)
    if impl == "native":
        native = await connect_tls("127.0.0.1", port, ctx,
                                   expected={SpiffeId(TD, "bench", "server")})
        cpu = time.process_time()
        for _ in range(mib):
            await native.send_all(block)
        await native.send_eof()
        cpu = time.process_time() - cpu
        while await native.receive_some():
            pass
        await native.aclose()
        return cpu
    bio = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx)
    await bio.do_handshake()
    cpu = time.process_time()
    for _ in range(mib):
        await bio.send_all(block)
    cpu = time.process_time() - cpu
    await bio.aclose()  # trio.SSLStream cannot half-close; this sends close_notify
    return cpu


async def _pingpong(count: int) -> None:
    from common.identity import SpiffeId
    from common.tls import accept_tls, connect_tls

    with tempfile.TemporaryDirectory() as ca_dir:
        from common.ca import CertificateAuthority

        CertificateAuthority.generate(TD).save(Path(ca_dir))
        cctx, sctx = _ctx(False, ca_dir), _ctx(True, ca_dir)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)

    async def echo() -> None:
        await trio.lowlevel.wait_readable(lsock)
        stream = await accept_tls(lsock.accept()[0], sctx, trust_domain=TD)
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        client = await connect_tls("127.0.0.1", lsock.getsockname()[1], cctx,
                                   expected={SpiffeId(TD, "bench", "server")})
        message = b"x" * 100
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            await client.send_all(message)
            await client.receive_some()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await client.aclose()
    lsock.close()
    print(f"pingpong {count / elapsed:.0f} round trips/s, {elapsed / count * 1e6:.0f} us each, "
          f"{cpu / count * 1e6:.0f} us CPU each (both ends, one process)")


async def _handshakes(count: int) -> None:
    from common.identity import SpiffeId
    from common.tls import accept_tls, connect_tls

    with tempfile.TemporaryDirectory() as ca_dir:
        from common.ca import CertificateAuthority

        CertificateAuthority.generate(TD).save(Path(ca_dir))
        cctx, sctx = _ctx(False, ca_dir), _ctx(True, ca_dir)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.setblocking(False)
    expected = {SpiffeId(TD, "bench", "server")}

    async def serve_one() -> None:
        while True:
            try:
                conn = lsock.accept()[0]
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
        stream = await accept_tls(conn, sctx, trust_domain=TD)
        await stream.aclose()

    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            client = await connect_tls("127.0.0.1", lsock.getsockname()[1], cctx,
                                       expected=expected)
            await client.aclose()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    lsock.close()
    print(f"handshakes {count / elapsed:.0f}/s, {cpu / count * 1e3:.2f} ms CPU each "
          f"(client and server, one process)")


def _child(lsock: socket.socket, ca_dir: str, impl: str,
           queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(trio.run(_receive, lsock, ca_dir, impl))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--impl", choices=("native", "trio-ssl"), default="native")
    parser.add_argument("--stdlib", action="store_true")
    parser.add_argument("--pingpong", type=int, metavar="N", default=0)
    parser.add_argument("--handshakes", type=int, metavar="N", default=0)
    args = parser.parse_args()
    if args.stdlib:
        os.environ["PYAMBIENT_TLS_NATIVE"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.pingpong:
        trio.run(_pingpong, args.pingpong)
        return
    if args.handshakes:
        trio.run(_handshakes, args.handshakes)
        return
    from common import tls
    from common.ca import CertificateAuthority

    with tempfile.TemporaryDirectory() as ca_dir:
        CertificateAuthority.generate(TD).save(Path(ca_dir))
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        if args.processes == 2:
            queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            child = multiprocessing.get_context("fork").Process(
                target=_child, args=(lsock, ca_dir, args.impl, queue))
            child.start()
            send_cpu = trio.run(_send, port, args.mib, ca_dir, args.impl)
            total, elapsed, receive_cpu = queue.get()
            child.join()
        else:
            async def both() -> tuple[int, float, float]:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send, port, args.mib, ca_dir, args.impl)
                    return await _receive(lsock, ca_dir, args.impl)
            total, elapsed, receive_cpu = trio.run(both)
            send_cpu = 0.0  # one process: the receiver's CPU time covers both sides
    native = args.impl == "native" and tls._libssl is not None
    print(f"{args.impl:8} {total / elapsed / 1e6:5.0f} MB/s  ({total >> 20} MiB in "
          f"{elapsed:.2f} s, processes={args.processes}, libssl helper={native}); "
          f"CPU s/GB: receiver {receive_cpu / total * 1e9:.2f}, "
          f"sender {send_cpu / total * 1e9:.2f}")


if __name__ == "__main__":
    main()
