"""Per-cluster circuit breaker: counters against DestinationRule ``connectionPool`` limits.

Semantics (Envoy "Circuit breaking"; Istio "Destination Rule"
``ConnectionPoolSettings``; Istio task "Circuit Breaking"):

* ``max_connections`` (``tcp.maxConnections``): upstream connections open to the
  whole cluster.  At the limit no new connection is opened; the request waits
  for one as a *pending* request instead.
* ``http1_max_pending_requests``: requests waiting for a connection.  Over it,
  the request fails at once.
* ``http2_max_requests``: requests in flight to the cluster, any protocol.
* ``max_retries``: retries in flight to the cluster (the retry budget, so
  retries cannot multiply an outage).  Over it the retry is skipped and the
  last response stands.
* An overflowing *request* is answered 503 with ``x-envoy-overloaded: true`` and
  response flag ``UO``, without touching the upstream.

Every ``try_*`` that returns ``True`` must be paired with its ``release_*``
(the shell does it in a ``finally``; all methods are synchronous, so a
cancellation cannot split a take from its bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass

from waypoint.resilience.config import ConnectionPoolSettings

#: Response for an overflowing request (Envoy's).
OVERFLOW_STATUS = 503
OVERFLOW_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"x-envoy-overloaded", b"true"),)
OVERFLOW_FLAG = "UO"


@dataclass(slots=True)
class BreakerStats:
    """Overflow counters for metrics (Envoy ``upstream_cx_overflow``,
    ``upstream_rq_pending_overflow``, ``upstream_rq_retry_overflow``)."""

    cx_overflow: int = 0
    rq_pending_overflow: int = 0
    rq_overflow: int = 0
    rq_retry_overflow: int = 0


class CircuitBreaker:
    """Live counters of one cluster (not shared across processes)."""

    __slots__ = ("active_connections", "active_requests", "active_retries", "pending_requests",
                 "settings", "stats")

    def __init__(self, settings: ConnectionPoolSettings) -> None:
        self.settings = settings
        self.active_connections = 0
        self.pending_requests = 0
        self.active_requests = 0
        self.active_retries = 0
        self.stats = BreakerStats()

    def try_request(self) -> bool:
        """Admit a request to the cluster (``http2MaxRequests``); ``False``: answer 503 UO."""
        if self.active_requests >= self.settings.http2_max_requests:
            self.stats.rq_overflow += 1
            return False
        self.active_requests += 1
        return True

    def release_request(self) -> None:
        self.active_requests -= 1

    def try_connection(self) -> bool:
        """May a new upstream connection be opened (``tcp.maxConnections``)?

        ``False`` is not an error: the request should queue with :meth:`try_pending`.
        """
        if self.active_connections >= self.settings.max_connections:
            self.stats.cx_overflow += 1
            return False
        self.active_connections += 1
        return True

    def release_connection(self) -> None:
        self.active_connections -= 1

    def try_pending(self) -> bool:
        """Queue a request waiting for a connection; ``False``: answer 503 UO."""
        if self.pending_requests >= self.settings.http1_max_pending_requests:
            self.stats.rq_pending_overflow += 1
            return False
        self.pending_requests += 1
        return True

    def release_pending(self) -> None:
        self.pending_requests -= 1

    def try_retry(self) -> bool:
        """Take a retry slot (``http.maxRetries``); ``False``: do not retry."""
        if self.active_retries >= self.settings.max_retries:
            self.stats.rq_retry_overflow += 1
            return False
        self.active_retries += 1
        return True

    def release_retry(self) -> None:
        self.active_retries -= 1

    def connection_exhausted(self, requests_served: int) -> bool:
        """Whether a connection that served this many requests must close
        (``maxRequestsPerConnection``; 0 = unlimited, 1 disables keep-alive)."""
        limit = self.settings.max_requests_per_connection
        return limit > 0 and requests_served >= limit
