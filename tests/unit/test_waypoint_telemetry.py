"""Istio HTTP metrics, trace propagation and request ids of the waypoint."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.waypoint_helpers import FakeBackend, Harness
from waypoint.proxy import PeerInfo
from waypoint.telemetry import RequestMetrics, new_request_id, propagate_trace

A = "10.1.0.1:8080"
KEY = ("sleep", "default", "spiffe://cluster.local/ns/default/sa/sleep",
       "reviews.default.svc.cluster.local", "reviews", "reviews", "v1", "200", "-")


def test_metrics_render_with_istio_names_and_labels() -> None:
    metrics = RequestMetrics()
    metrics.record(KEY, 3.0, 0, 120)
    metrics.record(KEY, 700.0, 10, 120)
    registry = CollectorRegistry()
    metrics.register(registry)
    text = generate_latest(registry).decode()
    assert ('istio_requests_total{destination_service="reviews.default.svc.cluster.local",'
            in text)
    line = next(ln for ln in text.splitlines() if ln.startswith("istio_requests_total{"))
    for label in ('reporter="waypoint"', 'source_workload="sleep"', 'response_code="200"',
                  'destination_version="v1"', 'response_flags="-"',
                  'source_principal="spiffe://cluster.local/ns/default/sa/sleep"'):
        assert label in line
    assert line.endswith(" 2.0")
    assert 'istio_request_duration_milliseconds_bucket{' in text
    bucket_5 = next(ln for ln in text.splitlines()
                    if ln.startswith("istio_request_duration_milliseconds_bucket")
                    and 'le="5.0"' in ln)
    assert bucket_5.endswith(" 1.0")
    assert "istio_request_bytes_sum" in text and "istio_response_bytes_sum" in text


def test_traceparent_keeps_the_trace_and_gets_a_new_span() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = [(b"traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode()),
               (b"x-b3-traceid", trace.encode()), (b"x-b3-spanid", b"00f067aa0ba902b7")]
    propagate_trace(headers)
    parts = dict(headers)[b"traceparent"].split(b"-")
    assert parts[1].decode() == trace and parts[3] == b"01"
    assert parts[2] != b"00f067aa0ba902b7" and len(parts[2]) == 16
    got = dict(headers)
    assert got[b"x-b3-parentspanid"] == b"00f067aa0ba902b7"
    assert got[b"x-b3-spanid"] != b"00f067aa0ba902b7"


def test_single_b3_header_moves_the_span_to_parent() -> None:
    headers = [(b"b3", b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]
    propagate_trace(headers)
    trace, span, sampled, parent = headers[0][1].split(b"-")
    assert trace == b"80f198ee56343ba864fe8b2a57d3eff7" and sampled == b"1"
    assert parent == b"e457b5a2e4d86bd1" and span != parent


def test_request_ids_are_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i.decode()).version == 4 for i in ids)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_request_is_counted_with_source_and_destination(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    doc = {"services": [{"name": "echo", "ports": [80],
                         "endpoints": [{"address": A,
                                        "labels": {"app": "echo", "version": "v3"}}]}]}
    h = await Harness(nursery, doc, {A: backend}).start()
    peer = PeerInfo(source_ip="10.0.0.9", source_workload="sleep", source_namespace="default")
    reply = await h.client(peer).request("/", headers={"traceparent":
                                                       "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    assert reply.status == 200
    assert h.waypoint.metrics.total(source_workload="sleep", destination_version="v3",
                                    destination_workload="echo", response_code="200",
                                    destination_service_name="echo") == 1
    sent = backend.seen[0].header("traceparent")
    assert sent is not None and sent.startswith("00-" + "a" * 32) and "b" * 16 not in sent
