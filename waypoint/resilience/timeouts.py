"""Route and per-try deadlines, and the timeout header sent upstream.

Semantics (Envoy "Router filter" headers; Istio "Virtual Service" ``timeout`` and
``retries.perTryTimeout``; Gateway API ``HTTPRouteTimeouts``):

* The route timeout covers the whole request: every try and every backoff.
  Exceeded: 504 ``upstream request timeout``, response flag ``UT``.
* ``x-envoy-upstream-rq-timeout-ms`` replaces the route timeout (``0`` disables it);
  ``x-envoy-upstream-rq-per-try-timeout-ms`` replaces the per-try timeout.
  Malformed values are ignored.
* A per-try timeout not below the route timeout is ignored (Envoy drops it).
* Each try ends at ``min(try start + per_try, route deadline)``.
* ``x-envoy-expected-rq-timeout-ms`` tells the upstream how long this try may
  take: the per-try timeout if set, else what is left of the route timeout; the
  header is absent when no timeout applies.

:class:`Alarms` is the bookkeeping behind the shell's per-try deadlines: a trio cancel
scope per try cost more CPU than the rest of a small request's routing, so the shell
keeps one timer for all tries and acts only on the few that overrun.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from waypoint.resilience.config import RetryPolicy, TimeoutPolicy

T = TypeVar("T")

#: 504 body Envoy sends when the route or per-try timeout fires.
TIMEOUT_BODY = b"upstream request timeout"


def _header_seconds(headers: Mapping[str, str] | None, name: str) -> float | None:
    """A millisecond header in seconds; ``None`` if absent or malformed; 0.0 if zero."""
    if not headers:
        return None
    raw = headers.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit():
        return None
    return int(raw) / 1000.0


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Deadlines of one request, in the shell's monotonic clock (seconds)."""

    request_deadline: float | None
    """When the whole request times out; ``None``: never."""
    per_try: float | None
    """Seconds one try may take; ``None``: bounded only by ``request_deadline``."""

    def try_deadline(self, now: float) -> float | None:
        """When a try started at ``now`` times out."""
        if self.per_try is None:
            return self.request_deadline
        end = now + self.per_try
        if self.request_deadline is not None and self.request_deadline < end:
            return self.request_deadline
        return end

    def expected_timeout_ms(self, now: float) -> int | None:
        """Value for ``x-envoy-expected-rq-timeout-ms`` on a try started at ``now``."""
        end = self.try_deadline(now)
        if end is None:
            return None
        return max(0, round((end - now) * 1000))

    def remaining(self, now: float) -> float | None:
        """Seconds left of the route timeout (``None``: unbounded); clamp fault delays
        and retry backoffs with it."""
        if self.request_deadline is None:
            return None
        return max(0.0, self.request_deadline - now)

    def expired(self, now: float) -> bool:
        """Whether the route deadline has passed (no further try or backoff)."""
        return self.request_deadline is not None and now >= self.request_deadline


def deadlines(now: float, timeouts: TimeoutPolicy, retries: RetryPolicy | None = None,
              request_headers: Mapping[str, str] | None = None) -> Deadlines:
    """Effective deadlines for a request arriving at ``now``."""
    route = timeouts.request
    header_route = _header_seconds(request_headers, "x-envoy-upstream-rq-timeout-ms")
    if header_route is not None:
        route = header_route or None
    per_try = timeouts.per_try
    if retries is not None and retries.per_try_timeout is not None:
        per_try = retries.per_try_timeout
    header_try = _header_seconds(request_headers, "x-envoy-upstream-rq-per-try-timeout-ms")
    if header_try is not None:
        per_try = header_try or None
    if per_try is not None and route is not None and per_try >= route:
        per_try = None
    return Deadlines(None if route is None else now + route, per_try)


class Alarms(Generic[T]):
    """Deadlines of work in flight, each with a target to act on when it passes.

    Built for per-try timeouts, where nearly every try ends long before its deadline:
    :meth:`add` is a heap push, :meth:`cancel` only marks the entry (it leaves the heap
    when it reaches the top, or when dead entries outnumber the live ones and the heap
    is rebuilt, so memory stays proportional to the work in flight).  The I/O shell
    sleeps until :meth:`next_deadline` and then acts on :meth:`pop_due`.
    """

    __slots__ = ("_heap", "_live", "_seq")

    #: Dead entries tolerated beyond twice the live ones before a rebuild.
    _SLACK = 1024

    def __init__(self) -> None:
        # [deadline, sequence, target or None once cancelled]: lists compare by deadline
        # then by the unique sequence, never by target.
        self._heap: list[list[Any]] = []
        self._live = 0
        self._seq = 0

    def __len__(self) -> int:
        """Live (not cancelled, not yet due) entries."""
        return self._live

    def add(self, deadline: float, target: T) -> list[Any]:
        """Watch ``deadline`` for ``target``; returns the entry to :meth:`cancel`."""
        self._seq += 1
        entry = [deadline, self._seq, target]
        heapq.heappush(self._heap, entry)
        self._live += 1
        if len(self._heap) > 2 * self._live + self._SLACK:
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """The work ended before its deadline (a no-op once it was popped as due)."""
        if entry[2] is not None:
            entry[2] = None
            self._live -= 1

    def pop_due(self, now: float) -> list[T]:
        """Targets whose deadline is ``now`` or earlier, each returned once; also drops
        the cancelled entries at the top, so :meth:`next_deadline` is a live one."""
        heap = self._heap
        due: list[T] = []
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)
            target = entry[2]
            if target is not None:
                entry[2] = None
                self._live -= 1
                due.append(target)
        return due

    def next_deadline(self) -> float:
        """The earliest deadline in the heap (``inf`` when empty); after :meth:`pop_due`,
        a live entry's."""
        return self._heap[0][0] if self._heap else math.inf
