"""The HTTP/1.1 shell of the API server: trio sockets, h11 framing, watch streaming.

Theory of operation: each connection reads one request at a time (keep-alive between
them) and hands it to :class:`~.handler.ApiHandler`.  Plain requests get one response.
A watch gets a chunked 200 response of JSON lines; the streaming task replays the
store's history from the watch's resourceVersion, then sleeps on its resource type's
``trio.Event`` (see :meth:`ApiServer.changed`), which is set and replaced after every write
to that type, so watchers wake exactly when there is something new for them (or a bookmark
is due) and never poll.  A second task notices the client
hanging up, so an idle watch does not outlive its connection.

Every edge has a deadline: reading a request (:data:`REQUEST_TIMEOUT`), keep-alive idleness
(:data:`IDLE_TIMEOUT`), and the watch's own ``timeoutSeconds``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h11
import trio

from common.errors import KubeApiError, ResourceExpiredError
from common.kube.resources import ResourceType
from common.logging import get_logger

from . import status
from .handler import (
    ApiHandler,
    Request,
    Response,
    WatchPlan,
    bookmark,
    error_response,
    present,
    watch_events,
)
from .store import Store

log = get_logger("apiserver")

# kube-apiserver's default request body limit is 3 MiB; objects here are far smaller.
MAX_BODY = 3 * 1024 * 1024
MAX_HEADERS = 64 * 1024
REQUEST_TIMEOUT = 30.0  # from the first byte of a request to its last
IDLE_TIMEOUT = 120.0  # keep-alive: close a connection idle this long between requests
SEND_TIMEOUT = 30.0  # a client that does not read its response in this time is dropped
DEFAULT_BOOKMARK_INTERVAL = 10.0


class ApiServer:
    """Serves one :class:`Store` over HTTP; one instance per listening server."""

    def __init__(self, store: Store, *, bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL):
        self.store = store
        self.handler = ApiHandler(store)
        self.bookmark_interval = bookmark_interval
        self._changed: dict[tuple[str, str], trio.Event] = {}

    def changed(self, rt: ResourceType) -> trio.Event:
        """The event the next write to ``rt`` sets (take it before reading the store)."""
        key = (rt.group, rt.plural)
        if key not in self._changed:
            self._changed[key] = trio.Event()
        return self._changed[key]

    def _notify(self, since: int) -> None:
        """Wake the watchers of every resource type written after version ``since``."""
        if self.store.compacted > since:  # the history of this write is partly gone already
            keys = set(self._changed)
        else:
            keys = self.store.types_written_since(since)
        for key in keys:
            event = self._changed.pop(key, None)
            if event is not None:
                event.set()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection (plain TCP, or TLS when given a trio.SSLStream)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            while True:
                request: Request | None = None
                with trio.move_on_after(IDLE_TIMEOUT):
                    request = await self._read_request(conn, stream)
                if request is None:
                    return
                before = self.store.resource_version
                result = self._dispatch(request)
                if self.store.resource_version != before:
                    self._notify(before)
                if isinstance(result, WatchPlan):
                    # Bounded by the watch's own timeout, not by the idle timeout.
                    await self._stream_watch(conn, stream, result)
                    return
                with trio.move_on_after(SEND_TIMEOUT) as scope:
                    await self._send(conn, stream, result)
                if scope.cancelled_caught:
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    def _dispatch(self, request: Request) -> Response | WatchPlan:
        try:
            result = self.handler.handle(request)
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("request_failed", method=request.method, target=request.target)
            return error_response(KubeApiError(500, "InternalError", str(exc), status.status_body(
                500, "InternalError", f"internal error: {exc}")))
        code = result.status if isinstance(result, Response) else 200
        log.debug("request", method=request.method, target=request.target, code=code)
        return result

    async def _read_request(self, conn: h11.Connection,
                            stream: trio.abc.Stream) -> Request | None:
        """The next request, or None when the client closed or broke the framing."""
        head: h11.Request | None = None
        body = bytearray()
        deadline = math.inf
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(conn, stream, exc.error_status_hint, f"bad HTTP request: {exc}")
                return None
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline) as scope:
                    data = await stream.receive_some(65536)
                if scope.cancelled_caught:
                    await self._reject(conn, stream, 408, "request not complete in time")
                    return None
                if deadline == math.inf:
                    deadline = trio.current_time() + REQUEST_TIMEOUT
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                head = event
                if conn.they_are_waiting_for_100_continue:  # curl does this for big bodies
                    await self._write(stream, conn.send(h11.InformationalResponse(
                        status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._send(conn, stream, error_response(status.too_large(MAX_BODY)))
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return Request(method=head.method.decode(), target=head.target.decode(),
                               headers={k.decode(): v.decode("latin-1") for k, v in head.headers},
                               body=bytes(body))
            else:  # ConnectionClosed, or a PAUSED state after a finished cycle
                return None

    async def _reject(self, conn: h11.Connection, stream: trio.abc.Stream, code: int,
                      message: str) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(conn, stream, error_response(KubeApiError(
                code, "BadRequest", message, status.status_body(code, "BadRequest", message))))

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream,
                    response: Response) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body)))]
        await self._write(stream, conn.send(h11.Response(status_code=response.status,
                                                         headers=headers)))
        await self._write(stream, conn.send(h11.Data(data=response.body)))
        await self._write(stream, conn.send(h11.EndOfMessage()))

    @staticmethod
    async def _write(stream: trio.abc.Stream, data: bytes | None) -> None:
        if data:
            await stream.send_all(data)

    async def _stream_watch(self, conn: h11.Connection, stream: trio.abc.Stream,
                            plan: WatchPlan) -> None:
        headers = [("content-type", "application/json"), ("transfer-encoding", "chunked")]
        await self._write(stream, conn.send(h11.Response(status_code=200, headers=headers)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_hangup, stream, nursery.cancel_scope)
            with trio.move_on_after(plan.timeout):
                await self._watch_loop(conn, stream, plan)
            nursery.cancel_scope.cancel()
        await self._write(stream, conn.send(h11.EndOfMessage()))

    async def _watch_loop(self, conn: h11.Connection, stream: trio.abc.Stream,
                          plan: WatchPlan) -> None:
        async def emit(kind: str, obj: dict[str, Any]) -> None:
            event = {"type": kind, "object": plan.render(kind, obj, self.store.resource_version)}
            line = json.dumps(event, separators=(",", ":")) + "\n"
            await self._write(stream, conn.send(h11.Data(data=line.encode())))

        if plan.resource_version is None:
            # No version: the current state as ADDED events, then changes from there.
            items, position = self.store.list_objects(plan.rt, plan.namespace)
            for obj in items:
                if plan.labels.matches(obj.get("metadata", {}).get("labels")) and \
                        plan.fields.matches(obj):
                    await emit("ADDED", present(obj, plan.rt, plan.version))
        else:
            position = plan.resource_version
        next_bookmark = trio.current_time() + self.bookmark_interval
        while True:
            # Take the wake-up event before reading, so a write in between still wakes us.
            changed = self.changed(plan.rt)
            newest = self.store.resource_version
            try:
                events = self.store.events_since(plan.rt, plan.namespace, position)
            except ResourceExpiredError as exc:
                await emit("ERROR", exc.status)
                return
            for kind, obj in watch_events(plan, events):
                await emit(kind, obj)
            position = max(position, newest)
            if plan.bookmarks and trio.current_time() >= next_bookmark:
                await emit("BOOKMARK", bookmark(plan, position))
                next_bookmark = trio.current_time() + self.bookmark_interval
            with trio.move_on_at(next_bookmark if plan.bookmarks else math.inf):
                await changed.wait()


async def _cancel_on_hangup(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client closes its side (watch clients send nothing more)."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                retain_events: int = 10_000,
                bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API from the SQLite file ``db_path`` until cancelled.

    ``port`` 0 picks a free port; the port actually bound is passed to
    ``task_status.started`` (so ``port = await nursery.start(serve, db)``).
    """
    store = Store(db_path, retain_events=retain_events)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        server = ApiServer(store, bookmark_interval=bookmark_interval)
        log.info("apiserver_listening", host=host, port=bound, db=str(db_path),
                 resource_version=store.resource_version)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle_connection, listeners)
            task_status.started(bound)
    finally:
        store.close()
