"""The built-in echo app: the backend every local-cluster test and benchmark talks to.

Theory of operation: one trio task per connection.  The first bytes decide the protocol:
the HTTP/2 client preface (h2c with prior knowledge) goes to the h2 loop, anything else to
the HTTP/1.1 (h11) loop with keep-alive.  Both loops turn a finished request into a
:class:`EchoRequest` and ask the pure :func:`respond` what to answer, so the behaviour
(query parameters ``delay``, ``status``, ``fail``; header ``x-echo-set-header``) is the
same on both protocols and is unit-tested without sockets.  ``--tcp`` (or
``ECHO_MODE=tcp``) echoes raw bytes instead, closing each direction on its own.

Identity fields come from the environment the kubelet sets: ``POD_NAME``,
``POD_NAMESPACE``, ``SERVICE_ACCOUNT``, ``NODE_NAME`` (and ``VERSION`` when present).
h2c works with prior knowledge and with the HTTP/1.1 ``Upgrade: h2c`` dance (the
upgrading request becomes stream 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Large enough for any request head we accept in one read, small enough to keep
# thousands of idle benchmark connections cheap.
READ_SIZE = 65536
# Bound on a request head (h11's own limit is larger); protects against one huge header.
MAX_HEAD = 64 * 1024
# Longest delay a client may ask for: a typo must not pin a connection for hours.
MAX_DELAY = 300.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NO_BODY_STATUS = frozenset({204, 304})
_REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}


def parse_duration(text: str) -> float:
    """Seconds in ``200ms``, ``2s``, ``1.5s``, ``1m`` (a bare number is seconds).

    Raises ``ValueError`` for anything else, so a bad ``delay`` becomes a 400.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"bad duration {text!r}: use e.g. 200ms, 2s, 1m")
    return min(float(match.group(1)) * _UNITS[match.group(2)], MAX_DELAY)


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who this echo server is (from the pod's environment)."""

    pod: str = ""
    namespace: str = ""
    service_account: str = ""
    node: str = ""
    version: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Identity:
        e = os.environ if env is None else env
        return cls(pod=e.get("POD_NAME", ""), namespace=e.get("POD_NAMESPACE", ""),
                   service_account=e.get("SERVICE_ACCOUNT", ""), node=e.get("NODE_NAME", ""),
                   version=e.get("VERSION", ""))


@dataclass(frozen=True, kw_only=True)
class EchoRequest:
    """One received request, protocol-independent."""

    method: str
    target: str  # path with query, as sent
    host: str
    proto: str  # "HTTP/1.1", "HTTP/1.0" or "HTTP/2"
    headers: list[tuple[str, str]]
    source: str  # peer "ip:port"
    body_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class EchoResponse:
    """What to answer, after waiting ``delay`` seconds."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    delay: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def respond(req: EchoRequest, ident: Identity,
            rand: Callable[[], float] = random.random) -> EchoResponse:
    """The echo app's whole behaviour: the JSON answer to ``req``.

    ``rand`` returns a float in [0, 1) and decides ``fail=<percent>``; tests pass a fixed one.
    """
    parts = urlsplit(req.target)
    query = parse_qs(parts.query, keep_blank_values=True)
    status = 200
    delay = 0.0
    error = ""
    try:
        if "delay" in query:
            delay = parse_duration(query["delay"][-1])
        if "status" in query:
            status = int(query["status"][-1])
            if not 100 <= status <= 599:
                raise ValueError(f"status {status} out of range 100-599")
        if "fail" in query:
            percent = float(query["fail"][-1])
            if rand() * 100.0 < percent:
                status = 503
    except ValueError as exc:
        status, delay, error = 400, 0.0, str(exc)
    headers: dict[str, list[str]] = {}
    for name, value in req.headers:
        headers.setdefault(name.lower(), []).append(value)
    extra_headers: list[tuple[str, str]] = []
    for value in headers.get("x-echo-set-header", []):
        name, sep, val = value.partition(":")
        if sep and name.strip():
            extra_headers.append((name.strip().lower(), val.strip()))
    doc: dict[str, Any] = {
        "pod": ident.pod, "namespace": ident.namespace,
        "service_account": ident.service_account, "node": ident.node,
        "method": req.method, "path": parts.path or "/", "query": parts.query,
        "host": req.host, "proto": req.proto,
        "headers": {k: ",".join(v) for k, v in headers.items()},
        "source": req.source, "body_bytes": req.body_bytes, "status": status,
    }
    if ident.version:
        doc["version"] = ident.version
    if error:
        doc["error"] = error
    body = b"" if status in _NO_BODY_STATUS or status < 200 or req.method == "HEAD" else (
        json.dumps(doc, separators=(",", ":")).encode() + b"\n")
    out_headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   *extra_headers]
    if ident.pod:
        out_headers.append(("x-echo-pod", ident.pod))
    return EchoResponse(status=status, headers=out_headers, body=body, delay=delay)


def _peer(stream: trio.SocketStream) -> str:
    addr = stream.socket.getpeername()
    return f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}"


def _log(req: EchoRequest, status: int, started: float) -> None:
    ms = (time.monotonic() - started) * 1000.0
    sys.stdout.write(f"{req.source} {req.proto} {req.method} {req.target} {status} {ms:.1f}ms\n")
    sys.stdout.flush()


class Server:
    """Serves the echo app on some ports; one task per connection."""

    def __init__(self, ident: Identity, tcp_mode: bool = False) -> None:
        self.ident = ident
        self.tcp_mode = tcp_mode

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            if self.tcp_mode:
                await self._tcp(stream)
                return
            first = await self._read_preface(stream)
            if first.startswith(H2_PREFACE):
                await self._h2(stream, first)
            elif first:
                await self._h1(stream, first)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nothing to answer
        finally:
            await stream.aclose()

    async def _read_preface(self, stream: trio.SocketStream) -> bytes:
        """Read until the bytes either are or cannot be the h2 preface."""
        data = b""
        while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
            chunk = await stream.receive_some(READ_SIZE)
            if not chunk:
                return data
            data += chunk
        return data

    async def _tcp(self, stream: trio.SocketStream) -> None:
        while chunk := await stream.receive_some(READ_SIZE):
            await stream.send_all(chunk)
        await stream.send_eof()

    async def _h1(self, stream: trio.SocketStream, first: bytes) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.receive_data(first)
        source = _peer(stream)
        while True:
            started = time.monotonic()
            head: h11.Request | None = None
            body_bytes = 0
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._h1_error(stream, conn, exc.error_status_hint)
                    return
                if event is h11.NEED_DATA:
                    chunk = await stream.receive_some(READ_SIZE)
                    conn.receive_data(chunk)
                    if not chunk and head is None and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body_bytes += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert head is not None
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers]
            req = EchoRequest(
                method=head.method.decode(), target=head.target.decode("latin-1"),
                host=next((v for n, v in headers if n == "host"), ""),
                proto="HTTP/" + head.http_version.decode(), headers=headers, source=source,
                body_bytes=body_bytes)
            settings = _h2c_upgrade(headers)
            if settings is not None:  # h11 saw the Upgrade header: a 101 is allowed
                await stream.send_all(conn.send(h11.InformationalResponse(
                    status_code=101, headers=[(b"connection", b"Upgrade"),
                                              (b"upgrade", b"h2c")])) or b"")
                await _H2Session(stream, self.ident).run(conn.trailing_data[0], (settings, req))
                return
            resp = respond(req, self.ident)
            if resp.delay:
                await trio.sleep(resp.delay)
            out = [(n.encode(), v.encode("latin-1")) for n, v in resp.headers]
            data = conn.send(h11.Response(status_code=resp.status, headers=out,
                                          reason=_REASONS.get(resp.status, b"")))
            if resp.body:
                data = (data or b"") + (conn.send(h11.Data(data=resp.body)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(data)
            _log(req, resp.status, started)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _h1_error(self, stream: trio.SocketStream, conn: h11.Connection,
                        status: int) -> None:
        if conn.our_state is not h11.SEND_RESPONSE and conn.our_state is not h11.IDLE:
            return
        try:
            data = conn.send(h11.Response(status_code=status, headers=[
                (b"content-length", b"0"), (b"connection", b"close")]))
            await stream.send_all((data or b"") + (conn.send(h11.EndOfMessage()) or b""))
        except h11.LocalProtocolError:
            return

    async def _h2(self, stream: trio.SocketStream, first: bytes) -> None:
        session = _H2Session(stream, self.ident)
        await session.run(first)


def _h2c_upgrade(headers: list[tuple[str, str]]) -> str | None:
    """The HTTP2-Settings value of a request that asks to upgrade to h2c, else None."""
    fields = {n.lower(): v for n, v in headers}
    if "h2c" not in fields.get("upgrade", "").lower().replace(" ", "").split(","):
        return None
    return fields.get("http2-settings")


class _H2Session:
    """One h2c connection: events in, one task per request stream."""

    def __init__(self, stream: trio.SocketStream, ident: Identity) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.ident = ident
        self.source = _peer(stream)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        self.send_lock = trio.Lock()
        self.window_changed = trio.Event()
        self.heads: dict[int, tuple[list[tuple[str, str]], float]] = {}
        self.body_bytes: dict[int, int] = {}

    async def flush(self) -> None:
        # Taken under the lock: bytes taken outside it could be overtaken by a later
        # flush of another stream's task, and the peer would read frames out of order.
        async with self.send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def run(self, first: bytes, upgrade: tuple[str, EchoRequest] | None = None) -> None:
        """Serve the connection; ``upgrade`` is (HTTP2-Settings, request) after a 101."""
        import h2.events
        import h2.exceptions

        async with trio.open_nursery() as nursery:
            if upgrade is None:
                self.conn.initiate_connection()
            else:
                # The HTTP/1.1 request that asked for the upgrade is stream 1 (RFC 7540 3.2).
                settings, req = upgrade
                self.conn.initiate_upgrade_connection(settings.encode())
                self.body_bytes[1] = req.body_bytes
                self.heads[1] = ([(":method", req.method), (":path", req.target),
                                  (":authority", req.host), *req.headers], time.monotonic())
                nursery.start_soon(self.answer, 1)
            await self.flush()
            data = first
            while True:
                try:
                    events = self.conn.receive_data(data) if data else []
                except h2.exceptions.ProtocolError:
                    await self.flush()
                    break
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        self.heads[event.stream_id] = (
                            [(str(n), str(v)) for n, v in event.headers or []], time.monotonic())
                        self.body_bytes[event.stream_id] = 0
                    elif isinstance(event, h2.events.DataReceived):
                        sid = event.stream_id
                        self.body_bytes[sid] = self.body_bytes.get(sid, 0) + len(event.data or b"")
                        self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, h2.events.StreamEnded):
                        if event.stream_id in self.heads:
                            nursery.start_soon(self.answer, event.stream_id)
                    elif isinstance(event, h2.events.WindowUpdated):
                        self.window_changed.set()
                        self.window_changed = trio.Event()
                    elif isinstance(event, h2.events.StreamReset):
                        self.heads.pop(event.stream_id, None)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        nursery.cancel_scope.cancel()
                await self.flush()
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    break
            nursery.cancel_scope.cancel()

    async def answer(self, sid: int) -> None:
        import h2.exceptions

        headers, started = self.heads.pop(sid)
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        req = EchoRequest(
            method=pseudo.get(":method", "GET"), target=pseudo.get(":path", "/"),
            host=pseudo.get(":authority", ""), proto="HTTP/2",
            headers=[h for h in headers if not h[0].startswith(":")], source=self.source,
            body_bytes=self.body_bytes.pop(sid, 0))
        resp = respond(req, self.ident)
        if resp.delay:
            await trio.sleep(resp.delay)
        try:
            self.conn.send_headers(sid, [(":status", str(resp.status)), *resp.headers],
                                   end_stream=not resp.body)
            body = memoryview(resp.body)
            while body:
                window = min(self.conn.local_flow_control_window(sid),
                             self.conn.max_outbound_frame_size)
                if window <= 0:
                    waiter = self.window_changed
                    await self.flush()
                    await waiter.wait()
                    continue
                chunk, body = body[:window], body[window:]
                self.conn.send_data(sid, bytes(chunk), end_stream=not body)
        except h2.exceptions.StreamClosedError:
            return
        await self.flush()
        _log(req, resp.status, started)


def _ports(args: argparse.Namespace) -> list[int]:
    if args.port:
        return list(args.port)
    return [int(p) for p in os.environ.get("PORT", "8080").split(",") if p.strip()]


async def serve(ports: Sequence[int], server: Server, host: str = "0.0.0.0",
                task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every port (0 picks one) and serve until cancelled; reports bound ports."""
    listeners: list[trio.SocketListener] = []
    for port in ports:
        listeners.extend(await trio.open_tcp_listeners(port, host=host, backlog=1024))
    bound = [ln.socket.getsockname()[1] for ln in listeners]
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, server.handle, [listener])
        task_status.started(bound)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.echo",
                                     description="HTTP/1.1 + h2c (or TCP) echo server.")
    parser.add_argument("--port", type=int, action="append",
                        help="port to serve (repeatable; default $PORT or 8080)")
    parser.add_argument("--tcp", action="store_true", help="raw TCP echo instead of HTTP")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    tcp = args.tcp or os.environ.get("ECHO_MODE", "").lower() == "tcp"
    server = Server(Identity.from_env(), tcp_mode=tcp)
    ports = _ports(args)
    mode = "tcp" if tcp else "http"
    sys.stdout.write(f"echo listening on {args.host} ports {ports} mode={mode}\n")
    sys.stdout.flush()
    try:
        trio.run(serve, ports, server, args.host)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
