"""The waypoint's inbound side: HBONE tunnels in, protocol detection, and the shells.

Theory of operation.  Each HBONE ``CONNECT`` carries one client connection, already
authenticated (the peer identity is the source workload's, presented by its
ztunnel) and addressed (``:authority`` = service VIP:port or pod IP:port).  The
waypoint terminates the tunnel (answers 200 at once: it is the tunnel's end, and
detection needs the client's first bytes).  What happens next follows the service
port's declared protocol (:func:`declared_protocol`, Istio's port name / appProtocol
rules), as in Istio's waypoint:

* declared TCP (``tcp``, ``tls``, ``https``, ``mysql``, ``mongo``, ``redis``, or an
  undeclared well-known server-first port) -> TCP pass-through at once, without
  waiting for the client to speak, so server-first protocols work;
* declared HTTP (``http``, ``http2``, ``grpc``, ``grpc-web``) -> HTTP with no
  detection deadline of its own: the HTTP/2 preface picks :data:`h2_handler`, anything
  else goes to :func:`waypoint.h1_shell.serve_h1` (which answers 400 to non-HTTP);
  silence is bounded by the HTTP idle timeout, a started head by the header timeout;
* undeclared (and pod-IP destinations) -> the first bytes are sniffed for up to
  :data:`DETECT_TIMEOUT`: the HTTP/2 prior-knowledge preface -> :data:`h2_handler`
  (:func:`waypoint.h2_shell.serve_h2`), a request line (``METHOD SP``) -> HTTP/1.1,
  other bytes -> TCP pass-through; no verdict within the timeout (silence, or a
  fragment) -> the connection is closed, as Envoy closes it when its listener filters
  time out.

TCP pass-through goes to the original destination with :func:`common.relay.relay`,
unless an authorization policy of this waypoint applies there
(:meth:`Proxy.tcp_refusal`: HTTP rules cannot be checked on other bytes, so it fails
closed).  The same detection serves plain TCP connections in bench mode (undeclared).
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
#: How long a client of an undeclared port has to make its protocol known.  Istio's
#: waypoint leaves Envoy's listener-filter timeout at its default, 15 s, and closes the
#: connection when it fires; a shorter window cut slow but genuine HTTP clients under
#: load (a 1 s window closed 104 of 2,000 connections in tests/reliability/test_load.py).
DETECT_TIMEOUT = 15.0
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


class Declared:
    """A service port's protocol as declared (``None`` where it is not: sniffed)."""

    HTTP = "http"
    TCP = "tcp"


# Istio's protocol names (pkg/config/protocol), by what the waypoint does with them.
_HTTP_PROTOCOLS = frozenset({"http", "http2", "http_proxy", "grpc", "grpc-web"})
_TCP_PROTOCOLS = frozenset({"tcp", "tls", "https", "mysql", "mongo", "redis"})
# Kubernetes' standard appProtocol names (KEP-3726).
_K8S_APP_PROTOCOLS = {"kubernetes.io/h2c": Declared.HTTP, "kubernetes.io/ws": Declared.HTTP,
                      "kubernetes.io/wss": Declared.TCP}
#: Server-first or otherwise sniff-hostile ports Istio treats as TCP when undeclared
#: (SMTP, DNS, MySQL, MongoDB: "protocol selection" in Istio's operations guide).
WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})


def declared_protocol(port: int, name: str | None, app_protocol: str | None,
                      transport: str = "TCP") -> str | None:
    """What a Service port declares, the way Istio reads it.

    ``appProtocol`` wins over the port name; a name declares ``<protocol>[-<suffix>]``
    (``grpc-web`` whole).  Anything else is undeclared (``None``: detect by sniffing),
    except the well-known server-first ports, which are TCP.
    """
    if transport.upper() != "TCP":
        return None  # UDP and SCTP never reach the waypoint
    word = (app_protocol if app_protocol is not None else name or "").lower()
    if word in _K8S_APP_PROTOCOLS:
        return _K8S_APP_PROTOCOLS[word]
    # The protocol is the part before the first '-', except for grpc-web, which has one.
    word = "grpc-web" if word.startswith("grpc-web") else word.partition("-")[0]
    if word in _HTTP_PROTOCOLS:
        return Declared.HTTP
    if word in _TCP_PROTOCOLS or port in WELL_KNOWN_TCP_PORTS:
        return Declared.TCP
    return None


def classify(data: bytes, declared: str | None = None) -> str | None:
    """The protocol of a connection from its first bytes; ``None``: need more bytes.

    On a port declared HTTP the only question is HTTP/2 preface or not: everything
    else is HTTP/1.1 for the HTTP/1.1 parser to accept or refuse.
    """
    if H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        return Detected.HTTP2 if len(data) >= len(H2_PREFACE) else None
    if declared == Declared.HTTP or _REQUEST_LINE.match(data):
        return Detected.HTTP1
    if len(data) < SNIFF_BYTES and re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*", data):
        return None
    return Detected.TCP


async def sniff(stream: trio.abc.Stream, timeout: float = DETECT_TIMEOUT, *,  # noqa: ASYNC109
                declared: str | None = None,
                head_timeout: float | None = None) -> tuple[str, bytes]:
    """Read until the protocol is known; ``timeout`` or end of stream first: TCP.

    With ``head_timeout`` the deadline tightens to that long after the first bytes
    (an idle HTTP connection may wait long for its first request; a started one may
    not).  Whether a TCP verdict was reached on the bytes or by giving up is
    ``classify(data, declared) == Detected.TCP``.
    """
    data = b""
    with trio.move_on_after(timeout) as scope:
        while True:
            more = await stream.receive_some(4096)
            if not more:
                break
            if not data and head_timeout is not None:
                scope.deadline = min(scope.deadline, trio.current_time() + head_timeout)
            data += more
            kind = classify(data, declared)
            if kind is not None:
                return kind, data
    return Detected.TCP, data


PassThrough = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def serve_stream(stream: trio.abc.Stream, proxy: Proxy, peer: PeerInfo,
                       passthrough: PassThrough | None, *,
                       timeouts: H1Timeouts | None = None,
                       declared: str | None = None) -> None:
    """Serve one client connection by the destination port's ``declared`` protocol
    (:class:`Declared`; ``None``: detect it from the first bytes); closes ``stream``."""
    detected = await _detect(stream, peer, declared, timeouts)
    if detected is None:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        return
    kind, initial = detected
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


async def _detect(stream: trio.abc.Stream, peer: PeerInfo, declared: str | None,
                  timeouts: H1Timeouts | None) -> tuple[str, bytes] | None:
    """The protocol and the bytes read to tell it; ``None``: close the connection."""
    if declared == Declared.TCP:
        return Detected.TCP, b""  # nothing to wait for: the server may speak first
    try:
        if declared == Declared.HTTP:
            limits = timeouts or H1Timeouts()
            kind, initial = await sniff(stream, limits.idle, declared=declared,
                                        head_timeout=limits.header)
        else:
            kind, initial = await sniff(stream)
    except STREAM_ERRORS:
        return None
    if kind == Detected.TCP and classify(initial, declared) != Detected.TCP:
        # No verdict: silence or a fragment until the deadline, or the client closed.
        log = _log.debug if declared == Declared.HTTP else _log.info
        log("no protocol detected before the client went quiet or closed; closing. A "
            "server-first protocol (the server speaks first) needs its Service port "
            "declared: name it tcp-<suffix> or set appProtocol: tcp",
            src=peer.source_ip, dst=f"{peer.destination}:{peer.port}", received=len(initial))
        return None
    return kind, initial


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

    def declared_for(self, destination: str, port: int) -> str | None:
        """The declared protocol of a service port (``None`` for a pod IP, or a port
        the Service does not list: those are sniffed, as in Istio's waypoint)."""
        service = self._current().services_by_vip.get(destination)
        service_port = service.ports_by_number.get(port) if service is not None else None
        if service_port is None:
            return None
        return declared_protocol(port, service_port.name, service_port.app_protocol,
                                 service_port.protocol)

    async def __call__(self, request: ConnectRequest, responder: Responder) -> None:
        stream = responder.accept()
        await serve_stream(stream, self.proxy, self.peer_for(request), self._passthrough,
                           timeouts=self._timeouts,
                           declared=self.declared_for(request.host, request.port))
