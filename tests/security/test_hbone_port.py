"""Hostile peers on the HBONE port: refused, logged once, counted, nobody else affected,
memory bounded.

Each case runs a real :class:`~common.hbone.HboneServer` on loopback with the mesh's
mTLS handshake, while a good client keeps tunnelling through the same server; each
refusal must move ``pyambient_hbone_refused_total`` for its reason, and only that.  Cases
already pinned elsewhere (plaintext, no client certificate, another CA, non-CONNECT
methods, rapid reset: ``tests/integration/test_hbone_bad_input.py``; CONNECT to a pod
not on this node: ``tests/unit/test_decide.py::test_inbound_authority_must_be_the_pods_ip``;
CONTINUATION flood in the sans-I/O core: ``tests/unit/test_hbone_protocol.py``) are
referenced in docs/reliability.md, not repeated.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import h2.settings
import pytest
import structlog
import trio
from cryptography import x509

from common import tls
from common.ca import CertificateAuthority
from common.errors import MeshError, ProtocolError
from common.hbone import (
    ConnectRequest,
    HbonePool,
    Responder,
)
from common.hbone.protocol import (
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_OWED_ACKS,
    STREAM_WINDOW,
    H2Protocol,
)
from common.identity import SpiffeId
from tests.integration.hbone_support import (
    CLIENT_ID,
    SERVER_ID,
    Mesh,
    listen,
    make_mesh,
    pool_for,
    round_trip,
    start_echo,
    start_server,
    wait_until,
)
from tests.integration.test_hbone_bad_input import RawH2
from tests.security.hbone_refusals import refusals, start_counted_server, wait_refused
from tests.security.support import leaf_with_san, traced_memory

REFUSED = "hbone handshake refused"
PROTOCOL_ERROR = "hbone protocol error, connection closed"


async def good_client_works(pool: HbonePool, address: tuple[str, int], echo: int) -> None:
    stream = await pool.connect(CLIENT_ID, address, expected={SERVER_ID},
                                authority=f"127.0.0.1:{echo}")
    async with stream:
        assert await round_trip(stream, b"still serving") == b"still serving"


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry.get("event") == name]


async def refused_handshake(mesh: Mesh, context: object, want_in_reason: str,
                            want_refusal: str) -> None:
    """Connect with ``context``; the server refuses, logs one line naming the cause,
    counts one ``want_refusal``, and a good client on the same server is unaffected."""
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            await good_client_works(pool, address, echo)
            with structlog.testing.capture_logs() as logs:
                async with pool_for(mesh, context=context) as bad:  # type: ignore[arg-type]
                    with pytest.raises(MeshError):
                        await bad.connect(CLIENT_ID, address, expected={SERVER_ID},
                                          authority=f"127.0.0.1:{echo}")
                await wait_until(lambda: len(events(logs, REFUSED)) >= 1)
            logged = events(logs, REFUSED)
            assert len(logged) == 1, logged
            assert want_in_reason in str(logged[0]["reason"]), logged[0]
            assert logged[0]["refusal"] == want_refusal, logged[0]
            await good_client_works(pool, address, echo)
            assert refusals(metrics) == {want_refusal: 1}
        nursery.cancel_scope.cancel()


async def test_expired_client_certificate_is_refused() -> None:
    mesh = make_mesh()
    expired = mesh.ca.issue(CLIENT_ID, lifetime=timedelta(hours=1),
                            not_before=datetime.now(UTC) - timedelta(days=2))
    await refused_handshake(mesh, tls.client_context(expired), "expired", "expired_cert")


async def test_client_from_another_trust_domain_is_refused_even_when_its_root_is_trusted(
) -> None:
    mesh = make_mesh()
    other = CertificateAuthority.generate("evil.example")
    # The server trusts both roots (as during a federation mistake): only the trust
    # domain check stands between the foreign workload and the tunnel.
    mesh.server_context.load_verify_locations(cadata=other.roots_pem.decode())
    intruder = other.issue(SpiffeId("evil.example", "default", "client"))
    context = tls.client_context(intruder)
    context.load_verify_locations(cadata=mesh.ca.roots_pem.decode())
    await refused_handshake(mesh, context, "trust domain", "wrong_trust_domain")


@pytest.mark.parametrize("san", [
    x509.DNSName("client.default.svc.cluster.local"),
    x509.UniformResourceIdentifier("https://cluster.local/ns/default/sa/client"),
    x509.RFC822Name("client@cluster.local"),
], ids=["dns", "https-uri", "email"])
async def test_client_certificate_without_a_spiffe_san_is_refused(
        san: x509.GeneralName, tmp_path: Path) -> None:
    mesh = make_mesh()
    await refused_handshake(mesh, leaf_with_san(mesh.ca, san, tmp_path), "spiffe://",
                            "not_spiffe")


async def _flood_without_reading(raw: RawH2, frame: bytes, limit: int) -> str:
    """Send copies of ``frame`` (at most ``limit``) and never read; how the server ended it."""
    await raw.flush()
    batch = frame * 1000
    try:
        with trio.fail_after(60):
            for _ in range(limit // 1000):
                await raw.stream.send_all(batch)
    except MeshError:
        return "closed"  # the server hung up on us mid-flood
    return "still open"


# A SETTINGS frame (one setting) and a PING frame, built by hand: the flooder never
# waits for ACKs, which is exactly what h2's own client would refuse to do.
_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
_PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"01234567"
FLOODS = [pytest.param(_SETTINGS, id="settings"), pytest.param(_PING, id="ping")]


@pytest.mark.parametrize("frame", FLOODS)
def test_control_frame_flood_is_bounded_in_the_sans_io_core(frame: bytes) -> None:
    """CVE-2019-9512/9515: every SETTINGS and PING owes the peer an ACK.  While the
    writer collects them, any number is fine; once it stops (the peer does not read),
    at most MAX_OWED_ACKS pile up before the connection is refused."""
    server = H2Protocol(client_side=False)
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _SETTINGS)
    for _ in range(5):
        server.receive_data(frame * (MAX_OWED_ACKS // 2))
        server.data_to_send()  # a writer that keeps up
    with pytest.raises(ProtocolError, match="CVE-2019-9512"):
        for _ in range(MAX_OWED_ACKS // 1000 + 2):
            server.receive_data(frame * 1000)
    queued = sum(len(piece) for piece in server.data_to_send())
    assert queued < (MAX_OWED_ACKS + 10) * len(frame)
    assert server.data_to_send() == []  # nothing more after the GOAWAY


@pytest.mark.parametrize("frame", FLOODS)
async def test_control_frame_flood_from_a_peer_that_never_reads_is_cut_off(
        frame: bytes) -> None:
    """Over a real connection: the flooder's socket buffers fill with ACKs first
    (a few MB on loopback), then the server stops at MAX_OWED_ACKS and hangs up."""
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        # Small socket buffers on both ends: the ACKs back up after kilobytes, not the
        # megabytes loopback autotuning allows, so the flood reaches the bound quickly.
        listener = listen()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server, address, metrics = await start_counted_server(nursery, mesh,
                                                              listener=listener)
        async with pool_for(mesh) as pool:
            await good_client_works(pool, address, echo)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw = RawH2(await tls.connect_tls(address[0], address[1], mesh.client_context,
                                              expected={SERVER_ID}, sock=sock))
            with structlog.testing.capture_logs() as logs:
                ended = await _flood_without_reading(raw, frame, 2_000_000)
                await good_client_works(pool, address, echo)
                await wait_until(lambda: len(events(logs, PROTOCOL_ERROR)) >= 1)
            await raw.stream.aclose()
            assert ended == "closed", ended
            errors = events(logs, PROTOCOL_ERROR)
            assert len(errors) == 1 and "CVE-2019-9512" in str(errors[0]["reason"]), errors
            # Only the good client's pooled connection is left.
            await wait_until(lambda: len(server.connections) == 1)
            assert refusals(metrics) == {"flood": 1}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("frame_size", [16 * 1024, MAX_FRAME_SIZE],
                         ids=["16k-continuations", "one-frame"])
async def test_header_list_over_the_limit_is_refused_and_the_connection_closed(
        frame_size: int) -> None:
    """Over 64 KiB of headers, as HEADERS + CONTINUATIONs of the 16 KiB default (a header
    bomb) or as the one large HEADERS frame our advertised frame size allows."""
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        async with pool_for(mesh) as pool:
            raw = await RawH2.connect(mesh, address)
            await raw.events_until(h2.events.RemoteSettingsChanged)
            assert raw.h2.max_outbound_frame_size == MAX_FRAME_SIZE
            raw.h2.max_outbound_frame_size = frame_size
            huge = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{echo}".encode()),
                    *[(f"x-junk-{i}".encode(), b"v" * 1000)
                      for i in range(MAX_HEADER_LIST_SIZE // 1000 + 8)]]
            with structlog.testing.capture_logs() as logs, trio.fail_after(10):
                stream_id = raw.h2.get_next_available_stream_id()
                raw.h2.send_headers(stream_id, huge)
                await raw.flush()
                seen = await raw.events_until(h2.events.ConnectionTerminated)
            goaway = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
            accepted = [e for e in seen if isinstance(e, h2.events.ResponseReceived)
                        and dict(e.headers).get(b":status") == b"200"]
            assert not accepted
            assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert len(events(logs, PROTOCOL_ERROR)) == 1
            await raw.stream.aclose()
            await good_client_works(pool, address, echo)
            await wait_refused(metrics, {"header_list_too_large": 1})
        nursery.cancel_scope.cancel()


async def test_headers_frame_over_16_kib_within_the_advertised_size_is_served() -> None:
    """RFC 9113 4.2: a real h2 client that read our SETTINGS (1 MiB frames) sends a 40 KiB
    header block as one HEADERS frame; the server must tunnel it, not FRAME_SIZE_ERROR."""
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh)
        raw = await RawH2.connect(mesh, address)
        with trio.fail_after(10):
            await raw.events_until(h2.events.RemoteSettingsChanged)
        assert raw.h2.max_outbound_frame_size == MAX_FRAME_SIZE
        # Random bytes in hex: HPACK's Huffman code cannot shrink them below 16 KiB.
        padding = [(f"x-pad-{i}".encode(), secrets.token_hex(500).encode()) for i in range(40)]
        request = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{echo}".encode()),
                   *padding]
        stream_id = raw.h2.get_next_available_stream_id()
        raw.h2.send_headers(stream_id, request)
        wire = raw.h2.data_to_send()
        length = int.from_bytes(wire[:3])
        assert wire[3] == 0x1 and length > 16 * 1024 and 9 + length == len(wire), length
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            await raw.stream.send_all(wire)
            seen = await raw.events_until(h2.events.ResponseReceived)
            answer = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
            assert answer and dict(answer[0].headers)[b":status"] == b"200", seen
            raw.h2.send_data(stream_id, b"through a big-header tunnel", end_stream=True)
            await raw.flush()
            echoed = b""
            while not any(isinstance(e, h2.events.StreamEnded) for e in seen):
                seen = await raw.events_until(h2.events.DataReceived)
                echoed += b"".join(e.data for e in seen
                                   if isinstance(e, h2.events.DataReceived))
        assert echoed == b"through a big-header tunnel"
        assert not events(logs, PROTOCOL_ERROR)
        assert refusals(metrics) == {}
        await raw.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_client_that_never_completes_the_handshake_is_refused_at_the_deadline() -> None:
    """A peer that connects and sends nothing (or dribbles) holds a socket only until the
    handshake deadline; counted as ``handshake_timeout``."""
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address, metrics = await start_counted_server(nursery, mesh,
                                                               handshake_timeout=2.0)
        async with pool_for(mesh) as pool:
            # Pooled first: later tunnels reuse this connection, so no good handshake
            # races the short deadline on a loaded machine.
            await good_client_works(pool, address, echo)
            with structlog.testing.capture_logs() as logs, trio.fail_after(10):
                silent = await trio.open_tcp_stream(*address)
                assert await silent.receive_some(4096) == b""  # the server hung up
                await silent.aclose()
                await good_client_works(pool, address, echo)
            logged = events(logs, REFUSED)
            assert len(logged) == 1 and logged[0]["refusal"] == "handshake_timeout", logged
            assert refusals(metrics) == {"handshake_timeout": 1}
        nursery.cancel_scope.cancel()


async def _rst_stream_code(raw: RawH2, stream_id: int) -> int:
    """Read frames until RST_STREAM on ``stream_id``; its error code."""
    buffer = b""
    while True:
        while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3]):
            data = await raw.stream.receive_some(65536)
            assert data, "connection closed before the RST_STREAM"
            buffer += data
        length = int.from_bytes(buffer[:3])
        frame, buffer = buffer[:9 + length], buffer[9 + length:]
        if frame[3] == 0x3 and int.from_bytes(frame[5:9]) & 0x7FFF_FFFF == stream_id:
            return int.from_bytes(frame[9:13])


async def test_new_stream_on_a_draining_connection_is_refused_and_counted() -> None:
    """After GOAWAY a stream the client opens anyway gets REFUSED_STREAM (retryable
    elsewhere), while the stream already open finishes."""
    mesh = make_mesh()
    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        server, address, metrics = await start_counted_server(nursery, mesh)
        raw = await RawH2.connect(mesh, address)
        request = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{echo}".encode())]
        with trio.fail_after(10):
            assert await raw.request(request) == 200
            nursery.start_soon(server.drain, 10.0)
            await wait_until(lambda: all(c.draining for c in server.connections))
            # Sent before this client reads the GOAWAY: it crossed it on the wire.
            late = raw.h2.get_next_available_stream_id()
            raw.h2.send_headers(late, request)
            await raw.flush()
            # Frames read by hand: h2's client state refuses every frame after a GOAWAY.
            code = await _rst_stream_code(raw, late)
        assert code == h2.errors.ErrorCodes.REFUSED_STREAM
        assert refusals(metrics) == {"draining": 1}
        await raw.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stream_that_never_reads_exhausts_its_window_and_memory_stays_bounded() -> None:
    """An upstream that talks forever into a tunnel whose client never reads: the server
    holds at most the client's stream window, never the upstream's whole output."""
    mesh = make_mesh()
    produced = [0]

    async def firehose(request: ConnectRequest, responder: Responder) -> None:
        stream = responder.accept()
        block = b"x" * (256 * 1024)
        while True:  # until the test cancels it: only flow control may stop it
            await stream.send_all(block)
            produced[0] += len(block)

    async with trio.open_nursery() as nursery:
        echo = await start_echo(nursery)
        _server, address = await start_server(nursery, mesh)
        _hose, hose_address = await start_server(nursery, mesh, firehose)
        async with pool_for(mesh) as pool:
            raw = await RawH2.connect(mesh, hose_address)
            # Windows as a real HBONE peer offers them, then never a credit again.
            raw.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
            raw.h2.increment_flow_control_window(4 * STREAM_WINDOW - 65_535)
            with traced_memory() as memory:
                stream_id = raw.h2.get_next_available_stream_id()
                raw.h2.send_headers(stream_id, [(b":method", b"CONNECT"),
                                                (b":authority", b"127.0.0.1:9")])
                await raw.flush()
                # Read only the response head, then never again (no WINDOW_UPDATE sent).
                with trio.fail_after(10):
                    await raw.events_until(h2.events.ResponseReceived)
                with trio.fail_after(10):
                    await good_client_works(pool, address, echo)
                # The hose pushes until windows and socket buffers are full, then stalls:
                # poll (bounded) until a 0.3 s interval passes without progress.
                stalled = False
                with trio.move_on_after(20):
                    while not stalled:
                        before = produced[0]
                        await trio.sleep(0.3)
                        stalled = produced[0] == before and before > 0
            print(f"produced {produced[0]} bytes; memory growth {memory.growth / 2**20:.1f} "
                  f"MiB, peak {memory.peak / 2**20:.1f} MiB")
            assert stalled, f"the hose never stalled ({produced[0]} bytes)"
            assert produced[0] <= STREAM_WINDOW + 2 * 256 * 1024
            assert memory.peak < 16 * 2**20
            await raw.stream.aclose()
        nursery.cancel_scope.cancel()
