"""A small HTTP/1.1 server (trio + h11) for readiness, metrics and admin endpoints.

Each component gives it a table of routes; a route is a plain function from the
request to a :class:`Response`, so handlers are trivially testable.  It is meant for
operators and probes, not traffic: one request per connection (``Connection: close``),
a deadline on every connection, bounded request heads and bodies.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import structlog
import trio

from common.logging import get_logger

_log = get_logger("admin")

CONNECTION_DEADLINE = 10.0
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
           "exception": logging.ERROR}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(data, indent=2, sort_keys=True, default=str).encode(),
                   "application/json")


Route = Callable[[Request], Response | Awaitable[Response]]


class AdminServer:
    """Serves ``routes`` (keyed by path; any method unless the handler checks it)."""

    def __init__(self, routes: Mapping[str, Route], *, name: str = "admin") -> None:
        self.routes = dict(routes)
        self.name = name

    async def serve(self, listener: socket.socket, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on a bound, listening stdlib socket until cancelled."""
        listener.setblocking(False)
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        task_status.started()
        await trio.serve_listeners(self._connection, [trio_listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(CONNECTION_DEADLINE):
                try:
                    await self._one_request(stream)
                except (trio.BrokenResourceError, h11.ProtocolError) as exc:
                    _log.debug("admin connection ended", server=self.name, reason=str(exc))

    async def _one_request(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16 * 1024)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._send(stream, conn, Response.text("body too large\n", 413))
                    return
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if request is None:
            return
        target = urlsplit(request.target.decode("latin-1"))
        req = Request(request.method.decode("ascii"), target.path, parse_qs(target.query),
                      bytes(body))
        route = self.routes.get(req.path)
        if route is None:
            response = Response.text(f"no such endpoint {req.path}; try: "
                                     f"{', '.join(sorted(self.routes))}\n", 404)
        else:
            try:
                result = route(req)
                response = result if isinstance(result, Response) else await result
            except Exception as exc:
                _log.error("admin handler failed", server=self.name, path=req.path,
                           error=repr(exc))
                response = Response.text(f"internal error: {exc}\n", 500)
        await self._send(stream, conn, response)

    @staticmethod
    async def _send(stream: trio.SocketStream, conn: h11.Connection,
                    response: Response) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))), ("connection", "close"),
                   *response.headers]
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) if response.body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


class LogLevel:
    """A process-wide log level that ``/logging?level=debug`` can change at run time.

    structlog loggers cache their level filter on first use, so the level is instead
    enforced by a processor placed first in the chain, and the loggers themselves are
    configured to pass everything down to it.
    """

    def __init__(self, level: str = "info") -> None:
        self.level = self._check(level)

    @staticmethod
    def _check(level: str) -> str:
        name = level.lower()
        if name not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}: use one of {', '.join(_LEVELS)}")
        return name

    def install(self) -> None:
        """Put the filter in front of the configured processors (after configure())."""
        config = structlog.get_config()
        processors = [p for p in config["processors"] if not isinstance(p, LogLevel)]
        structlog.configure(processors=[self, *processors],
                            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                            cache_logger_on_first_use=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        if _LEVELS.get(method, logging.INFO) < _LEVELS[self.level]:
            raise structlog.DropEvent
        return event

    def route(self, request: Request) -> Response:
        """``/logging`` shows the level; ``/logging?level=debug`` (POST or GET) sets it."""
        wanted = request.arg("level")
        if wanted is not None:
            try:
                self.level = self._check(wanted)
            except ValueError as exc:
                return Response.text(f"{exc}\n", 400)
            _log.warning("log level changed", level=self.level)
        return Response.text(f"level: {self.level}\n")


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening socket (SO_REUSEADDR), for :meth:`AdminServer.serve` and the proxies.

    The backlog is the kernel's maximum (``net.core.somaxconn``), as Envoy's: with a short
    queue a burst of connections while the process is busy overflows it, and the kernel
    drops handshakes the clients already took as complete (they see resets).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
