"""HBONE server: accept mTLS connections on a listening socket, hand CONNECTs to a handler.

The handler decides each tunnel: it connects upstream first, then calls
``responder.accept()`` (the client sees 200 and gets the byte stream) or
``responder.reject(status, reason)`` (401 policy denies, 503 upstream unreachable).
Malformed requests never reach it: the server answers 400 itself.  A handler that
returns or fails without answering produces a 503.

Bad input costs only its own connection or stream: a failed handshake (plaintext,
no client certificate, another CA, another trust domain), a bad request or an HTTP/2
violation (including a rapid-reset flood) is refused and logged once with the reason,
and counted: ``on_refused`` is told one word per refusal, from the closed set
``common.metrics.HBONE_REFUSAL_REASONS`` (ztunnel passes its
``pyambient_hbone_refused_total{reason}`` counter).  A handler's own ``reject`` is the
handler's to count, not a refusal of the server's.

Graceful drain (:meth:`HboneServer.drain`): stop accepting, GOAWAY every connection,
let streams finish until the deadline, then cancel what is left.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable

import h2.errors
import h2.events
import trio

from common.errors import HandshakeError, Http2ViolationError, MeshError, ProtocolError
from common.hbone.connection import TRANSPORT_ERRORS, HboneConnection
from common.hbone.request import BadRequestError, ConnectRequest, parse_authority, parse_request
from common.hbone.stream import HboneStream
from common.identity import SpiffeId
from common.logging import get_logger
from common.relay import relay
from common.tcp import open_tcp

_log = get_logger("hbone.server")

Transport = trio.abc.HalfCloseableStream
Handshake = Callable[[socket.socket], Awaitable[tuple[Transport, SpiffeId | None]]]
OnRefused = Callable[[str], None]


class Responder:
    """Answers one CONNECT, exactly once."""

    def __init__(self, connection: HboneConnection, stream: HboneStream,
                 request: ConnectRequest) -> None:
        self._connection = connection
        self._stream = stream
        self._request = request
        self.status: int | None = None

    @property
    def answered(self) -> bool:
        return self.status is not None

    def accept(self) -> HboneStream:
        """Answer 200; the returned stream carries the tunnel's bytes."""
        self._answer(200)
        return self._stream

    def reject(self, status: int, reason: str) -> None:
        """Answer ``status`` (401, 503, ...) and end the stream; ``reason`` is logged."""
        if status == 200:
            raise ValueError("reject needs a non-200 status")
        _log.info("hbone tunnel rejected", status=status, reason=reason,
                  authority=self._request.authority,
                  peer=str(self._request.peer_identity), src=self._request.forwarded_for)
        self._answer(status)

    def _answer(self, status: int) -> None:
        if self.status is not None:
            raise RuntimeError(f"stream already answered {self.status}")
        self.status = status
        self._connection.respond(self._stream, status)


Handler = Callable[[ConnectRequest, Responder], Awaitable[None]]


def tls_handshake(context: Callable[[], ssl.SSLContext], trust_domain: str, *,
                  timeout: float = 10.0) -> Handshake:
    """The production handshake: mTLS with ``context()`` (fetched per connection, so a
    renewed certificate is used by new connections), client trust domain checked."""
    from common.tls import accept_tls

    async def handshake(sock: socket.socket) -> tuple[Transport, SpiffeId | None]:
        stream = await accept_tls(sock, context(), trust_domain=trust_domain,
                                  handshake_timeout=timeout)
        return stream, stream.peer_identity

    return handshake


class HboneServer:
    """Serves HBONE on listening sockets until drained or cancelled.

    ``HboneServer(handler, tls_handshake(lambda: store.server_context(me), td))`` is
    the production form; tests may pass any other handshake (e.g. plain TCP).
    """

    def __init__(self, handler: Handler, handshake: Handshake, *,
                 handshake_timeout: float = 10.0, idle_timeout: float = 600.0,
                 on_refused: OnRefused | None = None) -> None:
        self._handler = handler
        self._handshake = handshake
        self._on_refused = on_refused
        self._handshake_timeout = handshake_timeout
        # Clients close their own idle connections sooner (pool idle timeout); this
        # reclaims connections from clients that vanished without a FIN.
        self._idle_timeout = idle_timeout
        self.connections: set[HboneConnection] = set()
        self._accept_scopes: list[trio.CancelScope] = []
        self._nurseries: list[trio.Nursery] = []
        self._all_closed = trio.lowlevel.ParkingLot()

    async def serve(self, listener: socket.socket, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listener`` (a bound, listening stdlib socket) until drained."""
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            self._nurseries.append(nursery)
            with trio.CancelScope() as scope:
                self._accept_scopes.append(scope)
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    try:
                        sock, address = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        # EMFILE and friends: log, breathe, keep serving the others.
                        _log.warning("hbone accept failed", reason=str(exc))
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._serve_connection, sock, address)

    async def drain(self, grace: float) -> None:
        """Stop accepting, GOAWAY all connections, wait up to ``grace`` s, then cancel."""
        for scope in self._accept_scopes:
            scope.cancel()
        for connection in list(self.connections):
            connection.close()
        with trio.move_on_after(grace):
            while self.connections:
                await self._all_closed.park()
        for nursery in self._nurseries:
            nursery.cancel_scope.cancel()

    async def _serve_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        peer_address = (address[0], address[1])
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with trio.fail_after(self._handshake_timeout):
                transport, peer = await self._handshake(sock)
        except (MeshError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            from common.tls import handshake_refusal

            reason = (f"no handshake within {self._handshake_timeout:g}s"
                      if isinstance(exc, trio.TooSlowError) else str(exc))
            refusal = handshake_refusal(exc)
            level = "warning" if isinstance(exc, HandshakeError) else "info"
            getattr(_log, level)("hbone handshake refused", peer_addr=peer_address,
                                 reason=reason, refusal=refusal)
            self._refused(refusal)
            sock.close()
            return
        connection = HboneConnection(
            transport, client_side=False, peer_identity=peer, peer_address=peer_address,
            on_request=self._on_request,
            log=_log.bind(peer=str(peer) if peer else None, peer_addr=peer_address))
        self.connections.add(connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.close_when_idle, self._idle_timeout)
                await connection.run()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # One connection's failure, even a bug, must not take the listener and
            # every other connection down with it.
            connection.log.error("hbone connection failed", error=repr(exc))
        finally:
            self.connections.discard(connection)
            self._all_closed.unpark_all()
        if isinstance(connection.error, ProtocolError):
            # The reader already logged it, and the GOAWAY went out.
            self._refused(connection.error.reason
                          if isinstance(connection.error, Http2ViolationError)
                          else "protocol_error")

    def _refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def _on_request(self, connection: HboneConnection, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if connection.draining or connection.nursery is None:
            connection.protocol.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._refused("draining")
            return
        try:
            request = parse_request(stream_id, event.headers,
                                    peer_identity=connection.peer_identity,
                                    peer_address=connection.peer_address)
        except BadRequestError as exc:
            refusal = _bad_request_refusal(event.headers)
            connection.log.warning("hbone request refused", status=exc.status, reason=str(exc),
                                   refusal=refusal)
            connection.protocol.send_response(stream_id, exc.status, end_stream=True)
            self._refused(refusal)
            return
        if event.stream_ended is not None:
            connection.log.warning("hbone request refused", status=400,
                                   reason="CONNECT ended its stream with the request",
                                   refusal="bad_request")
            connection.protocol.send_response(stream_id, 400, end_stream=True)
            self._refused("bad_request")
            return
        stream = connection.accept_stream(stream_id)
        connection.nursery.start_soon(self._run_handler, connection, stream, request)

    async def _run_handler(self, connection: HboneConnection, stream: HboneStream,
                           request: ConnectRequest) -> None:
        responder = Responder(connection, stream, request)
        if stream._error is not None or stream._closed:
            # Reset before the handler even started (a rapid-reset client): connect nothing.
            await stream.aclose()
            return
        try:
            await self._handler(request, responder)
        except TRANSPORT_ERRORS as exc:
            connection.log.debug("hbone tunnel ended", reason=str(exc))
        except Exception as exc:
            connection.log.error("hbone handler failed", authority=request.authority,
                                 error=repr(exc))
        finally:
            if not responder.answered and not connection.closed:
                connection.log.warning("hbone handler did not answer", authority=request.authority)
                responder._answer(503)
            await stream.aclose()


def _bad_request_refusal(headers: list[tuple[bytes, bytes]]) -> str:
    """Which refusal a request that :func:`parse_request` refused counts as."""
    fields = dict(headers)
    if fields.get(b":method") != b"CONNECT" or b":protocol" in fields:
        return "not_connect"
    try:
        parse_authority(fields.get(b":authority", b"").decode("latin-1"))
    except BadRequestError:
        return "bad_authority"
    return "bad_request"


async def forward_tcp(request: ConnectRequest, responder: Responder, *,
                      connect_timeout: float = 5.0) -> None:
    """A handler that connects to ``:authority`` over plain TCP and relays (demo, tests)."""
    try:
        with trio.fail_after(connect_timeout):
            upstream = await open_tcp(request.host, request.port)
    except (OSError, trio.TooSlowError) as exc:
        responder.reject(503, f"upstream {request.authority} unreachable: {exc or 'timeout'}")
        return
    async with upstream:
        stream = responder.accept()
        await relay(stream, upstream, label=request.authority)
