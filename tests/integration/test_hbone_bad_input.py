"""Bad input is refused, logged once with the reason, counted, and costs nothing else.

Every case runs against one server while a good client keeps using it; the server's
refusal counter (``pyambient_hbone_refused_total{reason}``) must move by exactly the
refusals provoked.
"""

from __future__ import annotations

import ssl

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import structlog
import trio

from common import tls
from common.errors import HandshakeError, MeshError, PeerIdentityError
from common.hbone import HbonePool, tls_connector
from common.identity import SpiffeId
from tests.integration.hbone_support import (
    CLIENT_ID,
    SERVER_ID,
    TRUST_DOMAIN,
    Mesh,
    make_mesh,
    pool_for,
    round_trip,
    start_echo,
    start_server,
    wait_until,
)
from tests.security.hbone_refusals import refusals, start_counted_server, wait_refused


class RawH2:
    """A hand-driven h2 client over our mTLS, to send what a good client never would."""

    def __init__(self, stream: tls.TLSStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None,
                                      validate_outbound_headers=False))
        self.h2.initiate_connection()

    @classmethod
    async def connect(cls, mesh: Mesh, address: tuple[str, int]) -> RawH2:
        stream = await tls.connect_tls(address[0], address[1], mesh.client_context,
                                       expected={SERVER_ID})
        return cls(stream)

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def events_until(self, wanted: type) -> list[h2.events.Event]:
        """Read until an event of type ``wanted`` arrives (or EOF)."""
        seen: list[h2.events.Event] = []
        while not any(isinstance(e, wanted) for e in seen):
            data = await self.stream.receive_some(65536)
            if not data:
                break
            seen.extend(self.h2.receive_data(data))
            await self.flush()
        return seen

    async def request(self, headers: list[tuple[bytes, bytes]]) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers)
        await self.flush()
        for event in await self.events_until(h2.events.ResponseReceived):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[b":status"])
        raise AssertionError("no response")


async def _good_client_works(pool: HbonePool, address: tuple[str, int], echo: int) -> None:
    stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                authority=f"127.0.0.1:{echo}")
    async with stream:
        assert await round_trip(stream, b"still serving") == b"still serving"


def _refusals(logs: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [entry for entry in logs if entry.get("event") == event]


async def test_handshake_failures_are_refused_and_logged_once_each() -> None:
    mesh = make_mesh()
    stranger = make_mesh()  # same identities, another CA
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            await _good_client_works(pool, address, echo)
            with structlog.testing.capture_logs() as logs:
                # 1. Plaintext on the HBONE port.
                plain = await trio.open_tcp_stream(*address)
                await plain.send_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n\r\n")
                with trio.fail_after(10):
                    while await plain.receive_some(4096):
                        pass
                await plain.aclose()
                # 2. A client without a certificate (TLS 1.3: it learns on first read).
                bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                bare.minimum_version = ssl.TLSVersion.TLSv1_3
                bare.check_hostname = False
                bare.set_alpn_protocols(["h2"])
                bare.load_verify_locations(cadata=mesh.ca.roots_pem.decode())
                async with pool_for(mesh, context=bare) as bare_pool:
                    with pytest.raises(MeshError):
                        await bare_pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                                authority=f"127.0.0.1:{echo}")
                # 3. A certificate from another CA (the client itself trusts our root).
                foreign = tls.client_context(stranger.client)
                foreign.load_verify_locations(cadata=mesh.ca.roots_pem.decode())
                async with pool_for(mesh, context=foreign) as foreign_pool:
                    with pytest.raises(MeshError):
                        await foreign_pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                                   authority=f"127.0.0.1:{echo}")
                # Each refused connection is logged server-side; poll, never sleep.
                await wait_until(lambda: len(_refusals(logs, "hbone handshake refused")) >= 3)
            reasons = [str(e["reason"]) for e in _refusals(logs, "hbone handshake refused")]
            assert len(reasons) == 3, reasons
            assert all(reasons), reasons
            expected = {"not_tls": 1, "no_client_cert": 1, "unknown_ca": 1}
            await wait_refused(metrics, expected)
            await _good_client_works(pool, address, echo)
            assert refusals(metrics) == expected
        nursery.cancel_scope.cancel()


async def test_unexpected_server_identity_is_refused_by_the_client() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            other = SpiffeId(TRUST_DOMAIN, "default", "someone-else")
            with pytest.raises(PeerIdentityError, match="someone-else"):
                await pool.connect(CLIENT_ID, address, expected={other},
                                   authority=f"127.0.0.1:{echo}")
            assert pool.connections() == []
            await _good_client_works(pool, address, echo)
        nursery.cancel_scope.cancel()


async def test_client_with_wrong_ca_roots_fails_the_handshake() -> None:
    mesh = make_mesh()
    stranger = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)

        async def context_for(source: SpiffeId | None) -> ssl.SSLContext:
            return stranger.client_context

        async with HbonePool(tls_connector(context_for, connect_timeout=5.0)) as pool:
            with pytest.raises(HandshakeError):
                await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                   authority=f"127.0.0.1:{echo}")
        nursery.cancel_scope.cancel()


async def test_non_connect_and_malformed_authority_get_400_on_a_live_connection() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        raw = await RawH2.connect(mesh, address)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            get = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                   (b":authority", f"127.0.0.1:{echo}".encode())]
            assert await raw.request(get) == 400
            bad_authority = [(b":method", b"CONNECT"), (b":authority", b"echo.default:80")]
            assert await raw.request(bad_authority) == 400
            # A good CONNECT that ends its stream at once has no tunnel to carry.
            good = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{echo}".encode())]
            ended = raw.h2.get_next_available_stream_id()
            raw.h2.send_headers(ended, good, end_stream=True)
            await raw.flush()
            answers = [e for e in await raw.events_until(h2.events.ResponseReceived)
                       if isinstance(e, h2.events.ResponseReceived)]
            assert dict(answers[0].headers)[b":status"] == b"400"
            # The same connection still tunnels a good request.
            assert await raw.request(good) == 200
        refused = _refusals(logs, "hbone request refused")
        assert [entry["status"] for entry in refused] == [400, 400, 400]
        assert "CONNECT" in str(refused[0]["reason"])
        assert "IP address" in str(refused[1]["reason"])
        assert [entry["refusal"] for entry in refused] == [
            "not_connect", "bad_authority", "bad_request"]
        # Counted as they were answered (no wait): the good request counted nothing.
        assert refusals(metrics) == {"not_connect": 1, "bad_authority": 1, "bad_request": 1}
        await raw.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_rapid_reset_flood_gets_goaway_while_good_client_keeps_working() -> None:
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            raw = await RawH2.connect(mesh, address)
            request = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{echo}".encode())]
            with trio.fail_after(20), structlog.testing.capture_logs() as logs:
                goaway = None
                for _ in range(2000):
                    stream_id = raw.h2.get_next_available_stream_id()
                    raw.h2.send_headers(stream_id, request)
                    raw.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    try:
                        await raw.flush()
                    except MeshError:
                        break  # the server already hung up on us
                    with trio.move_on_after(0):
                        data = await raw.stream.receive_some(65536)
                        for event in raw.h2.receive_data(data) if data else []:
                            if isinstance(event, h2.events.ConnectionTerminated):
                                goaway = event
                    if goaway is not None:
                        break
                if goaway is None:
                    for event in await raw.events_until(h2.events.ConnectionTerminated):
                        if isinstance(event, h2.events.ConnectionTerminated):
                            goaway = event
                await _good_client_works(pool, address, echo)
            assert goaway is not None
            assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            errors = _refusals(logs, "hbone protocol error, connection closed")
            assert len(errors) == 1 and "rapid-reset" in str(errors[0]["reason"])
            await raw.stream.aclose()
            await wait_refused(metrics, {"rapid_reset": 1})
        nursery.cancel_scope.cancel()
