"""The downstream HTTP/1.1 connection loop: requests in, one at a time, to the pipeline.

Theory of operation.  :class:`H1Connection` owns one client byte stream (an HBONE
tunnel, or TCP in bench mode).  It parses a request head with the sans-I/O
:class:`~waypoint.http.RequestParser`, hands it to :meth:`Proxy.handle
<waypoint.proxy.Proxy.handle>` and serves as that request's
:class:`~waypoint.proxy.Downstream`: the body is read on demand (``100 Continue``
is sent the first time the pipeline asks for a body the client is holding back),
the response is queued and written in as few sends as possible.  Requests are
answered strictly in order; bytes of a pipelined next request stay in the parser
until the current response is complete.

Deadlines, all on one cancel scope moved forward as the connection progresses:
``idle`` between requests, ``header`` from a head's first byte to its end when the
head arrives in pieces (slowloris), and at least ``stream_idle`` for each request in
progress.  The scope is moved lazily (only when less than half of ``idle`` is left),
so a busy keep-alive connection touches it about once per ``idle / 2``.  Bad
input is answered with the parser's status hint (400, 413, 414, 431, 501, 505) and
``Connection: close``.  A request whose body the pipeline did not read (a local
answer) has a small remaining body drained; otherwise the connection closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from common.errors import Http1Error
from common.logging import get_logger
from common.tcp import TcpStream
from waypoint.http import (
    DEFAULT_LIMITS,
    NEED_DATA,
    Data,
    EndOfMessage,
    H1Limits,
    Headers,
    RequestHead,
    RequestParser,
    ResponseWriter,
    reason_phrase,
)
from waypoint.proxy import PeerInfo, Proxy, ResponseAbortedError
from waypoint.upstream import STREAM_ERRORS

_log = get_logger("waypoint.h1")

READ_SIZE = 64 * 1024
#: Unread request body the shell drains after a local answer to keep the connection.
DRAIN_LIMIT = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True, kw_only=True)
class H1Timeouts:
    """Downstream deadlines in seconds (Envoy: idle 1 h, stream idle 5 min; headers
    bounded here against slowloris, Envoy leaves that off by default)."""

    idle: float = 3600.0
    header: float = 30.0
    stream_idle: float = 300.0


class H1Connection:
    """One downstream HTTP/1.1 connection; also the current request's Downstream."""

    def __init__(self, stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo, *,
                 limits: H1Limits = DEFAULT_LIMITS, timeouts: H1Timeouts | None = None) -> None:
        self.stream = stream
        self.proxy = proxy
        self.peer = peer
        self.parser = RequestParser(limits)
        self.writer = ResponseWriter()
        self.timeouts = timeouts or H1Timeouts()
        self.requests = 0
        self._out: list[bytes | memoryview] = []
        self._head: RequestHead | None = None
        self._body_done = True
        self._continue_sent = False
        self._started = False
        self._ended = False
        self._close_after = False
        self._scope = trio.CancelScope()
        # Responses may be left to the proxy's SendBatcher (plain TCP clients only);
        # True while one may still be waiting there, so own sends drain it first.
        self._batchable = type(stream) is TcpStream
        self._deferred = False

    # --- Downstream ------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._started

    async def receive_body(self) -> bytes | memoryview | None:
        if self._body_done:
            return None
        head = self._head
        assert head is not None
        if head.expect_continue and not self._continue_sent and not self._started:
            self._continue_sent = True
            await self._send(_CONTINUE)
        parser = self.parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                await self._fill()
                continue
            if isinstance(event, Data):
                return event.data
            if isinstance(event, EndOfMessage):
                self._body_done = True
                return None
            raise Http1Error(f"unexpected {event!r} inside a request body", 400)

    def start_response(self, status: int, headers: Headers, reason: bytes = b"") -> None:
        head = self._head
        assert head is not None
        self._started = True
        method = head.method
        framed = False
        for name, _ in headers:
            if name == b"content-length" or name == b"transfer-encoding":
                framed = True
                break
        if (not framed and status >= 200 and status not in _NO_BODY_STATUS
                and method != b"HEAD" and head.version == b"1.1"):
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        if not self._body_done and ((head.expect_continue and not self._continue_sent)
                                    or head.chunked
                                    or (head.content_length or 0) > DRAIN_LIMIT):
            # The client is still sending (or holding back) a body we will not read.
            self._close_after = True
        if self._close_after or not head.keep_alive:
            headers = [*headers, (b"connection", b"close")]
        self._out.append(self.writer.status_head(status, reason or reason_phrase(status),
                                                 headers, method))

    def write_data(self, data: bytes | memoryview) -> None:
        self._out.extend(self.writer.data(data))

    def write_end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self._out.append(self.writer.end(trailers))
        self._ended = True

    async def flush(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            head = self._head
            if (self._ended and self._batchable and not self._close_after
                    and not self.writer.must_close and head is not None and head.keep_alive):
                # A whole response on a connection that stays open: the next step is
                # the wait for the next request, so it can go with this pass's others.
                assert isinstance(self.stream, TcpStream)
                self.proxy.sends.defer(self.stream, bytes(data))
                self._deferred = True
                return
            await self._send(data)

    async def _send(self, data: bytes | memoryview) -> None:
        """Send now, after any response still waiting in the proxy's SendBatcher."""
        await self._settle()
        await self.stream.send_all(data)

    async def _settle(self) -> None:
        """Send a response still waiting in the proxy's SendBatcher now, in this task."""
        if self._deferred:
            self._deferred = False
            assert isinstance(self.stream, TcpStream)
            await self.proxy.sends.drain(self.stream)

    def release_deferred(self) -> None:
        """Before the stream is closed: hand a deferred response to the kernel if it
        takes it now, never waiting (see :meth:`SendBatcher.release`)."""
        if self._deferred:
            self._deferred = False
            assert isinstance(self.stream, TcpStream)
            self.proxy.sends.release(self.stream)

    # --- the connection loop ---------------------------------------------------------

    async def _fill(self) -> None:
        data = await self.stream.receive_some(READ_SIZE)
        if data:
            self.parser.feed(data)
        else:
            self.parser.feed_eof()

    async def run(self, initial: bytes = b"") -> None:
        """Serve requests until the client closes, a deadline passes or an error ends it.
        The caller owns (and closes) the stream."""
        if initial:
            self.parser.feed(initial)
        try:
            with self._scope:
                await self._loop()
                await self._settle()  # the last response leaves before the caller closes
            if self._scope.cancelled_caught:
                await self._on_timeout()
        except Http1Error as exc:
            await self._on_bad_request(exc)
        except ResponseAbortedError as exc:
            _log.debug("response aborted; closing the client connection", reason=str(exc))
        except STREAM_ERRORS as exc:
            _log.debug("client connection ended", reason=str(exc), src=self.peer.source_ip)
        except Exception:
            _log.exception("request failed; closing the client connection",
                           src=self.peer.source_ip)
            if not self._started:
                await self._error_response(500, b"internal error")

    async def _loop(self) -> None:
        parser = self.parser
        scope = self._scope
        timeouts = self.timeouts
        proxy = self.proxy
        peer = self.peer
        # The run's clock, bound once: read about three times per request.
        clock = trio.lowlevel.current_clock().current_time
        now = clock()
        scope.deadline = now + (timeouts.header if parser.buffered else timeouts.idle)
        bounded_head = bool(parser.buffered)
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                if parser.buffered and not bounded_head:
                    # A head arrived in pieces: it must complete within the header timeout.
                    bounded_head = True
                    scope.deadline = min(scope.deadline,
                                         clock() + timeouts.header)
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    parser.feed_eof()
                    continue
                parser.feed(data)
                continue
            if not isinstance(event, RequestHead):
                return  # ConnectionClosed, or PAUSED (must close / switched protocols)
            self.requests += 1
            self._head = event
            # Even a body-less request ends with an EndOfMessage event: read through it.
            self._body_done = False
            self._continue_sent = False
            self._started = False
            self._ended = False
            # Deadlines move lazily: setting one costs more than the rest of a small
            # request's bookkeeping, so the scope is only touched when the deadline is
            # about to be too close (or was tightened for a partial head).
            now = clock()
            if bounded_head or scope.deadline - now < timeouts.stream_idle:
                scope.deadline = now + max(timeouts.stream_idle, timeouts.idle / 2)
                bounded_head = False
            await proxy.handle(event, self, peer)
            if self._out:  # usually sent already, with the response's end
                await self.flush()
            if not self._body_done:
                if not event.has_body and isinstance(parser.next_event(), EndOfMessage):
                    self._body_done = True  # the usual case, without a trip through _drain
                elif not self._close_after:
                    await self._drain()
            if self._close_after or self.writer.must_close or not event.keep_alive:
                return
            self._head = None
            self._started = False  # so a bad next request still gets its error answer
            if parser.buffered:  # a pipelined request is partly here already
                bounded_head = True
                scope.deadline = clock() + timeouts.header
            elif scope.deadline - clock() < timeouts.idle / 2:
                scope.deadline = clock() + timeouts.idle

    async def _drain(self) -> None:
        drained = 0
        while (piece := await self.receive_body()) is not None:
            drained += len(piece)
            if drained > DRAIN_LIMIT:
                self._close_after = True
                return

    async def _on_timeout(self) -> None:
        if self._head is None and self.parser.buffered:
            await self._error_response(408, b"request header timeout")

    async def _on_bad_request(self, exc: Http1Error) -> None:
        _log.info("bad request from client", status=exc.status, reason=str(exc),
                  src=self.peer.source_ip)
        if not self._started:
            await self._error_response(exc.status, str(exc).encode("latin-1", "replace"))

    async def _error_response(self, status: int, body: bytes) -> None:
        text = body + b"\n"
        data = (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, reason_phrase(status), len(text), text))
        with trio.move_on_after(1.0):
            with contextlib.suppress(*STREAM_ERRORS):
                await self._send(data)


async def serve_h1(stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo, initial: bytes = b"",
                   *, timeouts: H1Timeouts | None = None) -> None:
    """Serve one downstream HTTP/1.1 connection and close it."""
    conn = H1Connection(stream, proxy, peer, timeouts=timeouts)
    try:
        await conn.run(initial)
    finally:
        conn.release_deferred()
        with trio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
            await stream.aclose()
