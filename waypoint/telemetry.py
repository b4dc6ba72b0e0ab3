"""Request telemetry of the waypoint: Istio's HTTP metrics, the access log, trace headers.

Theory of operation: a request's metric update is a dict hit on its label tuple and
a few list increments (:class:`RequestMetrics`); the Prometheus objects are only
built when a scrape asks (:meth:`RequestMetrics.collect`), because
``prometheus_client``'s ``labels().inc()`` costs microseconds and takes a lock per
call, which on the request path is a measurable share of a proxy's budget.
Cardinality stays bounded as Istio's does: labels name workloads and services,
never pods, and response flags are Envoy's short codes.

Trace context (W3C ``traceparent``, B3 ``x-b3-*``) is propagated with a new span
id for the waypoint's hop, the previous span becoming the parent, as Envoy does.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from common.logging import get_logger

REPORTER = "waypoint"
UNKNOWN = "unknown"

HTTP_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "destination_service", "destination_service_name", "destination_workload",
    "destination_version", "response_code", "response_flags",
)

#: Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                       5000.0, 10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0,
                       3600000.0)
#: Istio's byte-size buckets (exponential, factor 10).
SIZE_BUCKETS = (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
                100000000.0, 1000000000.0)

LabelKey = tuple[str, str, str, str, str, str, str, str, str]
"""Label values without ``reporter`` (fixed), in :data:`HTTP_LABELS` order."""


class _Series:
    """Counts of one label combination."""

    __slots__ = ("count", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self) -> None:
        self.count = 0
        self.dur = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.dur_sum = 0.0
        self.req = [0] * (len(SIZE_BUCKETS) + 1)
        self.req_sum = 0
        self.resp = [0] * (len(SIZE_BUCKETS) + 1)
        self.resp_sum = 0


def _buckets(bounds: tuple[float, ...], counts: list[int], total: float
             ) -> list[tuple[str, float]]:
    out = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((repr(bound), float(running)))
    out.append(("+Inf", float(running + counts[-1])))
    return out


class RequestMetrics(Collector):
    """``istio_requests_total`` and the duration/size histograms, aggregated in dicts."""

    def __init__(self) -> None:
        self._series: dict[LabelKey, _Series] = {}

    def record(self, key: LabelKey, duration_ms: float, request_bytes: int,
               response_bytes: int) -> None:
        """Count one finished request."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.count += 1
        series.dur[bisect.bisect_left(DURATION_BUCKETS_MS, duration_ms)] += 1
        series.dur_sum += duration_ms
        series.req[bisect.bisect_left(SIZE_BUCKETS, request_bytes)] += 1
        series.req_sum += request_bytes
        series.resp[bisect.bisect_left(SIZE_BUCKETS, response_bytes)] += 1
        series.resp_sum += response_bytes

    def total(self, **labels: str) -> int:
        """Requests counted whose labels include ``labels`` (for tests and status pages)."""
        index = {name: i for i, name in enumerate(HTTP_LABELS[1:])}
        return sum(s.count for key, s in self._series.items()
                   if all(key[index[k]] == v for k, v in labels.items()))

    def collect(self) -> Iterator[Any]:
        total = CounterMetricFamily("istio_requests_total", "Requests through the waypoint",
                                    labels=HTTP_LABELS)
        duration = HistogramMetricFamily("istio_request_duration_milliseconds",
                                         "Request duration in milliseconds", labels=HTTP_LABELS)
        req = HistogramMetricFamily("istio_request_bytes", "Request body sizes in bytes",
                                    labels=HTTP_LABELS)
        resp = HistogramMetricFamily("istio_response_bytes", "Response body sizes in bytes",
                                     labels=HTTP_LABELS)
        for key, s in list(self._series.items()):
            values = [REPORTER, *key]
            total.add_metric(values, s.count)
            duration.add_metric(values, _buckets(DURATION_BUCKETS_MS, s.dur, s.dur_sum),
                                s.dur_sum)
            req.add_metric(values, _buckets(SIZE_BUCKETS, s.req, s.req_sum), s.req_sum)
            resp.add_metric(values, _buckets(SIZE_BUCKETS, s.resp, s.resp_sum), s.resp_sum)
        yield total
        yield duration
        yield req
        yield resp

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)


access_log = get_logger("waypoint.access")


def new_span_id() -> str:
    return os.urandom(8).hex()


def new_request_id() -> bytes:
    """A UUID-shaped (version 4 layout) ``x-request-id``, unique per process run: a random
    prefix drawn at start-up and a counter.  An identifier, not a secret, so uniqueness is
    what matters; formatting one counter is several times cheaper than drawing 128 bits."""
    global _request_counter
    _request_counter += 1
    return _REQUEST_PREFIX + b"%012x" % (_request_counter & 0xFFFFFFFFFFFF)


def _request_prefix() -> bytes:
    raw = os.urandom(10).hex()
    variant = "89ab"[int(raw[15], 16) & 3]
    return f"{raw[:8]}-{raw[8:12]}-4{raw[12:15]}-{variant}{raw[16:19]}-".encode()


_REQUEST_PREFIX = _request_prefix()
_request_counter = 0


def propagate_trace(headers: list[tuple[bytes, bytes]]) -> None:
    """Give the waypoint's hop a new span id in ``traceparent`` and B3 headers (in place).

    Only existing contexts are continued; a request without one is not sampled here
    (the mesh has no tracing backend configured by default).
    """
    b3_span: int | None = None
    b3_parent: int | None = None
    for i, (name, value) in enumerate(headers):
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[2]) == 16:
                parts[2] = new_span_id().encode()
                headers[i] = (name, b"-".join(parts))
        elif name == b"x-b3-spanid":
            b3_span = i
        elif name == b"x-b3-parentspanid":
            b3_parent = i
        elif name == b"b3":
            parts = value.split(b"-")
            if len(parts) >= 2:
                old = parts[1]
                parts[1] = new_span_id().encode()
                if len(parts) >= 4:
                    parts[3] = old
                elif len(parts) == 3:
                    parts.append(old)
                else:
                    parts.extend((b"1", old))
                headers[i] = (name, b"-".join(parts))
    if b3_span is not None:
        old_span = headers[b3_span][1]
        headers[b3_span] = (b"x-b3-spanid", new_span_id().encode())
        if b3_parent is not None:
            headers[b3_parent] = (b"x-b3-parentspanid", old_span)
        else:
            headers.append((b"x-b3-parentspanid", old_span))
