"""Retry decisions for one request: retry this try's outcome or not, and after how long.

Theory of operation: the shell creates one :class:`RetryState` per downstream
request (from the route's :class:`~waypoint.resilience.config.RetryPolicy` and
the request headers), runs a try, describes what happened as a
:class:`TryOutcome`, and asks :meth:`RetryState.decide`.  The answer is either
"done" (forward what we have) or "retry after ``backoff`` seconds".  The shell
still has to take a retry slot from the cluster's circuit breaker
(``max_retries``) and stays inside the route deadline (the route timeout covers
every try and every backoff).  A retry can only be decided before anything of
the response went downstream, and only while the request body is still held.

Semantics (Envoy "Router filter": ``x-envoy-retry-on``, ``x-envoy-retry-grpc-on``,
``x-envoy-max-retries``, ``x-envoy-retriable-status-codes``; Envoy "Retry
semantics"; Istio "Virtual Service" ``HTTPRetry``):

* ``5xx``: any 5xx, or no response at all (connect failure, reset, refused
  stream, per-try timeout).  ``gateway-error``: 502/503/504 and no response.
* ``reset``: no response (reset, disconnect, per-try timeout); ``reset-before-request``:
  reset before the request was sent upstream; ``connect-failure``; ``refused-stream``
  (HTTP/2 REFUSED_STREAM); ``retriable-4xx``: 409; ``retriable-status-codes``: the
  policy's and the header's codes; ``envoy-ratelimited``: ``x-envoy-ratelimited`` present.
* gRPC policies match the ``grpc-status`` of the response (``cancelled`` 1,
  ``deadline-exceeded`` 4, ``resource-exhausted`` 8, ``internal`` 13, ``unavailable`` 14).
* A response carrying ``x-envoy-overloaded`` is never retried.
* Request headers add to the route's policies and ``x-envoy-max-retries``
  replaces its count; unknown header values are ignored, as Envoy does.
* ``retriable-headers`` and ``http3-post-connect-failure`` are accepted but
  never match (no header matchers, no HTTP/3 upstreams).

Backoff (Envoy "Retry semantics": fully jittered exponential): retry ``n``
(1-based) waits uniform in ``[0, min((2**n - 1) * base, max))``; with the
defaults 25 ms and 250 ms.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from waypoint.resilience.config import GRPC_RETRY_ON, RetryPolicy
from waypoint.resilience.hosts import Host

# Policy bits: ints, not an IntFlag, because flag arithmetic on enums costs
# microseconds per request.
_5XX = 1
_GATEWAY = 2
_RESET = 4
_RESET_BEFORE_REQUEST = 8
_CONNECT_FAILURE = 16
_RATELIMITED = 32
_RETRIABLE_4XX = 64
_REFUSED_STREAM = 128
_STATUS_CODES = 256

_BITS: Mapping[str, int] = {
    "5xx": _5XX,
    "gateway-error": _GATEWAY,
    "reset": _RESET,
    "reset-before-request": _RESET_BEFORE_REQUEST,
    "connect-failure": _CONNECT_FAILURE,
    "envoy-ratelimited": _RATELIMITED,
    "retriable-4xx": _RETRIABLE_4XX,
    "refused-stream": _REFUSED_STREAM,
    "retriable-status-codes": _STATUS_CODES,
    "retriable-headers": 0,
    "http3-post-connect-failure": 0,
}

#: Backoff exponent cap, so that ``2**n`` stays a small int for absurd retry counts.
_MAX_EXPONENT = 30


class OutcomeKind(Enum):
    """What one upstream try ended with."""

    RESPONSE = "response"
    """Response headers arrived (``status``, maybe ``grpc_status``)."""
    CONNECT_FAILURE = "connect_failure"
    """No connection to the host (refused, unreachable, connect timeout)."""
    REFUSED_STREAM = "refused_stream"
    """The host reset the HTTP/2 stream with REFUSED_STREAM: it did not process it."""
    RESET = "reset"
    """The stream or connection broke before response headers."""
    PER_TRY_TIMEOUT = "per_try_timeout"
    """No response headers within the per-try timeout."""


@dataclass(frozen=True, slots=True)
class TryOutcome:
    """The outcome of one try, as the shell observed it.

    ``request_started``: some of the request reached the host (for
    ``reset-before-request``).  ``overloaded`` / ``ratelimited``: the response had
    ``x-envoy-overloaded`` / ``x-envoy-ratelimited``.
    """

    kind: OutcomeKind
    status: int | None = None
    grpc_status: int | None = None
    request_started: bool = True
    overloaded: bool = False
    ratelimited: bool = False


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after ``backoff`` seconds, or stop (``reason`` says why)."""

    retry: bool
    backoff: float = 0.0
    reason: str = ""


_SUCCESS = RetryDecision(False, reason="not a retriable outcome")
_EXHAUSTED = RetryDecision(False, reason="retries exhausted")
_BODY_GONE = RetryDecision(False, reason="request body no longer held")
_OVERLOADED = RetryDecision(False, reason="upstream said x-envoy-overloaded")
_DISABLED = RetryDecision(False, reason="retries disabled")


def backoff(retry_number: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry ``retry_number`` (1-based)."""
    n = min(retry_number, _MAX_EXPONENT)
    return rng.random() * min(((1 << n) - 1) * base, cap)


def _parse(names: Iterable[str]) -> tuple[int, frozenset[int]]:
    """Policy names to (bits, gRPC codes); unknown names are ignored."""
    bits = 0
    grpc = set()
    for name in names:
        bits |= _BITS.get(name, 0)
        code = GRPC_RETRY_ON.get(name)
        if code is not None:
            grpc.add(code)
    return bits, frozenset(grpc)


#: Parsed route ``retry_on`` sets, keyed by the frozenset itself (its hash is
#: cached).  Only config-made sets go here, never request headers, so the cache
#: is bounded by the distinct policies in the config.
_COMPILED: dict[frozenset[str], tuple[int, frozenset[int]]] = {}


def _compile(retry_on: frozenset[str]) -> tuple[int, frozenset[int]]:
    compiled = _COMPILED.get(retry_on)
    if compiled is None:
        compiled = _COMPILED[retry_on] = _parse(retry_on)
    return compiled


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class RetryState:
    """Retry bookkeeping for one downstream request (not shared, not thread-safe)."""

    __slots__ = ("_base", "_bits", "_cap", "_codes", "_grpc", "_max_retries", "_policy",
                 "attempts", "tried_hosts")

    def __init__(self, policy: RetryPolicy, request_headers: Mapping[str, str] | None = None
                 ) -> None:
        """``request_headers``: lower-case names; ``x-envoy-*`` retry headers are honoured."""
        self._policy = policy
        bits, grpc = _compile(policy.retry_on)
        codes = policy.retriable_status_codes
        max_retries = policy.attempts
        if request_headers:
            header = request_headers.get("x-envoy-retry-on")
            if header:
                bits |= _parse(_split(header))[0]
            header = request_headers.get("x-envoy-retry-grpc-on")
            if header:
                grpc = grpc | _parse(_split(header))[1]
            header = request_headers.get("x-envoy-retriable-status-codes")
            if header:
                codes = codes | {int(c) for c in _split(header) if c.isdigit()}
            header = request_headers.get("x-envoy-max-retries")
            if header and header.strip().isdigit():
                max_retries = int(header)
        self._bits = bits
        self._grpc = grpc
        self._codes = codes
        self._max_retries = max_retries if (bits or grpc) else 0
        self._base = policy.backoff_base
        self._cap = policy.max_backoff
        #: Tries started so far (the value of ``x-envoy-attempt-count`` for the next try).
        self.attempts = 0
        #: Hosts already tried, for the ``previous_hosts`` retry host predicate.
        self.tried_hosts: list[Host] = []

    @property
    def max_retries(self) -> int:
        """Retries this request may make (after header overrides)."""
        return self._max_retries

    def start_try(self, host: Host | None) -> int:
        """Record a try to ``host``; returns its 1-based number (``x-envoy-attempt-count``)."""
        self.attempts += 1
        if host is not None:
            self.tried_hosts.append(host)
        return self.attempts

    @property
    def avoid_previous_localities(self) -> bool:
        """For ``EndpointPicker.pick(avoid_excluded_levels=...)``: Istio
        ``retryRemoteLocalities``, retries prefer priority levels not tried yet."""
        return self._policy.retry_remote_localities

    def excluded_hosts(self) -> list[Host]:
        """Hosts the next pick should avoid: the tried ones, if the policy avoids previous
        hosts or previous localities (the picker needs them to know the tried levels)."""
        policy = self._policy
        if policy.retry_host_predicate == "previous_hosts" or policy.retry_remote_localities:
            return self.tried_hosts
        return []

    def is_retriable(self, outcome: TryOutcome) -> bool:
        """Whether the policies match this outcome (ignoring counts and body)."""
        bits = self._bits
        kind = outcome.kind
        if kind is OutcomeKind.RESPONSE:
            if outcome.overloaded:
                return False
            status = outcome.status or 0
            if bits & _5XX and status >= 500:
                return True
            if bits & _GATEWAY and status in (502, 503, 504):
                return True
            if bits & _RETRIABLE_4XX and status == 409:
                return True
            if bits & _STATUS_CODES and status in self._codes:
                return True
            if bits & _RATELIMITED and outcome.ratelimited:
                return True
            return outcome.grpc_status is not None and outcome.grpc_status in self._grpc
        if bits & (_5XX | _GATEWAY):
            return True
        if kind is OutcomeKind.CONNECT_FAILURE:
            return bool(bits & (_CONNECT_FAILURE | _RESET | _RESET_BEFORE_REQUEST))
        if kind is OutcomeKind.REFUSED_STREAM:
            return bool(bits & (_REFUSED_STREAM | _RESET | _RESET_BEFORE_REQUEST))
        if bits & _RESET:
            return True
        return bool(bits & _RESET_BEFORE_REQUEST) and not outcome.request_started

    def decide(self, outcome: TryOutcome, *, body_held: bool, rng: random.Random
               ) -> RetryDecision:
        """Decide about the try that just ended (call :meth:`start_try` before each try)."""
        if self._max_retries == 0:
            return _DISABLED
        if not self.is_retriable(outcome):
            return _OVERLOADED if outcome.overloaded else _SUCCESS
        retries_done = self.attempts - 1
        if retries_done >= self._max_retries:
            return _EXHAUSTED
        if not body_held:
            return _BODY_GONE
        return RetryDecision(True, backoff(retries_done + 1, self._base, self._cap, rng), "retry")
