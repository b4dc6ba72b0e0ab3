"""HTTP codecs of the waypoint: a strict, bounded, sans-I/O HTTP/1.1 parser and writer.

The public interface of the HTTP/1.1 codec, re-exported here::

    RequestParser / ResponseParser   bytes in, events out (h1_parse)
    RequestWriter / ResponseWriter   events in, bytes out (h1_serialize)
    RequestHead, ResponseHead, Data, EndOfMessage, ConnectionClosed, NEED_DATA, PAUSED
    H1Limits                         the bounds (Envoy's defaults)
    forward_headers, strip_hop_by_hop, hop_by_hop_names, reason_phrase

A proxy's round trip on one keep-alive request::

    down = RequestParser(); up_writer = RequestWriter()
    up = ResponseParser(); down_writer = ResponseWriter()
    down.feed(bytes_from_client)
    req = down.next_event()                           # RequestHead (or NEED_DATA)
    send_up(up_writer.head(req, forward_headers(req)))
    ... Data -> send_up(*up_writer.data(ev.data)); EndOfMessage -> send_up(up_writer.end())
    up.expect_response(req.method); up.feed(bytes_from_server)
    resp = up.next_event()                            # ResponseHead
    send_down(down_writer.head(resp, req.method, forward_headers(resp)))
    ... then close when down.must_close or down_writer.must_close.

Errors from the peer are :class:`common.errors.Http1Error` with ``status`` to
answer (502 on the upstream side); misuse of a writer is
:class:`common.errors.LocalProtocolError`.
"""

from waypoint.http.h1_events import (
    DEFAULT_LIMITS,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    H1Limits,
    Headers,
    RequestHead,
    ResponseHead,
    Signal,
)
from waypoint.http.h1_parse import RequestParser, ResponseParser
from waypoint.http.h1_serialize import (
    RequestWriter,
    ResponseWriter,
    forward_headers,
    hop_by_hop_names,
    reason_phrase,
    strip_hop_by_hop,
)

__all__ = [
    "DEFAULT_LIMITS",
    "NEED_DATA",
    "PAUSED",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "H1Limits",
    "Headers",
    "RequestHead",
    "RequestParser",
    "RequestWriter",
    "ResponseHead",
    "ResponseParser",
    "ResponseWriter",
    "Signal",
    "forward_headers",
    "hop_by_hop_names",
    "reason_phrase",
    "strip_hop_by_hop",
]
