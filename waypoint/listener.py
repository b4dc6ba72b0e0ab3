"""The waypoint's inbound side: HBONE tunnels in, protocol detection, and the shells.

Theory of operation.  Each HBONE ``CONNECT`` carries one client connection, already
authenticated (the peer identity is the source workload's, presented by its
ztunnel) and addressed (``:authority`` = service VIP:port or pod IP:port).  The
waypoint terminates the tunnel (answers 200 at once: it is the tunnel's end, and
detection needs the client's first bytes) and sniffs them:

* the HTTP/2 prior-knowledge preface ``PRI * HTTP/2.0`` -> :data:`h2_handler`
  (:func:`waypoint.h2_shell.serve_h2`);
* a request line (``METHOD SP``) -> :func:`waypoint.h1_shell.serve_h1`;
* anything else, or silence for ``DETECT_TIMEOUT`` (server-first protocols) ->
  TCP pass-through to the original destination with :func:`common.relay.relay`, unless
  an authorization policy of this waypoint applies there (:meth:`Proxy.tcp_refusal`:
  HTTP rules cannot be checked on other bytes, so it fails closed).

The same detection serves plain TCP connections in bench mode.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import trio

from common.hbone import ConnectRequest, Responder
from common.logging import get_logger
from common.metrics import workload_name
from common.model import Snapshot
from common.relay import relay
from waypoint.h1_shell import H1Timeouts, serve_h1
from waypoint.h2_shell import serve_h2
from waypoint.proxy import PeerInfo, Proxy
from waypoint.upstream import STREAM_ERRORS, EndpointInfo, Transport

_log = get_logger("waypoint.listener")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: How long a client may stay silent before its connection is taken for raw TCP.
DETECT_TIMEOUT = 1.0
#: Bytes enough to tell a request line (the longest method is short) from the rest.
SNIFF_BYTES = 24
_REQUEST_LINE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20} ")
H2Handler = Callable[[trio.abc.Stream, Proxy, PeerInfo, bytes], Awaitable[None]]


#: Called with the stream, the proxy, the peer and the bytes read so far (the preface
#: and whatever followed it) for an HTTP/2 prior-knowledge connection.
h2_handler: H2Handler = serve_h2


class Detected:
    HTTP1 = "http/1.1"
    HTTP2 = "h2c"
    TCP = "tcp"


def classify(data: bytes) -> str | None:
    """The protocol of a connection from its first bytes; ``None``: need more bytes."""
    if H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        return Detected.HTTP2 if len(data) >= len(H2_PREFACE) else None
    if _REQUEST_LINE.match(data):
        return Detected.HTTP1
    if len(data) < SNIFF_BYTES and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*", data):
        return None
    return Detected.TCP


async def sniff(stream: trio.abc.Stream, timeout: float = DETECT_TIMEOUT) -> tuple[str, bytes]:  # noqa: ASYNC109
    """Read until the protocol is known (or ``timeout`` of silence: TCP)."""
    data = b""
    with trio.move_on_after(timeout):
        while True:
            more = await stream.receive_some(4096)
            if not more:
                break
            data += more
            kind = classify(data)
            if kind is not None:
                return kind, data
    return Detected.TCP, data


PassThrough = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def serve_stream(stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo,
                       passthrough: PassThrough | None, *,
                       timeouts: H1Timeouts | None = None) -> None:
    """Detect the protocol of one client connection and serve it; closes ``stream``."""
    try:
        kind, initial = await sniff(stream)
    except STREAM_ERRORS:
        await stream.aclose()
        return
    if kind == Detected.HTTP1:
        await serve_h1(stream, proxy, peer, initial, timeouts=timeouts)
        return
    try:
        if kind == Detected.HTTP2:
            await h2_handler(stream, proxy, peer, initial)
        elif passthrough is not None and peer.destination is not None and peer.port:
            refusal = proxy.tcp_refusal(peer.destination, peer.port)
            if refusal is None:
                await _tcp(stream, peer, initial, passthrough)
            else:
                _log.warning("TCP pass-through refused", reason=refusal, src=peer.source_ip,
                             dst=f"{peer.destination}:{peer.port}")
        else:
            _log.info("not HTTP and no destination to pass it to; closing", src=peer.source_ip)
    except STREAM_ERRORS as exc:
        _log.debug("connection ended", reason=str(exc), src=peer.source_ip)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _tcp(stream: trio.abc.Stream, peer: PeerInfo, initial: bytes,
               passthrough: PassThrough) -> None:
    assert peer.destination is not None and peer.port is not None
    upstream = await passthrough(peer.destination, peer.port)
    try:
        if initial:
            await upstream.send_all(initial)
        await relay(stream, upstream, label=f"{peer.destination}:{peer.port}")
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()


def snapshot_passthrough(current: Callable[[], Snapshot], transport: Transport,
                         connect_timeout: float = 10.0) -> PassThrough:
    """TCP pass-through to the original destination: a service VIP goes to one of its
    ready endpoints (HBONE when that pod is in the mesh), a pod IP to that pod."""
    async def connect(destination: str, port: int) -> trio.abc.Stream:
        snap = current()
        service = snap.services_by_vip.get(destination)
        ip, target = destination, port
        if service is not None and service.ready_endpoints:
            endpoint = service.ready_endpoints[0]
            ip = endpoint.ip
            target = endpoint.target_ports.get(port, port)
        workload = snap.workloads_by_ip.get(ip)
        info = EndpointInfo(ip, target, identity=workload.identity if workload else None,
                            hbone=workload is not None and workload.captured)
        return await transport.connect(info, connect_timeout)
    return connect


class HboneInbound:
    """The HBONE server's handler: each tunnel becomes one served client connection."""

    def __init__(self, proxy: Proxy, current: Callable[[], Snapshot],
                 passthrough: PassThrough | None, *, timeouts: H1Timeouts | None = None
                 ) -> None:
        self.proxy = proxy
        self._current = current
        self._passthrough = passthrough
        self._timeouts = timeouts

    def peer_for(self, request: ConnectRequest) -> PeerInfo:
        source_ip = "0.0.0.0"
        if request.forwarded_for:
            source_ip = request.forwarded_for.strip("[]")
            if source_ip.count(":") == 1 or "]:" in request.forwarded_for:
                source_ip = source_ip.rpartition(":")[0].strip("[]")
        elif request.peer_address is not None:
            source_ip = request.peer_address[0]
        peer = PeerInfo(source_ip=source_ip, destination=request.host, port=request.port,
                        identity=request.peer_identity, destination_ip=request.host)
        workload = self._current().workloads_by_ip.get(source_ip)
        if workload is not None:
            peer.source_workload = workload_name(workload.name, workload.labels)
            peer.source_namespace = workload.namespace
            peer.source_labels = workload.labels
        elif request.peer_identity is not None:
            peer.source_namespace = request.peer_identity.namespace
        return peer

    async def __call__(self, request: ConnectRequest, responder: Responder) -> None:
        stream = responder.accept()
        await serve_stream(stream, self.proxy, self.peer_for(request), self._passthrough,
                           timeouts=self._timeouts)
