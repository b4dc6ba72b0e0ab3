"""Shared set-up for the HBONE integration tests: a throwaway mesh CA, servers, upstreams."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from common import tls
from common.ca import CertificateAuthority, WorkloadCertificate
from common.hbone import (
    ConnectRequest,
    HbonePool,
    HboneServer,
    Responder,
    forward_tcp,
    tls_connector,
    tls_handshake,
)
from common.identity import SpiffeId

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "client")
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "server")


@dataclass
class Mesh:
    ca: CertificateAuthority
    client: WorkloadCertificate
    server: WorkloadCertificate
    client_context: ssl.SSLContext = field(init=False)
    server_context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.client_context = tls.client_context(self.client)
        self.server_context = tls.server_context(self.server)


def make_mesh() -> Mesh:
    ca = CertificateAuthority.generate(TRUST_DOMAIN)
    return Mesh(ca, ca.issue(CLIENT_ID), ca.issue(SERVER_ID))


def listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


Handler = Callable[[ConnectRequest, Responder], Awaitable[None]]


async def start_server(nursery: trio.Nursery, mesh: Mesh, handler: Handler = forward_tcp, *,
                       port: int = 0, idle_timeout: float = 600.0,
                       ) -> tuple[HboneServer, tuple[str, int]]:
    sock = listen(port)
    server = HboneServer(handler, tls_handshake(lambda: mesh.server_context, TRUST_DOMAIN),
                         handshake_timeout=5.0, idle_timeout=idle_timeout)
    await nursery.start(server.serve, sock)
    address = sock.getsockname()
    return server, (address[0], address[1])


def pool_for(mesh: Mesh, *, idle_timeout: float = 60.0, context: ssl.SSLContext | None = None,
             ) -> HbonePool:
    chosen = context or mesh.client_context

    async def context_for(source: SpiffeId | None) -> ssl.SSLContext:
        return chosen

    return HbonePool(tls_connector(context_for, connect_timeout=5.0), idle_timeout=idle_timeout)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def start_echo(nursery: trio.Nursery) -> int:
    """A TCP echo upstream on loopback that half-closes after echoing everything."""
    listeners = await nursery.start(trio.serve_tcp, _echo, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def round_trip(stream: trio.abc.HalfCloseableStream, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read until EOF (both concurrently)."""
    received = bytearray()

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some():
            received += data
    return bytes(received)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until true, failing after 10 s (never a blind sleep)."""
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 -- the condition lives in another task/socket
            await trio.sleep(0.01)
