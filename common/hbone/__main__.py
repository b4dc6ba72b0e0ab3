"""``python -m common.hbone``: the HBONE demo and a standalone HBONE pair.

Commands:

* ``demo [--bytes N]``: a throwaway CA in a temp dir, an HBONE server and an HBONE client
  as two processes on loopback, then ``N`` bytes (default 1 GiB) pushed through
  TCP in → HBONE client → HBONE server → TCP sink; prints the throughput.
* ``certs DIR``: write ``ca.pem``, ``client.pem/key`` (``.../sa/client``) and
  ``server.pem/key`` (``.../sa/server``), the layout Envoy's reference configs use.
* ``server --listen HOST:PORT --cert-dir DIR``: HBONE in, plain TCP to ``:authority`` out.
* ``client --listen HOST:PORT --hbone HOST:PORT --authority IP:PORT --cert-dir DIR``:
  plain TCP in, one HBONE tunnel per accepted connection out.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from common import tls
from common.ca import CertificateAuthority, WorkloadCertificate
from common.hbone.client import HbonePool, tls_connector
from common.hbone.request import format_address, parse_authority
from common.hbone.server import HboneServer, forward_tcp, tls_handshake
from common.identity import SpiffeId
from common.logging import configure, get_logger
from common.relay import relay
from common.tcp import TcpStream

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "client")
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "server")
_log = get_logger("hbone.demo")


def write_certs(directory: Path) -> None:
    """A fresh CA and two leaves in ``directory`` (keys mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.generate(TRUST_DOMAIN)
    (directory / "ca.pem").write_bytes(ca.roots_pem)
    for name, identity in (("client", CLIENT_ID), ("server", SERVER_ID)):
        cert = ca.issue(identity)
        (directory / f"{name}.pem").write_bytes(cert.cert_pem)
        key = directory / f"{name}.key"
        key.write_bytes(cert.key_pem)
        key.chmod(0o600)


def load_cert(directory: Path, name: str) -> WorkloadCertificate:
    return WorkloadCertificate.from_pem((directory / f"{name}.key").read_bytes(),
                                        (directory / f"{name}.pem").read_bytes(),
                                        (directory / "ca.pem").read_bytes())


def _listen(address: str) -> socket.socket:
    host, port = parse_authority(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


async def run_server(listen: str, cert_dir: Path) -> None:
    context = tls.server_context(load_cert(cert_dir, "server"))
    server = HboneServer(forward_tcp, tls_handshake(lambda: context, TRUST_DOMAIN))
    sock = _listen(listen)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        print(f"ready {listen}", flush=True)


async def run_client(listen: str, hbone: str, authority: str, cert_dir: Path) -> None:
    cert = load_cert(cert_dir, "client")
    context = tls.client_context(cert)
    expected = {SERVER_ID}
    dest = parse_authority(hbone)

    async def context_for(source: SpiffeId | None) -> ssl.SSLContext:
        return context

    async with HbonePool(tls_connector(context_for)) as pool:
        async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
            async with TcpStream(sock) as downstream:
                try:
                    tunnel = await pool.connect(cert.identity, dest, expected=expected,
                                                authority=authority,
                                                forwarded_for=format_address(peer[0], peer[1]))
                except Exception as exc:
                    _log.warning("hbone tunnel failed", error=str(exc))
                    return
                async with tunnel:
                    await relay(downstream, tunnel, label=authority)

        listener = _listen(listen)
        listener.setblocking(False)
        print(f"ready {listen}", flush=True)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # EMFILE and friends: keep serving the others
                    _log.warning("accept failed", reason=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(handle, sock, peer)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(process: subprocess.Popen[bytes]) -> None:
    """Block until a child started with stdout=PIPE printed its ``ready`` line."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(b"ready"):
        process.wait(timeout=10)
        raise SystemExit(f"demo: a child process exited early (code {process.returncode})")


def push(total: int, client_port: int, sink: socket.socket) -> tuple[int, float]:
    """Send ``total`` bytes into the client side, count them at the sink; (bytes, seconds)."""
    import threading

    received = [0]

    def drain() -> None:
        conn, _ = sink.accept()
        buffer = bytearray(256 * 1024)
        with conn:
            while n := conn.recv_into(buffer):
                received[0] += n

    reader = threading.Thread(target=drain)
    reader.start()
    block = memoryview(bytes(1024 * 1024))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", client_port)) as out:
        left = total
        while left > 0:
            chunk = block[:min(left, len(block))]
            out.sendall(chunk)
            left -= len(chunk)
        out.shutdown(socket.SHUT_WR)
        reader.join()
    return received[0], time.perf_counter() - started


def demo(total: int) -> int:
    with tempfile.TemporaryDirectory(prefix="hbone-demo-") as tmp:
        cert_dir = Path(tmp)
        write_certs(cert_dir)
        sink = socket.socket()
        sink.bind(("127.0.0.1", 0))
        sink.listen(1)
        sink_port = sink.getsockname()[1]
        hbone_port, client_port = _free_port(), _free_port()
        python = sys.executable
        env = {**os.environ, "PYAMBIENT_LOG": os.environ.get("PYAMBIENT_LOG", "warning")}
        server = subprocess.Popen([python, "-m", "common.hbone", "server", "--listen",
                                   f"127.0.0.1:{hbone_port}", "--cert-dir", tmp], env=env,
                                  stdout=subprocess.PIPE)
        client = subprocess.Popen([python, "-m", "common.hbone", "client", "--listen",
                                   f"127.0.0.1:{client_port}", "--hbone",
                                   f"127.0.0.1:{hbone_port}", "--authority",
                                   f"127.0.0.1:{sink_port}", "--cert-dir", tmp], env=env,
                                  stdout=subprocess.PIPE)
        try:
            wait_ready(server)
            wait_ready(client)
            print(f"HBONE demo: TCP 127.0.0.1:{client_port} -> HBONE client -> mTLS HTTP/2 "
                  f"CONNECT 127.0.0.1:{hbone_port} ({CLIENT_ID} -> {SERVER_ID}) -> HBONE "
                  f"server -> TCP sink 127.0.0.1:{sink_port}")
            received, seconds = push(total, client_port, sink)
        finally:
            for process in (client, server):
                process.terminate()
            for process in (client, server):
                process.wait(timeout=10)
            sink.close()
    rate = received / seconds / 1e6
    print(f"moved {received / 2**20:.0f} MiB in {seconds:.2f} s: {rate:.0f} MB/s")
    if received != total:
        print(f"ERROR: sent {total} bytes, the sink received {received}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.hbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="move bytes through an HBONE pair on loopback")
    p_demo.add_argument("--bytes", type=int, default=1 << 30, help="default 1 GiB")
    p_certs = commands.add_parser("certs", help="write a throwaway CA and two leaves")
    p_certs.add_argument("directory", type=Path)
    p_server = commands.add_parser("server", help="HBONE in, TCP out")
    p_server.add_argument("--listen", required=True)
    p_server.add_argument("--cert-dir", type=Path, required=True)
    p_client = commands.add_parser("client", help="TCP in, HBONE out")
    p_client.add_argument("--listen", required=True)
    p_client.add_argument("--hbone", required=True)
    p_client.add_argument("--authority", required=True)
    p_client.add_argument("--cert-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    configure()
    if args.command == "demo":
        return demo(args.bytes)
    if args.command == "certs":
        write_certs(args.directory)
        return 0
    try:
        if args.command == "server":
            trio.run(run_server, args.listen, args.cert_dir)
        else:
            trio.run(run_client, args.listen, args.hbone, args.authority, args.cert_dir)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
