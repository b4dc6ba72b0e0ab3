"""An HBONE server on loopback whose refusals are counted the way ztunnel counts them.

``start_counted_server`` wires :class:`~common.hbone.HboneServer`'s ``on_refused`` to
the ``pyambient_hbone_refused_total{reason}`` counter of a fresh
:class:`~common.metrics.Metrics` (the registry ztunnel's ``/metrics`` renders), so a
test can assert that exactly the refusal it provoked was counted.
"""

from __future__ import annotations

import socket

import trio

from common.hbone import HboneServer, forward_tcp, tls_handshake
from common.metrics import HBONE_REFUSAL_REASONS, Metrics
from tests.integration.hbone_support import TRUST_DOMAIN, Handler, Mesh, listen, wait_until

COUNTER = "pyambient_hbone_refused_total"


async def start_counted_server(nursery: trio.Nursery, mesh: Mesh, handler: Handler = forward_tcp,
                               *, listener: socket.socket | None = None,
                               handshake_timeout: float = 5.0,
                               ) -> tuple[HboneServer, tuple[str, int], Metrics]:
    metrics = Metrics()
    sock = listener if listener is not None else listen()
    server = HboneServer(handler, tls_handshake(lambda: mesh.server_context, TRUST_DOMAIN),
                         handshake_timeout=handshake_timeout,
                         on_refused=metrics.hbone_refused)
    await nursery.start(server.serve, sock)
    address = sock.getsockname()
    return server, (address[0], address[1]), metrics


def refusals(metrics: Metrics) -> dict[str, int]:
    """The refusal counts that are not zero, by reason (read from the registry)."""
    counts: dict[str, int] = {}
    for reason in HBONE_REFUSAL_REASONS:
        value = metrics.registry.get_sample_value(COUNTER, {"reason": reason})
        if value:
            counts[reason] = int(value)
    return counts


async def wait_refused(metrics: Metrics, expected: dict[str, int]) -> None:
    """Poll until the non-zero counts are exactly ``expected`` (10 s at most).

    The server counts a connection-level refusal when the connection ends, a moment
    after the client saw the GOAWAY, so the counter is polled, never slept on.
    """
    try:
        await wait_until(lambda: refusals(metrics) == expected)
    except trio.TooSlowError:
        raise AssertionError(f"refusals counted {refusals(metrics)}, expected {expected}"
                             ) from None
