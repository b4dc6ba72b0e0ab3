"""HBONE interop with Envoy 1.40 in both directions, on the ANCHORS.md reference configs.

1. Envoy's HBONE client (tcp_proxy tunneling) → our HBONE server → a TCP echo.
2. Our HBONE client → Envoy's HBONE server (CONNECT terminated) → a TCP echo.
"""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import pytest
import trio

from common import tls
from common.hbone import (
    ConnectRequest,
    HbonePool,
    HboneServer,
    Responder,
    forward_tcp,
    tls_connector,
    tls_handshake,
)
from common.hbone.__main__ import CLIENT_ID, SERVER_ID, TRUST_DOMAIN, load_cert, write_certs
from common.identity import SpiffeId
from tests.integration.hbone_support import listen, round_trip, start_echo
from tests.interop.envoy_hbone import (
    fill,
    free_port,
    reference_config,
    require_tls13,
    run_envoy,
)

pytestmark = pytest.mark.envoy


async def _tcp_round_trip(port: int, payload: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        return await round_trip(stream, payload)


async def test_envoy_client_to_our_server(tmp_path: Path) -> None:
    write_certs(tmp_path)
    context = tls.server_context(load_cert(tmp_path, "server"))
    seen: list[ConnectRequest] = []

    async def handler(request: ConnectRequest, responder: Responder) -> None:
        seen.append(request)
        await forward_tcp(request, responder)

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        sock = listen()
        server = HboneServer(handler, tls_handshake(lambda: context, TRUST_DOMAIN))
        await nursery.start(server.serve, sock)
        admin, inbound = free_port(), free_port()
        config = require_tls13(fill(
            reference_config("envoy-hbone-client.yaml"), ADMIN_PORT=admin,
            LISTEN_PORT=inbound, BACKEND_PORT=echo, HBONE_PORT=sock.getsockname()[1],
            CERT_DIR=tmp_path))
        async with run_envoy(config, tmp_path, admin):
            payload = random.Random(1).randbytes(8 * 1024 * 1024)
            with trio.fail_after(30):
                assert await _tcp_round_trip(inbound, payload) == payload
                # Several tunnels at once share Envoy's one HTTP/2 connection to us.
                async with trio.open_nursery() as clients:
                    for index in range(5):
                        clients.start_soon(_tcp_round_trip, inbound, bytes([index]) * 100_000)
        nursery.cancel_scope.cancel()
    assert seen, "Envoy never reached our server"
    request = seen[0]
    assert request.authority == f"127.0.0.1:{echo}"
    assert request.peer_identity == CLIENT_ID


async def test_our_client_to_envoy_server(tmp_path: Path) -> None:
    write_certs(tmp_path)
    context = tls.client_context(load_cert(tmp_path, "client"))

    async def context_for(source: SpiffeId | None) -> ssl.SSLContext:
        return context

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        admin, hbone = free_port(), free_port()
        config = fill(reference_config("envoy-hbone-server.yaml"), ADMIN_PORT=admin,
                      HBONE_PORT=hbone, BACKEND_PORT=echo, CERT_DIR=tmp_path)
        async with run_envoy(config, tmp_path, admin), \
                HbonePool(tls_connector(context_for)) as pool:
            with trio.fail_after(30):
                stream = await pool.connect(CLIENT_ID, ("127.0.0.1", hbone),
                                            expected={SERVER_ID},
                                            authority=f"127.0.0.1:{echo}",
                                            forwarded_for="10.0.0.1:1234")
                # Envoy offers 16 KiB frames and its own windows: 8 MiB each way must
                # respect both.
                payload = random.Random(2).randbytes(8 * 1024 * 1024)
                async with stream:
                    assert await round_trip(stream, payload) == payload

                async def one(index: int) -> None:
                    tunnel = await pool.connect(CLIENT_ID, ("127.0.0.1", hbone),
                                                expected={SERVER_ID},
                                                authority=f"127.0.0.1:{echo}")
                    async with tunnel:
                        data = bytes([index]) * 200_000
                        assert await round_trip(tunnel, data) == data

                async with trio.open_nursery() as clients:
                    for index in range(5):
                        clients.start_soon(one, index)
            assert len(pool.connections()) == 1
        nursery.cancel_scope.cancel()
