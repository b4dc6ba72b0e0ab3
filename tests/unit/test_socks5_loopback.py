"""SOCKS5 over real sockets on 127.0.0.1: CONNECT by IPv4 and by cluster name through to a TCP
echo, early data, refusals with the right reply codes, handshake deadline, listener survival."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from common.errors import ConnectRefusedError, PolicyDeniedError
from common.relay import relay
from ztunnel.dns.resolver import DnsConfig, Resolver
from ztunnel.dns.upstream import host_socket, receive_exactly
from ztunnel.socks5 import serve_socks5
from ztunnel.socks5_proto import (
    COMMAND_NOT_SUPPORTED,
    CONNECTION_NOT_ALLOWED,
    CONNECTION_REFUSED,
    HOST_UNREACHABLE,
    SUCCEEDED,
)

from .dns_helpers import service, snapshot
from .ztunnel_helpers import workload

CLIENT = workload("app", namespace="default", ip="10.9.8.7")
DENIED_PORT = 9  # the test handler's stand-in for an AuthorizationPolicy deny


@dataclass
class Outbound:
    """A plain-TCP outbound handler recording what it was asked for."""

    calls: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)

    async def __call__(self, client: trio.abc.HalfCloseableStream, peer: tuple[str, int],
                       dst: tuple[str, int], connected: Callable[[], Awaitable[None]]) -> None:
        self.calls.append((peer, dst))
        if dst[1] == DENIED_PORT:
            raise PolicyDeniedError("denied by test policy")
        try:
            upstream = await trio.open_tcp_stream(*dst)
        except OSError as exc:
            raise ConnectRefusedError(f"connect to {dst} failed") from exc
        async with upstream:
            await connected()
            await relay(client, upstream)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


@dataclass
class Setup:
    socks: tuple[str, int]
    echo_port: int
    outbound: Outbound
    refusals: list[str]


@asynccontextmanager
async def running(handshake_timeout: float = 5.0) -> AsyncIterator[Setup]:
    async with trio.open_nursery() as nursery:
        (echo_listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0,
                                                       host="127.0.0.1"))
        echo_port = echo_listener.socket.getsockname()[1]
        snap = snapshot([service("echo", "default", ["127.0.0.1"])])
        resolver = Resolver(lambda: snap, DnsConfig(upstreams=(("127.0.0.1", 1),),
                                                    query_timeout=0.2, attempts=1))

        async def resolve(host: str) -> tuple[str, ...]:
            return await resolver.addresses(host, "default", host_socket)

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        outbound = Outbound()
        refusals: list[str] = []
        with listener:
            await nursery.start(lambda task_status: serve_socks5(
                listener, outbound, CLIENT, resolve=resolve, on_refused=refusals.append,
                handshake_timeout=handshake_timeout, task_status=task_status))
            yield Setup(listener.getsockname(), echo_port, outbound, refusals)
            nursery.cancel_scope.cancel()


async def socks_connect(setup: Setup, request: bytes, *, early: bytes = b""
                        ) -> tuple[trio.SocketStream, int]:
    stream = await trio.open_tcp_stream(*setup.socks)
    await stream.send_all(b"\x05\x01\x00")
    assert await receive_exactly(stream, 2) == b"\x05\x00"
    await stream.send_all(request + early)
    head = await receive_exactly(stream, 4)
    assert head[0] == 5
    await receive_exactly(stream, 4 + 2 if head[3] == 1 else 16 + 2)
    return stream, head[1]


def ipv4_request(port: int, ip: str = "127.0.0.1", cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, 1)) + socket.inet_aton(ip) + struct.pack("!H", port)


def domain_request(name: str, port: int) -> bytes:
    return bytes((5, 1, 0, 3, len(name))) + name.encode() + struct.pack("!H", port)


async def test_connect_by_ipv4_relays_to_the_echo_both_ways_with_half_close() -> None:
    async with running() as setup:
        with trio.fail_after(10):
            stream, code = await socks_connect(setup, ipv4_request(setup.echo_port),
                                               early=b"early ")
            assert code == SUCCEEDED
            async with stream:
                payload = b"x" * 300_000
                await stream.send_all(payload)
                await stream.send_eof()
                got = bytearray()
                while chunk := await stream.receive_some(65536):
                    got += chunk
            assert bytes(got) == b"early " + payload
        # The application is reported by the pod's address, not the loopback.
        assert setup.outbound.calls[0][0][0] == "10.9.8.7"
        assert setup.outbound.calls[0][1] == ("127.0.0.1", setup.echo_port)


async def test_connect_by_cluster_service_name() -> None:
    async with running() as setup:
        with trio.fail_after(10):
            for name in ("echo", "echo.default.svc.cluster.local"):
                stream, code = await socks_connect(setup,
                                                   domain_request(name, setup.echo_port))
                async with stream:
                    assert code == SUCCEEDED
                    await stream.send_all(b"ping")
                    assert await receive_exactly(stream, 4) == b"ping"


async def test_failures_get_their_reply_codes_and_the_listener_keeps_serving() -> None:
    async with running() as setup:
        with trio.fail_after(10):
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            closed.close()  # nothing listens there now
            cases = [
                (ipv4_request(port), CONNECTION_REFUSED),
                (ipv4_request(DENIED_PORT), CONNECTION_NOT_ALLOWED),
                (domain_request("nope.nosuchns.svc.cluster.local", 80), HOST_UNREACHABLE),
                (ipv4_request(setup.echo_port, cmd=2), COMMAND_NOT_SUPPORTED),
                (ipv4_request(setup.echo_port, cmd=3), COMMAND_NOT_SUPPORTED),
            ]
            for request, expected in cases:
                stream, code = await socks_connect(setup, request)
                async with stream:
                    assert code == expected
                    assert await stream.receive_some(10) == b""  # then closed
            stream, code = await socks_connect(setup, ipv4_request(setup.echo_port))
            async with stream:
                assert code == SUCCEEDED
        assert setup.refusals == ["name_resolution", "socks5_protocol", "socks5_protocol"]


async def test_no_acceptable_auth_method() -> None:
    async with running() as setup:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(*setup.socks)
            async with stream:
                await stream.send_all(b"\x05\x01\x02")  # username/password only
                assert await receive_exactly(stream, 2) == b"\x05\xff"
                assert await stream.receive_some(10) == b""


async def test_a_silent_client_is_dropped_at_the_handshake_deadline() -> None:
    async with running(handshake_timeout=0.3) as setup:
        stream = await trio.open_tcp_stream(*setup.socks)
        async with stream:
            with trio.fail_after(5):
                await stream.send_all(b"\x05\x01")  # half a greeting, then nothing
                assert await stream.receive_some(10) == b""
        assert setup.refusals == ["socks5_timeout"]
