"""The waypoint's resilience decision cores (sans-I/O).

Pure decision logic and state machines for timeouts, retries, circuit breaking,
outlier detection, fault injection and load balancing; the waypoint's trio shell
executes the decisions.  Time (``now``, monotonic seconds) and randomness (a
``random.Random``) are inputs, so every decision is reproducible in tests.

Modules, one job each:

* :mod:`.config`: the frozen settings types, with Istio's defaults.
* :mod:`.timeouts`: route and per-try deadlines, timeout headers.
* :mod:`.retry`: retry or not, and the backoff.
* :mod:`.faults`: inject a delay and/or an abort or not.
* :mod:`.breaker`: per-cluster circuit-breaker counters.
* :mod:`.outlier`: per-host failure streaks, ejection and return.
* :mod:`.lb`, :mod:`.hashkey`, :mod:`.locality`: balancers, hash keys, locality levels.
* :mod:`.picker`: :class:`EndpointPicker`, which host of a cluster gets a try.

How the shell drives them for one request (one cluster's ``CircuitBreaker`` and
``EndpointPicker`` are long-lived; the rest is per request)::

    retry = RetryState(route.retries, headers)
    limits = deadlines(now, route.timeouts, route.retries, headers)
    fault = faults.decide(route.fault, rng)     # sleep min(delay, limits.remaining(now))
    if fault.abort: answer faults.abort_response(fault.abort)   # flags DI/FI
    if not breaker.try_request(): answer 503 + OVERFLOW_HEADERS  # flag UO
    try:
        while True:
            host = picker.pick(now, rng, key, retry.excluded_hosts(),
                               avoid_excluded_levels=retry.avoid_previous_localities)
            if host is None: answer 503 "no healthy upstream"        # flag UH
            n = retry.start_try(host)   # x-envoy-attempt-count: n
            # x-envoy-expected-rq-timeout-ms: limits.expected_timeout_ms(now)
            # run the try until limits.try_deadline(now), bracketed by
            # picker.request_started(host) / picker.request_finished(host);
            # then picker.report_response(...) or picker.report_local_failure(...)
            decision = retry.decide(outcome, body_held=..., rng=rng)
            if not decision.retry or not breaker.try_retry(): forward the outcome
            # sleep min(decision.backoff, limits.remaining(now)); 504 if expired;
            # breaker.release_retry() once that retry's try is over
    finally:
        breaker.release_request()

and every ``outlier.interval`` seconds: ``picker.sweep(now)``.
"""

from waypoint.resilience.breaker import OVERFLOW_HEADERS, CircuitBreaker
from waypoint.resilience.hosts import Host, Locality
from waypoint.resilience.outlier import LocalFailure
from waypoint.resilience.picker import EndpointPicker
from waypoint.resilience.retry import OutcomeKind, RetryDecision, RetryState, TryOutcome
from waypoint.resilience.timeouts import Deadlines, deadlines

__all__ = [
    "OVERFLOW_HEADERS",
    "CircuitBreaker",
    "Deadlines",
    "EndpointPicker",
    "Host",
    "LocalFailure",
    "Locality",
    "OutcomeKind",
    "RetryDecision",
    "RetryState",
    "TryOutcome",
    "deadlines",
]
