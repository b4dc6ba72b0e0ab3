"""In-memory waypoint for pipeline tests: fake backends behind a memory Transport, a client
speaking HTTP/1.1 over a memory stream to the real HTTP/1.1 shell.  No sockets."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from common.errors import ConnectRefusedError
from waypoint.app import Options, Waypoint, bench_config_from
from waypoint.h1_shell import H1Connection
from waypoint.http import (
    NEED_DATA,
    Data,
    EndOfMessage,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    ResponseWriter,
)
from waypoint.proxy import PeerInfo
from waypoint.upstream import EndpointInfo


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Seen:
    head: RequestHead
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.head.headers:
            if n == name.encode():
                return v.decode()
        return None


class FakeBackend:
    """An HTTP/1.1 server on memory streams; ``answer`` decides each response."""

    def __init__(self, name: str, answer: Callable[[Seen], Answer] | None = None) -> None:
        self.name = name
        self.answer = answer or (lambda seen: Answer())
        self.seen: list[Seen] = []
        self.refuse = False
        self.connections = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        parser = RequestParser()
        writer = ResponseWriter()
        head: RequestHead | None = None
        body = b""
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    parser.feed(data)
                    continue
                if isinstance(event, RequestHead):
                    head, body = event, b""
                elif isinstance(event, Data):
                    body += bytes(event.data)
                elif isinstance(event, EndOfMessage):
                    assert head is not None
                    seen = Seen(head, body)
                    self.seen.append(seen)
                    answer = self.answer(seen)
                    if answer.delay:
                        await trio.sleep(answer.delay)
                    headers = [(b"content-length", b"%d" % len(answer.body)),
                               (b"x-backend", self.name.encode()), *answer.headers]
                    out = writer.head(ResponseHead(status=answer.status, headers=headers),
                                      head.method)
                    body_out = b"".join(writer.data(answer.body)) if answer.body else b""
                    await stream.send_all(out + body_out + writer.end())
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


class MemoryTransport:
    """Connects to :class:`FakeBackend` s by address, serving them in ``nursery``."""

    def __init__(self, nursery: trio.Nursery, backends: Mapping[str, FakeBackend]) -> None:
        self.nursery = nursery
        self.backends = dict(backends)

    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        backend = self.backends.get(f"{endpoint.ip}:{endpoint.port}")
        await trio.lowlevel.checkpoint()
        if backend is None or backend.refuse:
            raise ConnectRefusedError(f"{endpoint.ip}:{endpoint.port} refused")
        backend.connections += 1
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(backend.serve, server)
        return client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One keep-alive downstream connection into the waypoint's HTTP/1.1 shell."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = ResponseParser()

    async def request(self, path: str = "/", *, method: str = "GET", host: str = "echo",
                      headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Reply:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        lines = [f"{method} {path} HTTP/1.1"]
        if not any(k.lower() == "host" for k, _ in pairs):
            lines.append(f"host: {host}")
        lines += [f"{k}: {v}" for k, v in pairs]
        if body:
            lines.append(f"content-length: {len(body)}")
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.parser.expect_response(method.encode())
        status = 0
        got: dict[str, str] = {}
        data = b""
        while True:
            event = self.parser.next_event()
            if event is NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                if chunk:
                    self.parser.feed(chunk)
                else:
                    self.parser.feed_eof()
                continue
            if isinstance(event, ResponseHead):
                if event.status < 200:
                    continue
                status = event.status
                got = {}
                for n, v in event.headers:  # repeated lines read as one joined field
                    name = n.decode()
                    got[name] = f"{got[name]},{v.decode()}" if name in got else v.decode()
            elif isinstance(event, Data):
                data += bytes(event.data)
            elif isinstance(event, EndOfMessage):
                return Reply(status, got, data)
            else:
                raise AssertionError(f"unexpected {event!r}")


def service(name: str, *addresses: str, labels: Mapping[str, str] | None = None,
            vip: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "ports": [80],
                           "endpoints": [{"address": a, "labels": dict(labels or {})}
                                         for a in addresses]}
    if vip:
        doc["vips"] = [vip]
    return doc


class Harness:
    """A waypoint (bench config) with fake backends, inside one nursery."""

    def __init__(self, nursery: trio.Nursery, doc: Mapping[str, Any],
                 backends: Mapping[str, FakeBackend], seed: int = 1) -> None:
        self.nursery = nursery
        self.transport = MemoryTransport(nursery, backends)
        self.waypoint = Waypoint(Options(name="waypoint", namespace="default",
                                         access_log=False),
                                 transport=self.transport, rng=random.Random(seed))
        self.config = bench_config_from({"namespace": "default", **doc})
        from waypoint.mirror import Mirrorer
        self.waypoint.proxy.mirror = Mirrorer(nursery)

    async def start(self) -> Harness:
        await self.waypoint.apply_bench(self.config)
        return self

    def client(self, peer: PeerInfo | None = None) -> Client:
        client_end, server_end = trio.testing.memory_stream_pair()
        conn = H1Connection(server_end, self.waypoint.proxy,
                            peer or PeerInfo(source_ip="10.0.0.9"))
        self.nursery.start_soon(conn.run)
        return Client(client_end)
