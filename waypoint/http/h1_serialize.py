"""Serializing HTTP/1.1 messages, and the hop-by-hop rules for forwarding them.

A writer serializes one direction of one connection: :class:`RequestWriter` what
the waypoint sends upstream, :class:`ResponseWriter` what it sends downstream.
Each head is one ``bytes`` (one join); body pieces come back as a list of buffers
for a scatter write, the caller's data never copied.

The body's framing is read from the head's headers, which must be lower case
(as the parser produces them; Envoy also writes HTTP/1 names in lower case):
``transfer-encoding: chunked`` frames chunks, ``content-length`` counts bytes
(and the writer checks the count), neither means no body for a request and a
body delimited by closing the connection for a response.  A response to HEAD,
a 1xx, 204 or 304 never has a body.

The writer refuses, with :class:`~common.errors.LocalProtocolError`, anything
that would put a different message on the wire than the caller meant: CR, LF or
NUL in a header, a name that is not a token, more or fewer body bytes than the
Content-Length, trailers without chunked framing, a head before the last
message ended.  This is where response splitting through a header value that
came from configuration is stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import LocalProtocolError
from waypoint.http.h1_events import Headers, RequestHead, ResponseHead

Buffer = bytes | memoryview

_LOWER_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_TCHAR = _LOWER_TCHAR + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VCHAR = bytes(range(0x21, 0x7F))
_KNOWN_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"))
# Lower-case names already checked, with their framing role (0: none); bounded
# like the parser's cache.
_NAMES_MAX = 2048
_ORDINARY = 0
_CONTENT_LENGTH = 1
_TRANSFER_ENCODING = 2
_CONNECTION = 3
_names: dict[bytes, int] = {
    b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION}

_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    202: b"Accepted", 204: b"No Content", 206: b"Partial Content", 301: b"Moved Permanently",
    302: b"Found", 303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    413: b"Payload Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    426: b"Upgrade Required", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"))
# Names a peer may not make us drop by listing them in Connection: dropping them
# would change the framing or the routing of what we forward.
_NOT_NOMINABLE = frozenset((b"host", b"content-length", b"te"))

_NO_BODY = 0
_LENGTH = 1
_CHUNKED = 2
_UNTIL_CLOSE = 3
_DONE = 4


def reason_phrase(status: int) -> bytes:
    """The usual reason phrase for ``status`` (empty when unknown)."""
    return _REASONS.get(status, b"")


def _check_name(name: bytes) -> int:
    if not name or name.translate(None, _LOWER_TCHAR):
        raise LocalProtocolError(
            f"header name {name[:64]!r} is not a lower-case token: fix the route's header rule "
            "or the code that built it")
    if len(_names) < _NAMES_MAX:
        _names[name] = _ORDINARY
    return _ORDINARY


def _head_bytes(start_line: bytes, headers: Sequence[tuple[bytes, bytes]],
                ) -> tuple[bytes, int, int, bool]:
    """Serialize a head: (bytes, body mode, Content-Length, says Connection: close)."""
    kind_of = _names.get
    mode = _NO_BODY
    length = 0
    close = False
    for name, value in headers:
        kind = kind_of(name)
        if kind is None:
            kind = _check_name(name)
        if kind == _ORDINARY:
            continue
        if kind == _CONTENT_LENGTH:
            if mode != _NO_BODY or not value.isdigit():
                raise LocalProtocolError(
                    f"Content-Length {value[:32]!r} is invalid, repeated or combined with chunked")
            mode = _LENGTH
            length = int(value)
        elif kind == _TRANSFER_ENCODING:
            if mode != _NO_BODY or value.lower() != b"chunked":
                raise LocalProtocolError(
                    f"Transfer-Encoding {value[:32]!r}: only a single chunked is written, "
                    "never with Content-Length")
            mode = _CHUNKED
        else:
            close = close or b"close" in _tokens(value)
    if headers:
        out = start_line + b"\r\n".join([b": ".join(h) for h in headers]) + b"\r\n\r\n"
    else:
        out = start_line + b"\r\n"
    # One pass instead of a scan per value: the only CR, LF (or NUL) bytes
    # allowed are the line ends written above.
    if len(out) - len(out.translate(None, b"\r\n\0")) != 2 * len(headers) + 4:
        raise LocalProtocolError(
            "CR, LF or NUL inside a start line or header: refusing to write it (response "
            "splitting); check where the value came from")
    return out, mode, length, close


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t") for t in value.lower().split(b",")]


class _Writer:
    __slots__ = ("_mode", "_remaining", "must_close")

    def __init__(self) -> None:
        self._mode = _DONE
        self._remaining = 0
        self.must_close = False
        """True once a message said ``Connection: close`` or needs the close to end its body."""

    def _check_idle(self) -> None:
        if self._mode != _DONE:
            raise LocalProtocolError("a new head before the previous message ended: call end()")
        if self.must_close:
            raise LocalProtocolError("the connection is closing: no more messages on it")

    def data(self, data: Buffer) -> list[Buffer]:
        """Buffers to send for one piece of body (empty when ``data`` is)."""
        size = len(data)
        mode = self._mode
        if mode == _CHUNKED:
            return [b"%x\r\n" % size, data, b"\r\n"] if size else []
        if mode == _LENGTH:
            if size > self._remaining:
                raise LocalProtocolError(
                    f"{size} body bytes but only {self._remaining} left of the Content-Length")
            self._remaining -= size
            return [data]
        if mode == _UNTIL_CLOSE:
            return [data]
        if not size:
            return []
        if mode == _DONE:
            raise LocalProtocolError("body data after end(): start a new message first")
        raise LocalProtocolError("body data on a message without a body (no Content-Length or "
                                 "chunked, or a response that cannot have one)")

    def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """Bytes that end the message (the last chunk and trailers when chunked)."""
        mode = self._mode
        if mode == _CHUNKED:
            self._mode = _DONE
            if not trailers:
                return b"0\r\n\r\n"
            return _head_bytes(b"0\r\n", trailers)[0]
        if trailers:
            raise LocalProtocolError("trailers need chunked framing: add transfer-encoding")
        if mode == _LENGTH and self._remaining:
            raise LocalProtocolError(
                f"message ended {self._remaining} bytes short of its Content-Length")
        if mode == _DONE:
            raise LocalProtocolError("end() without a message in progress")
        self._mode = _DONE
        return b""


class RequestWriter(_Writer):
    """Serializes requests (what the waypoint sends upstream)."""

    __slots__ = ()

    def head(self, event: RequestHead, headers: Headers | None = None) -> bytes:
        """Bytes of the request line and headers; framing from the headers.

        ``headers`` replaces ``event.headers`` (a proxy forwards a parsed head
        with edited headers without building a new event).
        """
        if self._mode != _DONE or self.must_close:
            self._check_idle()
        method = event.method
        target = event.target
        version = event.version
        if version != b"1.1" and version != b"1.0":
            raise LocalProtocolError(f"cannot write HTTP version {version!r}")
        if (method not in _KNOWN_METHODS and (not method or method.translate(None, _TCHAR))) or (
                not target or target.translate(None, _VCHAR)):
            raise LocalProtocolError(
                f"invalid method {method[:32]!r} or target {target[:64]!r}")
        if headers is None:
            headers = event.headers
        out, mode, length, close = _head_bytes(
            b"%s %s HTTP/%s\r\n" % (method, target, version), headers)
        if mode == _CHUNKED and version == b"1.0":
            raise LocalProtocolError("chunked framing does not exist in HTTP/1.0")
        self._mode = _NO_BODY if mode == _UNTIL_CLOSE or (mode == _LENGTH and not length) else mode
        self._remaining = length
        self.must_close = close or (version == b"1.0" and not _says_keep_alive(headers))
        return out


class ResponseWriter(_Writer):
    """Serializes responses (what the waypoint sends downstream)."""

    __slots__ = ()

    def head(self, event: ResponseHead, request_method: bytes = b"GET",
             headers: Headers | None = None) -> bytes:
        """Bytes of the status line and headers for the response to ``request_method``.

        A 1xx (other than 101) is informational: the final response's head follows.
        ``headers`` replaces ``event.headers``.
        """
        return self.status_head(event.status, event.reason,
                                event.headers if headers is None else headers,
                                request_method, event.version)

    def status_head(self, status: int, reason: bytes, headers: Headers,
                    request_method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
        """:meth:`head` from the fields, for a shell that has no event to pass (a
        frozen event built only to be serialized cost more than the rest of this)."""
        if self._mode != _DONE or self.must_close:
            self._check_idle()
        if not 100 <= status <= 999 or (version != b"1.1" and version != b"1.0"):
            raise LocalProtocolError(f"cannot write status {status} / version {version!r}")
        out, mode, length, close = _head_bytes(
            b"HTTP/%s %d %s\r\n" % (version, status, reason), headers)
        if status < 200:
            if status == 101:
                self.must_close = True
            return out
        if request_method == b"HEAD" or status == 204 or status == 304 or (
                request_method == b"CONNECT" and status < 300):
            mode = _NO_BODY
        elif mode == _NO_BODY:
            mode = _UNTIL_CLOSE
        elif mode == _LENGTH and not length:
            mode = _NO_BODY
        elif mode == _CHUNKED and version == b"1.0":
            raise LocalProtocolError(
                "chunked framing does not exist in HTTP/1.0: drop transfer-encoding and let "
                "the close end the body")
        self._mode = mode
        self._remaining = length
        self.must_close = (close or mode == _UNTIL_CLOSE
                           or (version == b"1.0" and not _says_keep_alive(headers)))
        return out


def _says_keep_alive(headers: Headers) -> bool:
    return b"keep-alive" in _connection_tokens(headers)


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(_tokens(value))
    tokens.discard(b"")
    return tokens


def hop_by_hop_names(headers: Headers) -> frozenset[bytes]:
    """Names a proxy drops before forwarding (RFC 9110 section 7.6.1).

    Connection, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
    Upgrade, and every name listed in Connection, except Host, Content-Length and
    TE, which a peer must not be able to strip from what we forward.
    """
    nominated = _connection_tokens(headers) - _NOT_NOMINABLE
    return _HOP_BY_HOP | nominated if nominated else _HOP_BY_HOP


def strip_hop_by_hop(headers: Headers) -> Headers:
    """``headers`` without the hop-by-hop ones; ``te: trailers`` is kept (gRPC needs it)."""
    kept = [h for h in headers if h[0] not in _HOP_BY_HOP]
    if len(kept) == len(headers):
        return kept
    # Usually only "Connection: keep-alive" was dropped: nothing nominated, no TE.
    nominated: set[bytes] = set()
    te = False
    for name, value in [h for h in headers if h[0] in _HOP_BY_HOP]:
        if name == b"connection":
            if value != b"keep-alive" and value != b"close":
                nominated.update(_tokens(value))
        elif name == b"te":
            te = True
    nominated -= _HOP_BY_HOP | _NOT_NOMINABLE | {b"", b"close"}
    if not nominated and not te:
        return kept
    out: Headers = []
    for name, value in headers:
        if name not in _HOP_BY_HOP and name not in nominated:
            out.append((name, value))
        elif name == b"te" and b"trailers" in _tokens(value):
            out.append((b"te", b"trailers"))
    return out


def forward_headers(head: RequestHead | ResponseHead) -> Headers:
    """The headers a proxy sends onward for a parsed head, framing kept.

    Hop-by-hop fields are dropped (:func:`strip_hop_by_hop`), which removes
    ``transfer-encoding``; a chunked message gets ``transfer-encoding: chunked``
    back so that the next hop reads the same body.  A response whose body ran to
    the end of the connection has neither: the proxy decides whether to chunk it
    (keeping its own client connection) or to close after it.
    """
    headers = strip_hop_by_hop(head.headers)
    if head.chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    return headers
