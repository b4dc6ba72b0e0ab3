"""Mirrored requests: fire and forget.

The client never waits for a mirror and never sees its outcome: :meth:`Mirrorer.submit`
is synchronous and only starts a task in the waypoint's nursery.  A mirror carries
the request as forwarded (header rules and rewrites applied) with Host
``<host>-shadow`` (Envoy's), goes through the target cluster's picker, circuit
breaker and pool like any request, and its response is read and dropped.

Bounds: at most ``max_active`` mirrors in flight (further ones are dropped and
counted), each within ``timeout`` seconds, and only requests whose body was held
whole by the pipeline (at most its body buffer) are mirrored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio

from common.logging import get_logger
from waypoint.clusters import ClusterState
from waypoint.http import EndOfMessage, Headers, RequestHead, ResponseHead

_log = get_logger("waypoint.mirror")

MAX_ACTIVE = 128
TIMEOUT = 10.0


class Mirrorer:
    """Sends mirror copies from tasks in ``nursery``; counts what happened to them."""

    def __init__(self, nursery: trio.Nursery, *, max_active: int = MAX_ACTIVE,
                 timeout: float = TIMEOUT, rng: random.Random | None = None) -> None:
        self._nursery = nursery
        self.max_active = max_active
        self.timeout = timeout
        self._rng = rng or random.Random()
        self.active = 0
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.skipped = 0
        """Requests not mirrored because their body was too large to hold."""

    def submit(self, cluster: ClusterState, head: RequestHead, headers: Headers,
               authority: str, body: Sequence[bytes | memoryview]) -> None:
        """Start sending a copy; returns at once and never raises."""
        if self.active >= self.max_active:
            self.dropped += 1
            return
        pairs = [h for h in headers if h[0] != b"host"]
        pairs.append((b"host", authority.encode("latin-1")))
        self.active += 1
        self._nursery.start_soon(self._send, cluster, head, pairs, b"".join(body))

    async def _send(self, cluster: ClusterState, head: RequestHead, headers: Headers,
                    body: bytes) -> None:
        try:
            with trio.move_on_after(self.timeout) as scope:
                await self._exchange(cluster, head, headers, body)
            if scope.cancelled_caught:
                self.failed += 1
                _log.debug("mirror timed out", cluster=cluster.cluster.name)
        except Exception as exc:  # a mirror's failure must never reach anyone
            self.failed += 1
            _log.debug("mirror failed", cluster=cluster.cluster.name, reason=str(exc))
        finally:
            self.active -= 1

    async def _exchange(self, cluster: ClusterState, head: RequestHead, headers: Headers,
                        body: bytes) -> None:
        breaker = cluster.breaker
        if not breaker.try_request():
            self.dropped += 1
            return
        try:
            host = cluster.picker.pick(trio.current_time(), self._rng)
            spec = cluster.endpoints.get(host.address) if host is not None else None
            if host is None or spec is None:
                self.failed += 1
                return
            conn = await cluster.pool.acquire(host, spec.info)
            ok = False
            try:
                conn.parser.expect_response(head.method)
                writer = conn.writer
                out: list[bytes | memoryview] = [writer.head(head, headers)]
                if body:
                    out.extend(writer.data(body))
                out.append(writer.end())
                await conn.stream.send_all(b"".join(out))
                status = 0
                while True:
                    event = await conn.next_event()
                    if isinstance(event, ResponseHead) and event.status >= 200:
                        status = event.status
                    elif isinstance(event, EndOfMessage):
                        break
                ok = True
                self.sent += 1
                _log.debug("mirror answered", cluster=cluster.cluster.name, status=status)
            finally:
                await cluster.pool.release(conn, reusable=ok)
        finally:
            breaker.release_request()
