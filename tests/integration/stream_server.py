"""A slow streaming HTTP/1.1 backend for the cluster fault tests (run as a pod's command).

The echo app answers with one short JSON document after an optional delay; a fault
test needs a response that is still arriving when the pod dies.  ``GET /stream``
answers ``Content-Length: BLOCKS * BLOCK`` and writes one block every ``INTERVAL``
seconds, so the transfer lasts about ``BLOCKS * INTERVAL`` seconds; every other path
answers ``<pod name>\\n``.  Each response names its pod in ``x-pod``.

The body is :func:`block` 0, 1, 2, ... so a client checks any prefix it received
against :func:`expected` without the server's help.  Standard library only: the pod's
process is ``python <this file>`` (the local kubelet runs ``python`` as the project's
interpreter), the port comes from ``PORT`` (default 8080).
"""

from __future__ import annotations

import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = 16 * 1024
BLOCKS = 2000
INTERVAL = 0.01


def block(index: int) -> bytes:
    """Block ``index`` of every stream: its number, repeated to fill ``BLOCK`` bytes."""
    stamp = f"{index:09d}\n".encode()
    return (stamp * (BLOCK // len(stamp) + 1))[:BLOCK]


def expected(length: int) -> bytes:
    """The first ``length`` bytes of a stream."""
    whole, part = divmod(length, BLOCK)
    return b"".join(block(i) for i in range(whole)) + block(whole)[:part]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        pod = os.environ.get("POD_NAME", "")
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("content-length", str(BLOCK * BLOCKS))
            self.send_header("x-pod", pod)
            self.end_headers()
            for index in range(BLOCKS):
                self.wfile.write(block(index))
                self.wfile.flush()
                time.sleep(INTERVAL)
            return
        body = f"{pod}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-pod", pod)
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
