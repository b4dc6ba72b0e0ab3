"""HTTP/2 and gRPC through a bench-mode waypoint, over real loopback sockets.

An h2c prior-knowledge client (the ``h2`` library on a TCP socket) talks to the
waypoint's listener (protocol detection -> HTTP/2 shell -> pipeline -> HTTP/2
upstream) in front of the echo app (h2c) and a gRPC-shaped backend written here.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from common.tcp import TcpStream
from deploy.local import echo
from tests.integration.h2_support import (
    GrpcBackend,
    GrpcStream,
    H2Client,
    Reply,
    connect,
    frame,
    unframe,
)
from waypoint.app import Options, Waypoint, bench_config_from
from waypoint.listener import serve_stream
from waypoint.proxy import PeerInfo

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


async def grpc_handler(s: GrpcStream) -> None:
    path = s.path
    if path == b"/test.Echo/Unary":
        msg = await s.message()
        rest = await s.message()
        assert rest is None
        await s.respond_headers()
        await s.send(b"echo:" + (msg or b""))
        await s.finish(0)
    elif path == b"/test.Echo/Bidi":
        await s.respond_headers()
        while (msg := await s.message()) is not None:
            await s.send(b"pong:" + msg)
        await s.finish(0, b"bye")
    elif path == b"/test.Echo/Big":
        total = bytearray()
        while (piece := await s.receive.receive()) is not None:
            total += piece
        await s.respond_headers()
        # Echo the whole body back as the response body.
        for i in range(0, len(total), 65536):
            await s.send_raw(bytes(total[i:i + 65536]))
        await s.finish(0)
    elif path == b"/test.Echo/Slow":
        await trio.sleep_forever()
    elif path == b"/test.Echo/Flaky":
        await s.message()
        tries = sum(1 for h in s.server.requests if dict(h)[b":path"] == path)
        if tries % 2 == 1:
            s.conn.send_headers(s.id, [(b":status", b"200"),
                                       (b"content-type", b"application/grpc"),
                                       (b"grpc-status", b"14")], end_stream=True)
            await s.server.flush(s.conn)
            return
        await s.respond_headers()
        await s.send(b"ok after %d" % tries)
        await s.finish(0)
    else:
        s.conn.send_headers(s.id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                   (b"grpc-status", b"12")], end_stream=True)
        await s.server.flush(s.conn)


@dataclass
class Mesh:
    waypoint: Waypoint
    port: int
    grpc: GrpcBackend


def _config(echo_port: int, grpc_port: int, dead_port: int) -> dict[str, Any]:
    return {
        "namespace": "default",
        "services": [
            {"name": "echo", "ports": [80],
             "endpoints": [{"address": f"127.0.0.1:{echo_port}", "labels": {"version": "v1"}}]},
            {"name": "grpc", "ports": [80],
             "endpoints": [{"address": f"127.0.0.1:{grpc_port}"}]},
            {"name": "dead", "ports": [80],
             "endpoints": [{"address": f"127.0.0.1:{dead_port}"}]},
        ],
        "objects": [{
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "grpc"},
            "spec": {"hosts": ["grpc"], "http": [
                {"match": [{"headers": {"x-fault": {"exact": "abort"}}}],
                 "fault": {"abort": {"grpcStatus": "RESOURCE_EXHAUSTED",
                                     "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "grpc"}}]},
                {"match": [{"uri": {"prefix": "/test.Echo/Slow"}}],
                 "route": [{"destination": {"host": "grpc"}}], "timeout": "0.2s"},
                {"match": [{"uri": {"prefix": "/test.Echo/Flaky"}}],
                 "route": [{"destination": {"host": "grpc"}}],
                 "retries": {"attempts": 2, "retryOn": "unavailable"}},
                {"route": [{"destination": {"host": "grpc"}}]}]},
        }, {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "dead"},
            "spec": {"hosts": ["dead"], "http": [
                {"route": [{"destination": {"host": "dead"}}], "retries": {"attempts": 0}}]},
        }],
    }


def _dead_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def _listen(nursery: trio.Nursery, waypoint: Waypoint) -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)

    async def accept_loop() -> None:
        with listener:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                nursery.start_soon(serve_stream, TcpStream(sock), waypoint.proxy,
                                   PeerInfo(source_ip="127.0.0.1"), None)

    nursery.start_soon(accept_loop)
    port: int = listener.getsockname()[1]
    return port


@pytest.fixture
async def mesh(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mesh]:
    monkeypatch.setattr(echo, "_log", lambda *args: None)
    async with trio.open_nursery() as nursery:
        server = echo.Server(echo.Identity(pod="echo", namespace="default", version="v1"))
        echo_port = (await nursery.start(echo.serve, [0], server, "127.0.0.1"))[0]
        backend = GrpcBackend(grpc_handler)
        grpc_port = await nursery.start(backend.serve)
        waypoint = Waypoint(Options(name="waypoint", namespace="default", access_log=False))
        await waypoint.apply_bench(bench_config_from(_config(echo_port, grpc_port,
                                                             _dead_port())))
        port = await _listen(nursery, waypoint)
        yield Mesh(waypoint, port, backend)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[H2Client]:
    async with trio.open_nursery() as nursery:
        c = H2Client(await connect(mesh.port))
        await c.start(nursery)
        yield c
        nursery.cancel_scope.cancel()


async def test_h2c_get_reaches_echo_over_h2(client: H2Client) -> None:
    reply = await client.request("GET", "/hello?x=1", [(b"x-test", b"a")])
    assert reply.status == 200
    import json
    doc = json.loads(bytes(reply.body))
    assert doc["path"] == "/hello" and doc["query"] == "x=1"
    assert doc["proto"].startswith("HTTP/2")
    assert doc["headers"]["x-test"] == "a"
    assert reply.header(b"x-envoy-upstream-service-time") is not None


async def test_grpc_unary_with_trailers(client: H2Client) -> None:
    reply = await client.request("POST", "/test.Echo/Unary", GRPC, frame(b"hi"),
                                 authority="grpc")
    assert reply.status == 200
    assert unframe(bytes(reply.body)) == [b"echo:hi"]
    assert dict(reply.trailers)[b"grpc-status"] == b"0"


def _messages_at_least(reply: Reply, count: int) -> bool:
    return len(unframe(bytes(reply.body))) >= count


async def test_grpc_bidi_streaming_interleaves(client: H2Client) -> None:
    sid = client.open("POST", "/test.Echo/Bidi", GRPC, authority="grpc", end=False)
    await client.flush()
    reply = client.replies[sid]
    for i in range(5):
        await client.send(sid, frame(b"ping%d" % i))
        # The answer to each message arrives before the next one is sent.
        await client.wait(partial(_messages_at_least, reply, i + 1))
    await client.send(sid, b"", end=True)
    await client.wait(lambda: reply.ended)
    assert unframe(bytes(reply.body)) == [b"pong:ping%d" % i for i in range(5)]
    assert dict(reply.trailers)[b"grpc-status"] == b"0"
    assert dict(reply.trailers)[b"grpc-message"] == b"bye"


async def test_grpc_unavailable_is_retried_by_grpc_status(mesh: Mesh, client: H2Client) -> None:
    reply = await client.request("POST", "/test.Echo/Flaky", GRPC, frame(b"x"), authority="grpc")
    assert reply.status == 200
    assert unframe(bytes(reply.body)) == [b"ok after 2"]
    assert dict(reply.trailers)[b"grpc-status"] == b"0"
    attempts = [dict(h).get(b"x-envoy-attempt-count") for h in mesh.grpc.requests
                if dict(h)[b":path"] == b"/test.Echo/Flaky"]
    assert attempts == [b"1", b"2"]


async def test_route_timeout_is_grpc_deadline_exceeded(client: H2Client) -> None:
    reply = await client.request("POST", "/test.Echo/Slow", GRPC, frame(b"x"), authority="grpc")
    assert reply.status == 200
    assert reply.header(b"grpc-status") == b"4"
    assert reply.header(b"grpc-message") == b"upstream request timeout"


async def test_no_route_is_grpc_unimplemented(client: H2Client) -> None:
    reply = await client.request("POST", "/x.Y/Z", GRPC, frame(b""), authority="nowhere")
    assert reply.status == 200
    assert reply.header(b"grpc-status") == b"12"
    assert reply.body == b"" and reply.trailers == []


async def test_upstream_unavailable_is_grpc_unavailable(client: H2Client) -> None:
    reply = await client.request("POST", "/x.Y/Z", GRPC, frame(b""), authority="dead")
    assert reply.status == 200
    assert reply.header(b"grpc-status") == b"14"
    assert reply.header(b"grpc-message") is not None


async def test_fault_abort_grpc_status(client: H2Client) -> None:
    reply = await client.request("POST", "/test.Echo/Unary", [*GRPC, (b"x-fault", b"abort")],
                                 frame(b"hi"), authority="grpc")
    assert reply.status == 200
    assert reply.header(b"grpc-status") == b"8"


async def test_no_route_plain_h2_is_404(client: H2Client) -> None:
    reply = await client.request("GET", "/", authority="nowhere")
    assert reply.status == 404


async def test_rapid_reset_flood_gets_goaway_and_others_unaffected(mesh: Mesh,
                                                                   client: H2Client) -> None:
    async with trio.open_nursery() as nursery:
        attacker = H2Client(await connect(mesh.port))
        await attacker.start(nursery)
        for _ in range(20):  # batches of 50 open+reset pairs, as an attacker sends them
            if attacker.closed or attacker.terminated is not None:
                break
            for _ in range(50):
                sid = attacker.open("GET", "/slow", authority="echo")
                attacker.h2.reset_stream(sid)
            try:
                await attacker.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        await attacker.wait(lambda: attacker.terminated is not None or attacker.closed)
        assert attacker.terminated is not None
        assert attacker.terminated.error_code == 0xB  # ENHANCE_YOUR_CALM
        nursery.cancel_scope.cancel()
    reply = await client.request("GET", "/after")
    assert reply.status == 200


async def test_16mib_body_with_slow_reader_is_intact_and_bounded(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import h2.events

    from waypoint import h2_shell, h2_upstream
    servers: list[h2_shell.H2ServerConnection] = []
    clients: list[h2_upstream.H2ClientConnection] = []
    for cls, seen in ((h2_shell.H2ServerConnection, servers),
                      (h2_upstream.H2ClientConnection, clients)):
        original = cls.__init__

        def record(self: Any, *args: Any, _orig: Any = original, _seen: Any = seen,
                   **kwargs: Any) -> None:
            _orig(self, *args, **kwargs)
            _seen.append(self)
        monkeypatch.setattr(cls, "__init__", record)

    def held() -> int:
        """Body bytes the waypoint holds in its own queues right now."""
        total = sum(s.buffered for c in servers for s in c.streams.values())
        for c in clients:
            for ex in c.exchanges.values():
                total += sum(len(e.data) for e in ex.events
                             if isinstance(e, h2.events.DataReceived))
        return total

    body = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    peak = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            c = H2Client(await connect(mesh.port), auto_ack=False)
            await c.start(nursery)
            sid = c.open("POST", "/test.Echo/Big", GRPC, authority="grpc", end=False)
            await c.flush()
            reply = c.replies[sid]

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, held())
                    await trio.sleep(0.002)

            nursery.start_soon(sample)
            await c.send(sid, frame(body), end=True)
            # A slow reader: credit at most 128 KiB per millisecond.
            acked = 0
            while not reply.ended:
                if len(reply.body) > acked:
                    step = min(len(reply.body) - acked, 128 * 1024)
                    c.h2.acknowledge_received_data(step, sid)
                    acked += step
                    await c.flush()
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    received = unframe(bytes(reply.body))
    assert len(received) == 1
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(body).digest()
    assert dict(reply.trailers)[b"grpc-status"] == b"0"
    # Each queue is bounded by one stream window (1 MiB), whatever the body size.
    assert peak <= 2 * 1024 * 1024, peak


@pytest.mark.parametrize(("method", "path", "status"), [
    ("HEAD", "/", 200), ("GET", "/?status=204", 204), ("GET", "/?status=304", 304),
    ("GET", "/?status=503", 503), ("DELETE", "/x", 200),
])
async def test_bodiless_and_error_responses_over_h2(client: H2Client, method: str, path: str,
                                                    status: int) -> None:
    reply = await client.request(method, path)
    assert reply.status == status
    assert reply.ended and reply.reset is None
    if method == "HEAD" or status in (204, 304):
        assert reply.body == b""


async def test_many_concurrent_streams_on_one_connection(client: H2Client) -> None:
    sids = [client.open("GET", f"/n/{i}") for i in range(50)]
    await client.flush()
    await client.wait(lambda: all(client.replies[s].ended for s in sids))
    import json
    paths = sorted(json.loads(bytes(client.replies[s].body))["path"] for s in sids)
    assert paths == sorted(f"/n/{i}" for i in range(50))


async def test_http1_client_to_grpc_declared_port_goes_upstream_over_h2(mesh: Mesh) -> None:
    from waypoint.h2_upstream import ProtocolTransport
    transport = mesh.waypoint.transport
    assert isinstance(transport, ProtocolTransport)
    backend_port = next(s.info.port for c in mesh.waypoint.clusters.by_name.values()
                        if c.cluster.service_name == "grpc" for s in c.endpoints.values())
    transport.h2_endpoint = lambda endpoint: endpoint.port == backend_port
    body = frame(b"over h1")
    stream = await connect(mesh.port)
    await stream.send_all(b"POST /test.Echo/Unary HTTP/1.1\r\nhost: grpc\r\n"
                          b"content-type: application/grpc\r\nte: trailers\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"\r\n\r\n") or b"grpc-status" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"echo:over h1" in data
    assert b"\r\ngrpc-status: 0\r\n" in data.lower()  # a chunked trailer
    assert any(dict(h).get(b"te") == b"trailers" for h in mesh.grpc.requests)
