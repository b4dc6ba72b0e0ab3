"""SOCKS5 outbound (127.0.0.1:15080 inside each enrolled pod), for hosts where capture is not
possible: the application names its destination instead of nftables redirecting it.

Theory of operation.  :func:`serve_socks5` accepts on a listener inside the pod, runs the
sans-I/O handshake (:mod:`ztunnel.socks5_proto`) under a deadline, resolves a domain name
with the DNS proxy's resolver (cluster names from the snapshot first, then upstream), and
hands the connection to an :class:`OutboundHandler`: the same outbound path a captured
connection to that address takes.  The success reply goes out only once the handler has
its upstream connection (it calls ``connected``); a failure before that is answered with
the matching RFC 1928 code (:func:`reply_code`) and the connection closed.

:func:`pod_outbound` is the handler for an enrolled pod: ``decide_outbound``, then HBONE
through the pod's pool or plain TCP from the pod's namespace, with Istio's TCP metrics and
one access-log line, as for a connection captured on 15001.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio
from structlog.typing import FilteringBoundLogger

from common.errors import (
    ConnectRefusedError,
    ConnectTimeoutError,
    MeshError,
    NameResolutionError,
    PolicyDeniedError,
    Socks5Error,
    TunnelRejectedError,
    UpstreamError,
)
from common.logging import get_logger
from common.model import Workload
from common.relay import relay
from ztunnel.decide import format_authority
from ztunnel.dns.server import pod_socket_factory
from ztunnel.proxy.dial import accept
from ztunnel.proxy.outbound import open_upstream
from ztunnel.socks5_proto import (
    CONNECTION_NOT_ALLOWED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    MAX_REQUEST,
    NETWORK_UNREACHABLE,
    SUCCEEDED,
    ServerHandshake,
    reply,
)

if TYPE_CHECKING:
    from ztunnel.dns.resolver import Resolver
    from ztunnel.proxy.pod import EnrolledPod, PodHook
    from ztunnel.proxy.state import ProxyState

__all__ = ["SOCKS5_PORT", "OutboundHandler", "Resolve", "pod_outbound", "reply_code",
           "serve_socks5", "socks5_pod_hook"]

_log = get_logger("ztunnel.socks5")

SOCKS5_PORT = 15080
HANDSHAKE_TIMEOUT = 10.0   # greeting + request + name resolution
MAX_CONNECTIONS = 1024     # per pod; more are closed at once


class OutboundHandler(Protocol):
    """Carries one SOCKS5 client to ``dst`` the way a captured connection would go.

    It must connect first and raise (an :class:`~common.errors.UpstreamError` or
    :class:`~common.errors.PolicyDeniedError`, never touching ``client``) when it cannot;
    once connected it awaits ``connected()`` (which sends the success reply) and then
    relays both ways until both directions ended.  The caller closes ``client``.
    ``peer`` is the application's address as ztunnel should report it.
    """

    async def __call__(self, client: trio.abc.HalfCloseableStream, peer: tuple[str, int],
                       dst: tuple[str, int], connected: Callable[[], Awaitable[None]]
                       ) -> None: ...


Resolve = Callable[[str], Awaitable[tuple[str, ...]]]
"""A host name to its addresses (IPv4 first); raises NameResolutionError."""


def reply_code(exc: BaseException) -> int:
    """The RFC 1928 reply for a failure to reach the destination."""
    if isinstance(exc, PolicyDeniedError):
        return CONNECTION_NOT_ALLOWED
    if isinstance(exc, TunnelRejectedError):
        if exc.status in (401, 403):
            return CONNECTION_NOT_ALLOWED
        return CONNECTION_REFUSED if exc.status == 503 else GENERAL_FAILURE
    if isinstance(exc, ConnectRefusedError):
        cause = exc.__cause__
        code = cause.errno if isinstance(cause, OSError) else None
        if code == errno.ENETUNREACH:
            return NETWORK_UNREACHABLE
        if code == errno.EHOSTUNREACH:
            return HOST_UNREACHABLE
        return CONNECTION_REFUSED
    if isinstance(exc, ConnectTimeoutError | NameResolutionError | UpstreamError):
        return HOST_UNREACHABLE
    return GENERAL_FAILURE


class _Prefixed(trio.abc.HalfCloseableStream):
    """``stream`` with bytes the handshake already read put back in front."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.prefix:
            size = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = bytes(self.prefix[:size]), self.prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def serve_socks5(listen_sock: socket.socket, outbound: OutboundHandler,
                       client: Workload, *, resolve: Resolve,
                       handshake_timeout: float = HANDSHAKE_TIMEOUT,
                       max_connections: int = MAX_CONNECTIONS,
                       on_refused: Callable[[str], None] | None = None,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
    """Serve SOCKS5 CONNECT on ``listen_sock`` (a listening socket) until cancelled.

    ``on_refused`` is told a short reason word for each refused connection (a metric).
    The caller owns and closes ``listen_sock``.
    """
    server = _Socks5Server(outbound, client, resolve, handshake_timeout, on_refused)
    slots = trio.Semaphore(max_connections)

    async def serve_one(conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            await server.serve(conn, peer)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn, peer = await accept(listen_sock)
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                server.refused("overloaded")
                conn.close()
                continue
            nursery.start_soon(serve_one, conn, peer)


class _Socks5Server:
    def __init__(self, outbound: OutboundHandler, client: Workload, resolve: Resolve,
                 handshake_timeout: float, on_refused: Callable[[str], None] | None) -> None:
        self.outbound = outbound
        self.resolve = resolve
        self.timeout = handshake_timeout
        self.on_refused = on_refused
        # The application connects over the pod's loopback; ztunnel reports it by the
        # pod's address, as for a captured connection.
        self.report_ip = client.ip
        self.log: FilteringBoundLogger = _log.bind(pod=f"{client.namespace}/{client.name}")

    def refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    async def serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            async with stream:
                await self._serve(stream, (self.report_ip or peer[0], peer[1]))
        except Exception as exc:
            # A bug or an unforeseen OS error costs this connection only, never the
            # listener.
            self.log.error("socks5 connection failed", src=peer, error=repr(exc),
                           exc_info=exc)

    async def _farewell(self, stream: trio.SocketStream, data: bytes) -> None:
        """Send a last reply if the client still listens; never blocks past the deadline."""
        if not data:
            return
        with trio.move_on_after(self.timeout), \
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)

    async def _handshake(self, stream: trio.SocketStream, hs: ServerHandshake
                         ) -> tuple[str, int] | None:
        """The destination address, or None when the client left before asking."""
        with trio.fail_after(self.timeout):
            while hs.request is None:
                data = await stream.receive_some(MAX_REQUEST)
                if not data:
                    return None
                out = hs.receive_data(data)
                if out:
                    await stream.send_all(out)
            request = hs.request
            if not request.is_domain:
                return (request.host, request.port)
            addresses = await self.resolve(request.host)
            return (addresses[0], request.port)

    async def _serve(self, stream: trio.SocketStream, peer: tuple[str, int]) -> None:
        src = format_authority(*peer)
        hs = ServerHandshake()
        try:
            dst = await self._handshake(stream, hs)
        except Socks5Error as exc:
            self.refused("socks5_protocol")
            self.log.info("socks5 refused", src=src, reason=str(exc))
            await self._farewell(stream, hs.error_response)
            return
        except NameResolutionError as exc:
            self.refused("name_resolution")
            self.log.info("socks5 refused", src=src, reason=str(exc))
            await self._farewell(stream, reply(HOST_UNREACHABLE))
            return
        except trio.TooSlowError:
            self.refused("socks5_timeout")
            self.log.info("socks5 handshake timed out", src=src, seconds=self.timeout)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if dst is None:
            return

        replied = False

        async def connected() -> None:
            nonlocal replied
            replied = True
            await stream.send_all(reply(SUCCEEDED))

        client: trio.abc.HalfCloseableStream = _Prefixed(stream, hs.leftover) \
            if hs.leftover else stream
        try:
            await self.outbound(client, peer, dst, connected)
        except (MeshError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if replied:  # the client left while we replied: nothing more to tell it
                self.log.debug("socks5 client gone", src=src, error=str(exc))
                return
            self.log.info("socks5 connect failed", src=src, dst=format_authority(*dst),
                          reason=str(exc))
            await self._farewell(stream, reply(reply_code(exc)))


# -- the enrolled pod's outbound path -------------------------------------------------------


def pod_outbound(pod: EnrolledPod) -> OutboundHandler:
    """The outbound handler of an enrolled pod (decision, HBONE or passthrough, metrics)."""

    async def handle(client: trio.abc.HalfCloseableStream, peer: tuple[str, int],
                     dst: tuple[str, int], connected: Callable[[], Awaitable[None]]) -> None:
        snapshot = pod.state.snapshot()
        source = pod.current(snapshot)
        src = format_authority(*peer)
        dst_text = format_authority(*dst)
        upstream, observed = await open_upstream(pod, snapshot, source, src, dst, "socks5")
        sent = received = 0
        outcome = "cancelled"
        async with upstream:
            await connected()
            observed.opened()
            try:
                sent, received = await relay(client, upstream, label=dst_text)
                outcome = "closed"
            finally:
                observed.finished(sent, received, outcome)

    return handle


def socks5_pod_hook(resolver_for: Callable[[ProxyState], Resolver], *,
                    port: int = SOCKS5_PORT) -> PodHook:
    """The per-pod hook: SOCKS5 on 127.0.0.1:``port`` in the pod, names via the DNS proxy."""
    async def hook(pod: EnrolledPod) -> None:
        try:
            listener = pod.netns.listen("127.0.0.1", port)
        except MeshError as exc:
            pod.log.error("SOCKS5 listener not started", port=port, error=str(exc))
            return
        try:
            client = pod.current()
            resolver = resolver_for(pod.state)
            resolve = partial(resolver.addresses, client_namespace=client.namespace,
                              open_socket=pod_socket_factory(pod))
            pod.listen_ports["socks5"] = listener.getsockname()[1]
            await serve_socks5(listener, pod_outbound(pod), client, resolve=resolve,
                               on_refused=partial(pod.state.metrics.refusal, "socks5"))
        except Exception as exc:
            # Stops this pod's SOCKS5 listener only, never the pod's proxy listeners.
            pod.log.error("SOCKS5 listener failed", error=repr(exc), exc_info=exc)
        finally:
            pod.listen_ports.pop("socks5", None)
            listener.close()

    return hook
