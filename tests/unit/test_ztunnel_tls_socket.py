"""connect_tls with a socket the caller created (ztunnel makes it in a pod's netns)."""

from __future__ import annotations

import socket

import pytest
import trio

from common.ca import CertificateAuthority
from common.errors import ConnectRefusedError
from common.identity import SpiffeId
from common.tls import accept_tls, client_context, connect_tls, server_context

TD = "cluster.local"
CLIENT = SpiffeId(TD, "default", "client")
SERVER = SpiffeId(TD, "default", "server")


async def test_connect_tls_uses_the_given_socket() -> None:
    ca = CertificateAuthority.generate(TD)
    client_cert, server_cert = ca.issue(CLIENT), ca.issue(SERVER)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    given = socket.socket()
    given.bind(("127.0.0.3", 0))
    bound = given.getsockname()
    peers: list[tuple[str, int]] = []

    async def serve() -> None:
        await trio.lowlevel.wait_readable(listener)
        conn, peer = listener.accept()
        peers.append(peer)
        stream = await accept_tls(conn, server_context(server_cert), trust_domain=TD)
        await stream.aclose()

    with listener, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            stream = await connect_tls("127.0.0.1", listener.getsockname()[1],
                                       client_context(client_cert), expected={SERVER},
                                       sock=given)
            assert stream.peer_identity == SERVER
            await stream.aclose()
    assert peers == [bound]


async def test_connect_tls_closes_the_given_socket_on_failure() -> None:
    ca = CertificateAuthority.generate(TD)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connect is refused
        given = socket.socket()
        with pytest.raises(ConnectRefusedError):
            await connect_tls("127.0.0.1", port, client_context(ca.issue(CLIENT)),
                              expected={SERVER}, sock=given)
    assert given.fileno() == -1
