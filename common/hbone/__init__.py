"""HBONE: HTTP/2 CONNECT tunnels over mTLS between mesh peers (DESIGN.md section 4).

Layers, top-down: :mod:`client` (the pool) and :mod:`server` (the listener and
handler API) → :mod:`connection` (trio shell: one reader, one writer per
connection) → :mod:`protocol` (sans-I/O HTTP/2 on ``h2``, with our own DATA path)
and :mod:`request` (building and checking CONNECT requests).  :mod:`stream` is the
tunneled byte stream both sides hand out.
"""

from common.hbone.client import HbonePool, PoolKey, store_connector, tls_connector
from common.hbone.request import BadRequestError, Baggage, ConnectRequest, build_request
from common.hbone.server import HboneServer, Responder, forward_tcp, tls_handshake
from common.hbone.stream import HboneStream, StreamResetError

__all__ = [
    "BadRequestError",
    "Baggage",
    "ConnectRequest",
    "HbonePool",
    "HboneServer",
    "HboneStream",
    "PoolKey",
    "Responder",
    "StreamResetError",
    "build_request",
    "forward_tcp",
    "store_connector",
    "tls_connector",
    "tls_handshake",
]
