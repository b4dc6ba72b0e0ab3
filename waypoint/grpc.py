"""gRPC facts the waypoint needs: detection, status mapping, protocol selection.

Pure functions, no I/O.  The waypoint answers some requests itself (no route, no
healthy upstream, timeout, circuit breaker, authorization, fault abort).  A gRPC
client reads the outcome from ``grpc-status``, not from the HTTP status, so for a
gRPC request those local answers become *trailers-only* responses, as Envoy does
for its local replies: HTTP 200, ``content-type: application/grpc``,
``grpc-status`` and a percent-encoded ``grpc-message`` in one HEADERS frame that
ends the stream.  The HTTP status -> gRPC status table is Envoy's
(``Grpc::Utility::httpToGrpcStatus``), which follows the gRPC project's
"HTTP to gRPC Status Code Mapping" document.
"""

from __future__ import annotations

from collections.abc import Iterable

#: gRPC status codes used here (google.rpc.Code).
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_HTTP_TO_GRPC = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

# Port name prefixes and appProtocol values that make Istio speak HTTP/2 upstream
# (Istio "protocol selection"; ``kubernetes.io/h2c`` is the Kubernetes standard name).
_H2_PORT_PREFIXES = ("grpc", "http2")
_H2_APP_PROTOCOLS = frozenset({"grpc", "grpc-web", "http2", "kubernetes.io/h2c"})


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request (or response) carries gRPC: ``content-type: application/grpc*``."""
    for name, value in headers:
        if name == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


def status_from_http(status: int) -> int:
    """Envoy's gRPC status for an HTTP status (UNKNOWN when the table is silent)."""
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


def grpc_status(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``grpc-status`` value of a header or trailer section, if any and valid."""
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else None
    return None


def encode_message(text: bytes) -> bytes:
    """Percent-encode ``grpc-message`` (the gRPC spec: printable ASCII except '%' stays)."""
    out = bytearray()
    for byte in text:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def local_status(status: int) -> int:
    """The gRPC status of one of the waypoint's own answers.  The table, except that a
    504 (only ever a route or per-try timeout here) is DEADLINE_EXCEEDED: Envoy's
    router passes that code explicitly for gRPC timeouts (envoyproxy/envoy#44479), so
    clients do not retry an expired deadline as they would UNAVAILABLE."""
    return DEADLINE_EXCEEDED if status == 504 else status_from_http(status)


def trailers_only(status: int, message: bytes) -> list[tuple[bytes, bytes]]:
    """Headers (after ``:status: 200``) of a trailers-only answer for a local HTTP
    ``status`` with ``message`` (the local answer's body)."""
    pairs = [(b"content-type", b"application/grpc"),
             (b"grpc-status", b"%d" % local_status(status))]
    text = message.strip()
    if text:
        pairs.append((b"grpc-message", encode_message(text)))
    return pairs


def wants_h2(port_name: str | None, app_protocol: str | None) -> bool:
    """Whether a service port is declared HTTP/2 (gRPC included) by name or appProtocol."""
    if app_protocol is not None:
        return app_protocol.lower() in _H2_APP_PROTOCOLS
    if port_name:
        name = port_name.lower()
        return any(name == p or name.startswith(p + "-") for p in _H2_PORT_PREFIXES)
    return False
