"""Per-cluster state across configuration updates (no sockets)."""

from __future__ import annotations

from typing import Any

from waypoint.app import bench_config_from
from waypoint.clusters import Clusters, static_endpoints
from waypoint.upstream import TcpTransport

A, B = "10.1.0.1:8080", "10.1.0.2:8080"


def config(addresses: list[str], outlier: dict[str, Any] | None = None) -> Any:
    objects = []
    if outlier is not None:
        objects.append({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                        "metadata": {"name": "dr"},
                        "spec": {"host": "echo",
                                 "trafficPolicy": {"outlierDetection": outlier}}})
    return bench_config_from({
        "namespace": "default", "objects": objects,
        "services": [{"name": "echo", "ports": [80],
                      "endpoints": [{"address": a} for a in addresses]}]})


async def test_update_keeps_host_state_and_follows_endpoint_changes() -> None:
    outlier = {"consecutive5xxErrors": 2, "maxEjectionPercent": 100}
    first = config([A, B], outlier)
    clusters = Clusters(TcpTransport())
    await clusters.update(first.table, static_endpoints(first.endpoints))
    (name,) = first.table.clusters
    state = clusters.by_name[name]
    breaker = state.breaker
    host_a = next(h for h in state.picker.hosts if h.address == A)
    for _ in range(2):
        state.picker.report_response(host_a, 503, 1.0)
    assert host_a.ejected
    second = config([A, B, "10.1.0.3:8080"], outlier)
    await clusters.update(second.table, static_endpoints(second.endpoints))
    assert clusters.by_name[name] is state and state.breaker is breaker
    assert sorted(state.endpoints) == [A, B, "10.1.0.3:8080"]
    assert next(h for h in state.picker.hosts if h.address == A) is host_a  # still ejected
    third = config([B], outlier)
    await clusters.update(third.table, static_endpoints(third.endpoints))
    assert [h.address for h in state.picker.hosts] == [B]


async def test_changed_limits_apply_to_the_live_breaker() -> None:
    first = config([A])
    clusters = Clusters(TcpTransport())
    await clusters.update(first.table, static_endpoints(first.endpoints))
    (name,) = first.table.clusters
    breaker = clusters.by_name[name].breaker
    limited = bench_config_from({
        "namespace": "default",
        "services": [{"name": "echo", "ports": [80], "endpoints": [{"address": A}]}],
        "objects": [{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                     "metadata": {"name": "dr"},
                     "spec": {"host": "echo", "trafficPolicy": {"connectionPool": {
                         "tcp": {"maxConnections": 1}}}}}]})
    await clusters.update(limited.table, static_endpoints(limited.endpoints))
    assert clusters.by_name[name].breaker is breaker
    assert breaker.settings.max_connections == 1


async def test_vanished_cluster_is_dropped() -> None:
    first = config([A])
    clusters = Clusters(TcpTransport())
    await clusters.update(first.table, static_endpoints(first.endpoints))
    empty = bench_config_from({"namespace": "default", "services": []})
    await clusters.update(empty.table, static_endpoints(empty.endpoints))
    assert clusters.by_name == {}
