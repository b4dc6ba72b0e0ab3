"""mTLS contexts and TLSStream over real loopback sockets with certificates made here."""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common import tls
from common.ca import CertificateAuthority, WorkloadCertificate
from common.errors import (
    CertificateError,
    ConnectRefusedError,
    ConnectTimeoutError,
    HandshakeError,
    PeerIdentityError,
    StreamBrokenError,
    StreamClosedError,
)
from common.identity import SpiffeId
from common.tls import TLSStream, accept_tls, client_context, connect_tls, server_context

TD = "cluster.local"
CLIENT = SpiffeId(TD, "default", "client")
SERVER = SpiffeId(TD, "default", "server")


@dataclass
class Pki:
    ca: CertificateAuthority
    client: WorkloadCertificate
    server: WorkloadCertificate


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = CertificateAuthority.generate(TD)
    return Pki(ca, ca.issue(CLIENT), ca.issue(SERVER))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


async def _accept(lsock: socket.socket) -> socket.socket:
    while True:
        try:
            conn, _ = lsock.accept()
            return conn
        except BlockingIOError:
            await trio.lowlevel.wait_readable(lsock)


async def _pair(lsock: socket.socket, cctx: ssl.SSLContext, sctx: ssl.SSLContext, *,
                expected: set[SpiffeId] | None = None) -> tuple[TLSStream, TLSStream]:
    server: list[TLSStream] = []

    async def serve() -> None:
        server.append(await accept_tls(await _accept(lsock), sctx, trust_domain=TD))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await connect_tls("127.0.0.1", lsock.getsockname()[1], cctx,
                                   expected=expected if expected is not None else {SERVER})
    return client, server[0]


async def _server_failure(lsock: socket.socket, sctx: ssl.SSLContext,
                          client: Callable[[int], Awaitable[object]]) -> Exception:
    """Run ``client(port)`` (which checks its own side) against accept_tls, and return
    what accept_tls raised."""
    caught: list[Exception] = []

    async def serve() -> None:
        try:
            stream = await accept_tls(await _accept(lsock), sctx, trust_domain=TD,
                                      handshake_timeout=5)
        except Exception as exc:
            caught.append(exc)
        else:
            await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client(lsock.getsockname()[1])
    assert caught, "accept_tls did not fail"
    return caught[0]


def _bare_client_context(roots_pem: bytes, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- handshake --------------------------------------------------------------------------

async def test_handshake_gives_both_sides_the_peer_identity(
        pki: Pki, listener: socket.socket) -> None:
    client, server = await _pair(listener, client_context(pki.client), server_context(pki.server))
    async with client, server:
        assert client.peer_identity == SERVER
        assert server.peer_identity == CLIENT
        assert client.alpn == server.alpn == "h2"
        assert client.socket.version() == "TLSv1.3"
        assert client.cipher in tls.CIPHERSUITES
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"


def test_contexts_are_tls13_only_with_aes_gcm_and_h2(pki: Pki) -> None:
    for ctx in (client_context(pki.client), server_context(pki.server)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        if tls._libssl is not None:
            suites = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
            assert suites == set(tls.CIPHERSUITES)


async def test_client_without_certificate_is_refused(pki: Pki, listener: socket.socket) -> None:
    async def client(port: int) -> None:
        stream = await connect_tls("127.0.0.1", port, _bare_client_context(pki.ca.roots_pem),
                                   expected=None)
        # TLS 1.3: the client finished first; the server's verdict is the next record.
        with pytest.raises(HandshakeError, match="requires a client certificate"):
            await stream.receive_some()
        await stream.aclose()

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "presented no certificate" in str(exc)


async def test_client_certificate_from_another_ca_is_refused(
        pki: Pki, listener: socket.socket) -> None:
    rogue = CertificateAuthority.generate(TD)
    rogue_cert = rogue.issue(CLIENT)
    # The rogue client trusts our root, so only the server's check can stop it.
    cert = WorkloadCertificate(CLIENT, rogue_cert.key_pem, rogue_cert.cert_pem,
                               pki.ca.roots_pem, rogue_cert.not_before, rogue_cert.not_after)

    async def client(port: int) -> None:
        stream = await connect_tls("127.0.0.1", port, client_context(cert), expected={SERVER})
        with pytest.raises(HandshakeError, match="does not trust the CA"):
            await stream.receive_some()
        await stream.aclose()

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "not signed by a trusted mesh root" in str(exc)


async def test_server_certificate_from_another_ca_is_refused(
        pki: Pki, listener: socket.socket) -> None:
    rogue = CertificateAuthority.generate(TD)
    bad_server = rogue.issue(SERVER)
    bad = WorkloadCertificate(SERVER, bad_server.key_pem, bad_server.cert_pem, pki.ca.roots_pem,
                              bad_server.not_before, bad_server.not_after)

    async def client(port: int) -> None:
        with pytest.raises(HandshakeError, match="server certificate is not signed by a trusted"):
            await connect_tls("127.0.0.1", port, client_context(pki.client), expected={SERVER})

    exc = await _server_failure(listener, server_context(bad), client)
    assert isinstance(exc, HandshakeError)


async def test_expired_server_certificate_is_refused(pki: Pki, listener: socket.socket) -> None:
    expired = pki.ca.issue(SERVER, lifetime=timedelta(hours=1),
                           not_before=datetime.now(UTC) - timedelta(days=1))

    async def client(port: int) -> None:
        with pytest.raises(HandshakeError, match="expired or not yet valid"):
            await connect_tls("127.0.0.1", port, client_context(pki.client), expected={SERVER})

    await _server_failure(listener, server_context(expired), client)


async def test_expired_client_certificate_is_refused(pki: Pki, listener: socket.socket) -> None:
    expired = pki.ca.issue(CLIENT, lifetime=timedelta(hours=1),
                           not_before=datetime.now(UTC) - timedelta(days=1))

    async def client(port: int) -> None:
        stream = await connect_tls("127.0.0.1", port, client_context(expired), expected={SERVER})
        with pytest.raises(HandshakeError, match="expired"):
            await stream.receive_some()
        await stream.aclose()

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert "client certificate is expired" in str(exc)


async def test_client_from_another_trust_domain_is_refused_by_the_server(
        pki: Pki, listener: socket.socket) -> None:
    other = CertificateAuthority.generate("other.td")
    other.add_trusted_root(pki.ca.root_pem)
    foreign = other.issue(SpiffeId("other.td", "default", "client"))
    server = pki.ca.issue(SERVER)
    both_roots = WorkloadCertificate(SERVER, server.key_pem, server.cert_pem, other.roots_pem,
                                     server.not_before, server.not_after)

    async def client(port: int) -> None:
        stream = await connect_tls("127.0.0.1", port, client_context(foreign), expected={SERVER})
        await stream.aclose()

    exc = await _server_failure(listener, server_context(both_roots), client)
    assert isinstance(exc, PeerIdentityError)
    assert "trust domain 'other.td'" in str(exc) and "'cluster.local'" in str(exc)


async def test_unexpected_server_identity_is_refused_naming_both(
        pki: Pki, listener: socket.socket) -> None:
    want = SpiffeId(TD, "default", "reviews")

    async def serve() -> None:
        # The server's handshake may complete or see the client hang up; either is fine.
        with suppress(HandshakeError):
            stream = await accept_tls(await _accept(listener), server_context(pki.server),
                                      trust_domain=TD)
            await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(PeerIdentityError) as info:
                await connect_tls("127.0.0.1", listener.getsockname()[1],
                                  client_context(pki.client), expected={want})
    assert f"presented identity {SERVER}" in str(info.value)
    assert f"expected one of: {want}" in str(info.value)


async def test_plaintext_client_is_refused_with_a_hint(pki: Pki, listener: socket.socket) -> None:
    async def client(port: int) -> None:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while await sock.recv(1024):
                pass
        sock.close()

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "plaintext" in str(exc)


async def test_tls12_only_client_is_refused(pki: Pki, listener: socket.socket) -> None:
    async def client(port: int) -> None:
        with pytest.raises(HandshakeError, match=r"TLS 1\.3"):
            await connect_tls("127.0.0.1", port,
                              _bare_client_context(pki.ca.roots_pem, tls12=True), expected=None)

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "TLS 1.3" in str(exc)


async def test_client_without_alpn_h2_is_refused(pki: Pki, listener: socket.socket) -> None:
    ctx = client_context(pki.client)
    ctx.set_alpn_protocols(["http/1.1"])

    async def client(port: int) -> None:
        with pytest.raises(HandshakeError, match="ALPN None"):
            await connect_tls("127.0.0.1", port, ctx, expected={SERVER})

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "ALPN None, not 'h2'" in str(exc)


@pytest.mark.skipif(tls._libssl is None, reason="needs the libssl helper to restrict suites")
async def test_non_aes_gcm_client_is_refused(pki: Pki, listener: socket.socket) -> None:
    ctx = client_context(pki.client)
    assert tls._libssl is not None
    tls._libssl._lib.SSL_CTX_set_ciphersuites(tls._libssl._ctx_unchecked(ctx),
                                              b"TLS_CHACHA20_POLY1305_SHA256")

    async def client(port: int) -> None:
        with pytest.raises(HandshakeError, match="cipher suite"):
            await connect_tls("127.0.0.1", port, ctx, expected={SERVER})

    exc = await _server_failure(listener, server_context(pki.server), client)
    assert isinstance(exc, HandshakeError)
    assert "no shared cipher suite" in str(exc)


async def test_silent_client_times_out_the_handshake(
        pki: Pki, listener: socket.socket, autojump_clock: trio.testing.MockClock) -> None:
    sock = trio.socket.socket()
    with sock:
        await sock.connect(listener.getsockname())
        with pytest.raises(HandshakeError, match="within 5 s"):
            await accept_tls(await _accept(listener), server_context(pki.server),
                             trust_domain=TD, handshake_timeout=5)


async def test_connection_refused_is_an_upstream_error(pki: Pki) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectRefusedError, match="Connection refused"):
        await connect_tls("127.0.0.1", port, client_context(pki.client), expected={SERVER})


# -- the stream -------------------------------------------------------------------------

@pytest.fixture
async def pair(pki: Pki, listener: socket.socket) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    client, server = await _pair(listener, client_context(pki.client), server_context(pki.server))
    async with client, server:
        yield client, server


async def test_bulk_64_mib_arrives_intact(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    block = os.urandom(1 << 20)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 64 << 20

    async def send() -> None:
        for i in range(64):
            chunk = block[i:] + block[:i]
            sent.update(chunk)
            await client.send_all(chunk)
        await client.send_eof()

    async def receive() -> int:
        n = 0
        buf = memoryview(bytearray(256 * 1024))
        while got := await server.receive_into(buf):
            received.update(buf[:got])
            n += got
        return n

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            n = await receive()
    assert n == total
    assert received.hexdigest() == sent.hexdigest()


async def test_half_close_each_way(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    with trio.fail_after(10):
        await client.send_all(b"request")
        await client.send_eof()
        assert await server.receive_some() == b"request"
        assert await server.receive_some() == b""
        await server.send_all(b"response after the client's EOF")
        assert await client.receive_some() == b"response after the client's EOF"
        await server.send_eof()
        assert await client.receive_some() == b""
        assert await client.receive_some() == b""  # EOF is sticky


async def test_half_close_while_the_peer_is_still_sending(
        pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    payload = os.urandom(4 << 20)

    async def server_streams() -> None:
        await server.send_all(payload)
        assert await server.receive_some() == b"bye"
        assert await server.receive_some() == b""
        await server.send_all(b"tail")
        await server.send_eof()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_streams)
            got = bytearray(await client.receive_some())  # the server is mid-stream now
            await client.send_all(b"bye")
            await client.send_eof()
            while chunk := await client.receive_some():
                got += chunk
    assert bytes(got) == payload + b"tail"


async def test_send_after_send_eof_is_a_closed_error(pair: tuple[TLSStream, TLSStream]) -> None:
    client, _ = pair
    await client.send_eof()
    await client.send_eof()  # idempotent
    with pytest.raises(StreamClosedError):
        await client.send_all(b"x")


async def test_use_after_close_is_a_closed_error(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    await client.aclose()
    await client.aclose()
    with pytest.raises(StreamClosedError):
        await client.send_all(b"x")
    with pytest.raises(StreamClosedError):
        await client.receive_some()
    assert await server.receive_some() == b""  # close_notify was sent


async def test_concurrent_receives_are_busy(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            await client.send_all(b"x")


async def test_peer_reset_is_a_broken_stream(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    # SO_LINGER 0: close sends RST, no close_notify.
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.socket.close()
    with trio.fail_after(5), pytest.raises(StreamBrokenError) as info:
        await client.receive_some()
    assert info.value.__cause__ is not None


async def test_eof_without_close_notify_is_a_broken_stream(
        pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    socket.socket(fileno=server.socket.detach()).close()  # TCP FIN, no TLS close_notify
    with trio.fail_after(5), pytest.raises(StreamBrokenError, match="close_notify"):
        await client.receive_some()


async def test_cancelled_receive_loses_nothing(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    with trio.move_on_after(0.01):
        await server.receive_some()
    await client.send_all(b"after cancel")
    with trio.fail_after(5):
        assert await server.receive_some() == b"after cancel"


async def test_aclose_closes_even_when_cancelled(pair: tuple[TLSStream, TLSStream]) -> None:
    client, _ = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.aclose()
    with pytest.raises(StreamClosedError):
        await client.send_all(b"x")


async def test_aclose_wakes_a_blocked_receiver(pair: tuple[TLSStream, TLSStream]) -> None:
    _, server = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def receive() -> None:
                with pytest.raises(StreamClosedError):
                    await server.receive_some()
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()


async def test_stdlib_fallback_still_handshakes_and_half_closes(
        pki: Pki, listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "_libssl", None)
    client, server = await _pair(listener, client_context(pki.client), server_context(pki.server))
    async with client, server:
        assert client.cipher in tls.CIPHERSUITES
        await client.send_all(b"x")
        await client.send_eof()
        assert await server.receive_some() == b"x"
        assert await server.receive_some() == b""
        await server.send_all(b"y")
        assert await client.receive_some() == b"y"
        await server.aclose()  # close_notify through the stdlib shutdown
        assert await client.receive_some() == b""


# -- trio's stream conformance suite ------------------------------------------------------

class _TrioErrors(trio.abc.HalfCloseableStream):
    """TLSStream with our errors mapped back to trio's, so trio's checker can judge it."""

    def __init__(self, inner: TLSStream) -> None:
        self.inner = inner

    @staticmethod
    async def _call(fn: Callable[[], Awaitable[object]]) -> object:
        try:
            return await fn()
        except StreamClosedError as exc:
            raise trio.ClosedResourceError(str(exc)) from exc
        except StreamBrokenError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._call(lambda: self.inner.send_all(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self._call(self.inner.wait_send_all_might_not_block)

    async def send_eof(self) -> None:
        await self._call(self.inner.send_eof)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        got = await self._call(lambda: self.inner.receive_some(max_bytes))
        assert isinstance(got, bytes | bytearray)
        return got

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("native", [True, False], ids=["libssl", "stdlib"])
async def test_tls_stream_passes_trios_half_closeable_stream_checks(
        pki: Pki, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr(tls, "_libssl", None)
    elif tls._libssl is None:
        pytest.skip("the libssl helper is not available here")
    cctx, sctx = client_context(pki.client), server_context(pki.server)

    async def make() -> tuple[_TrioErrors, _TrioErrors]:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        with lsock:
            client, server = await _pair(lsock, cctx, sctx)
        return _TrioErrors(client), _TrioErrors(server)

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(make, None)


@pytest.mark.skipif(tls._libssl is None, reason="needs the libssl helper to request a KeyUpdate")
async def test_key_update_mid_stream_is_transparent(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    assert tls._libssl is not None
    key_update = tls._libssl._lib.SSL_key_update
    key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    key_update.restype = ctypes.c_int
    ssl_key_update_requested = 1  # the peer must update its keys too, and say so
    pending = tls._libssl._lib.SSL_get_key_update_type
    pending.argtypes = [ctypes.c_void_p]
    assert key_update(tls._libssl._ssl_ptr(client.socket), ssl_key_update_requested) == 1
    assert pending(tls._libssl._ssl_ptr(client.socket)) == ssl_key_update_requested
    payload = os.urandom(2 << 20)

    async def echo() -> None:
        received = 0
        while received < len(payload):
            chunk = await server.receive_some()
            received += len(chunk)
            await server.send_all(chunk)

    got = bytearray()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(client.send_all, payload)
            while len(got) < len(payload):
                got += await client.receive_some()
    assert got == payload
    assert pending(tls._libssl._ssl_ptr(client.socket)) == -1  # SSL_KEY_UPDATE_NONE: sent


async def test_server_that_never_speaks_tls_times_out_the_client(
        pki: Pki, listener: socket.socket, autojump_clock: trio.testing.MockClock) -> None:
    # The kernel completes the TCP handshake from the backlog; nobody ever answers TLS.
    with pytest.raises(HandshakeError, match=r"no TLS handshake .* within 3"):
        await connect_tls("127.0.0.1", listener.getsockname()[1], client_context(pki.client),
                          expected={SERVER}, connect_timeout=3)


async def test_source_address_is_bound(pki: Pki, listener: socket.socket) -> None:
    peers: list[tuple[str, int]] = []

    async def serve() -> None:
        conn = await _accept(listener)
        peers.append(conn.getpeername())
        stream = await accept_tls(conn, server_context(pki.server), trust_domain=TD)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        stream = await connect_tls("127.0.0.1", listener.getsockname()[1],
                                   client_context(pki.client), expected={SERVER},
                                   source=("127.0.0.2", 0))
        assert stream.socket.getsockname()[0] == "127.0.0.2"
        await stream.aclose()
    assert peers[0][0] == "127.0.0.2"


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
async def test_so_mark_is_set_on_the_outbound_socket(pki: Pki, listener: socket.socket) -> None:
    client, server = await _pair_with_mark(listener, pki, tls.ZTUNNEL_MARK)
    async with client, server:
        assert client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539


async def _pair_with_mark(listener: socket.socket, pki: Pki,
                          mark: int) -> tuple[TLSStream, TLSStream]:
    server: list[TLSStream] = []

    async def serve() -> None:
        server.append(await accept_tls(await _accept(listener), server_context(pki.server),
                                       trust_domain=TD))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await connect_tls("127.0.0.1", listener.getsockname()[1],
                                   client_context(pki.client), expected={SERVER}, so_mark=mark)
    return client, server[0]


async def test_unanswered_tcp_connect_times_out(
        pki: Pki, autojump_clock: trio.testing.MockClock) -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so connect hangs.
    with socket.socket() as full, socket.socket() as queued:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued.connect(full.getsockname())
        with pytest.raises(ConnectTimeoutError, match=r"no TCP connection .* within 3"):
            await connect_tls("127.0.0.1", full.getsockname()[1], client_context(pki.client),
                              expected={SERVER}, connect_timeout=3)


async def test_leaves_of_two_intermediates_under_one_root_trust_each_other(
        listener: socket.socket) -> None:
    root = CertificateAuthority.generate(TD)
    client_cert = root.intermediate().issue(CLIENT)
    server_cert = root.intermediate().issue(SERVER)
    client, server = await _pair(listener, client_context(client_cert),
                                 server_context(server_cert))
    async with client, server:
        assert (client.peer_identity, server.peer_identity) == (SERVER, CLIENT)


async def test_receive_some_respects_max_bytes(pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    await client.send_all(b"abc")
    with trio.fail_after(5):
        assert await server.receive_some(1) == b"a"
        assert await server.receive_some(1 << 26) == b"bc"  # a huge limit is fine too
    with pytest.raises(ValueError, match="at least 1"):
        await server.receive_some(0)


def _rsa_plugin_ca(directory: Path) -> None:
    """Istio plug-in CA files the way Istio's sample Makefile makes them: RSA root and
    intermediate, neither with a SPIFFE SAN."""
    now = datetime.now(UTC)

    def ca_cert(name: str, key: rsa.RSAPrivateKey, issuer: str,
                issuer_key: rsa.RSAPrivateKey) -> x509.Certificate:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
                .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(hours=1))
                .not_valid_after(now + timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(issuer_key, hashes.SHA256()))

    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    inter_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = ca_cert("Root CA", root_key, "Root CA", root_key)
    inter = ca_cert("Intermediate CA", inter_key, "Root CA", root_key)
    pem = serialization.Encoding.PEM
    (directory / "root-cert.pem").write_bytes(root.public_bytes(pem))
    (directory / "ca-cert.pem").write_bytes(inter.public_bytes(pem))
    (directory / "cert-chain.pem").write_bytes(inter.public_bytes(pem) + root.public_bytes(pem))
    (directory / "ca-key.pem").write_bytes(inter_key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


async def test_istio_rsa_plugin_ca_issues_leaves_that_handshake(
        listener: socket.socket, tmp_path: Path) -> None:
    _rsa_plugin_ca(tmp_path)
    ca = CertificateAuthority.load(tmp_path, trust_domain=TD)
    client, server = await _pair(listener, client_context(ca.issue(CLIENT)),
                                 server_context(ca.issue(SERVER)))
    async with client, server:
        assert (client.peer_identity, server.peer_identity) == (SERVER, CLIENT)


def test_contexts_load_without_memfd(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memfd(name: str, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    ctx = server_context(pki.server)
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_a_key_that_does_not_match_the_certificate_is_a_certificate_error(pki: Pki) -> None:
    mixed = WorkloadCertificate(CLIENT, pki.server.key_pem, pki.client.cert_pem,
                                pki.client.roots_pem, pki.client.not_before,
                                pki.client.not_after)
    with pytest.raises(CertificateError, match="cannot load the certificate and key"):
        client_context(mixed)


class _FakePeer:
    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self.der


def _der_with_sans(*sans: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "peer")])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(("der", "message"), [
    (None, "presented no certificate"),
    (_der_with_sans(), "no SAN"),
    (_der_with_sans(x509.DNSName("reviews.default.svc")), "has 0 spiffe:// URI SANs"),
    (_der_with_sans(x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"),
                    x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/c")),
     "has 2 spiffe:// URI SANs"),
    (_der_with_sans(x509.UniformResourceIdentifier("spiffe://td/ns/a")),
     "not a workload identity"),
])
def test_peer_identity_needs_exactly_one_workload_spiffe_san(der: bytes | None,
                                                              message: str) -> None:
    with pytest.raises(PeerIdentityError, match=message):
        tls.peer_identity(_FakePeer(der))  # type: ignore[arg-type]


def test_peer_identity_ignores_other_sans() -> None:
    der = _der_with_sans(x509.DNSName("x.example"), x509.UniformResourceIdentifier(
        "https://x.example/"), x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"))
    assert tls.peer_identity(_FakePeer(der)) == SpiffeId("td", "a", "b")  # type: ignore[arg-type]


async def test_connect_uses_a_given_socket_and_consumes_it_on_failure(
        pki: Pki, listener: socket.socket) -> None:
    given = socket.socket()
    given.bind(("127.0.0.3", 0))
    bound = given.getsockname()
    client, server = await _pair_from(listener, pki, given)
    async with client, server:
        assert client.socket.getsockname() == bound
    refused = socket.socket()
    with pytest.raises(ConnectRefusedError):
        await connect_tls("127.0.0.1", 1, client_context(pki.client), expected=None,
                          sock=refused)
    assert refused.fileno() == -1  # closed


async def _pair_from(listener: socket.socket, pki: Pki,
                     sock: socket.socket) -> tuple[TLSStream, TLSStream]:
    server: list[TLSStream] = []

    async def serve() -> None:
        server.append(await accept_tls(await _accept(listener), server_context(pki.server),
                                       trust_domain=TD))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await connect_tls("127.0.0.1", listener.getsockname()[1],
                                   client_context(pki.client), expected={SERVER}, sock=sock)
    return client, server[0]
