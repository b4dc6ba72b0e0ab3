"""HTTP codecs of the waypoint: a strict, bounded, sans-I/O HTTP/1.1 parser and writer.

The public interface of the HTTP/1.1 codec, re-exported here::

    RequestParser / ResponseParser   bytes in, events out (h1_parse)
    RequestWriter / ResponseWriter   events in, bytes out (h1_serialize)
    RequestHead, ResponseHead, Data, EndOfMessage, ConnectionClosed, NEED_DATA, PAUSED
    H1Limits                         the bounds (Envoy's defaults)
    strip_hop_by_hop, hop_by_hop_names, reason_phrase
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
    "hop_by_hop_names",
    "reason_phrase",
    "strip_hop_by_hop",
]
