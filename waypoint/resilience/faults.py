"""Fault injection: whether to delay and/or abort this request.

Semantics (Istio "Virtual Service" ``HTTPFaultInjection``; Envoy "Fault
injection" HTTP filter):

* Delay and abort are drawn independently; the delay happens first, then the
  abort.  An aborted request never reaches the backend.
* Percentages are fractions of 100 (Istio sends Envoy a ``FractionalPercent``
  over a million; our draw is a float, at least as fine), so 0.1 % is one in a
  thousand; a missing percentage (0) injects nothing.
* An HTTP abort answers ``http_status`` with body ``fault filter abort``; a gRPC
  abort answers HTTP 200 with ``grpc-status`` (a trailers-only response).
* Response flags: ``DI`` for an injected delay, ``FI`` for an injected abort.
* The shell keeps the delay inside the route deadline: it sleeps
  ``min(delay, deadline - now)`` and answers 504 if the deadline fires first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from waypoint.resilience.config import FaultAbort, FaultPolicy

#: Body of an injected HTTP abort (Envoy's).
ABORT_BODY = b"fault filter abort"


def _hit(percentage: float, rng: random.Random) -> bool:
    # A float draw is finer than Envoy's per-million and ~5x cheaper than randrange.
    return percentage > 0.0 and rng.random() * 100.0 < percentage


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to inject into one request."""

    delay: float = 0.0
    """Seconds to wait before proceeding (0: none)."""
    abort: FaultAbort | None = None
    """Answer this instead of calling the backend (``None``: proceed)."""

    @property
    def response_flags(self) -> tuple[str, ...]:
        """Envoy response flags for the access log (``DI``, ``FI``)."""
        flags: tuple[str, ...] = ()
        if self.delay > 0:
            flags += ("DI",)
        if self.abort is not None:
            flags += ("FI",)
        return flags


NO_FAULT = FaultDecision()


def decide(policy: FaultPolicy | None, rng: random.Random) -> FaultDecision:
    """Draw this request's faults from ``policy``."""
    if policy is None:
        return NO_FAULT
    delay = 0.0
    if policy.delay is not None and _hit(policy.delay.percentage, rng):
        delay = policy.delay.fixed_delay
    abort = policy.abort
    if abort is not None and not _hit(abort.percentage, rng):
        abort = None
    if delay == 0.0 and abort is None:
        return NO_FAULT
    return FaultDecision(delay, abort)


def abort_response(abort: FaultAbort) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of an injected abort."""
    if abort.grpc_status is not None:
        headers = [(b"content-type", b"application/grpc"),
                   (b"grpc-status", str(abort.grpc_status).encode()),
                   (b"grpc-message", b"fault filter abort")]
        return 200, headers, b""
    assert abort.http_status is not None
    return abort.http_status, [(b"content-type", b"text/plain")], ABORT_BODY
