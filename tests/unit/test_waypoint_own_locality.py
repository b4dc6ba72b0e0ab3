"""The waypoint ranks endpoints from its own locality once discovery tells it (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

from waypoint.app import BenchConfig, bench_config_from
from waypoint.clusters import Clusters, static_endpoints
from waypoint.resilience import Locality
from waypoint.upstream import TcpTransport

NEAR, FAR = "10.1.0.1:8080", "10.2.0.1:8080"


def _config() -> BenchConfig:
    return bench_config_from({
        "namespace": "default",
        "services": [{"name": "echo", "ports": [80], "endpoints": [
            {"address": NEAR, "locality": "region1/zone-a"},
            {"address": FAR, "locality": "region1/zone-b"}]}],
        "objects": [{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                     "metadata": {"name": "dr"},
                     "spec": {"host": "echo", "trafficPolicy": {
                         "outlierDetection": {"consecutive5xxErrors": 2}}}}]})


async def test_learning_its_locality_moves_picks_to_the_near_zone() -> None:
    config = _config()
    clusters = Clusters(TcpTransport())
    await clusters.update(config.table, static_endpoints(config.endpoints))
    (state,) = clusters.by_name.values()
    rng = random.Random(1)

    def picks() -> Counter[str]:
        return Counter(str(h.address) for h in
                       (state.picker.pick(0.0, rng) for _ in range(200)) if h is not None)

    # Locality unknown: no "near", both zones share the load.
    assert set(picks()) == {NEAR, FAR}
    clusters.set_client(Locality("region1", "zone-a"), {})
    # The existing cluster re-ranked its hosts: everything stays in zone-a.
    assert picks() == Counter({NEAR: 200})
    # Same locality again is a no-op (host state is kept).
    picker = state.picker
    clusters.set_client(Locality("region1", "zone-a"), {})
    assert state.picker is picker
    # Clusters created later start with the known locality.
    again = Clusters(TcpTransport())
    again.set_client(Locality("region1", "zone-b"), {})
    await again.update(config.table, static_endpoints(config.endpoints))
    (later,) = again.by_name.values()
    assert {str(h.address) for h in (later.picker.pick(0.0, rng) for _ in range(50))
            if h is not None} == {FAR}
