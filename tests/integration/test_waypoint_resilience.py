"""The waypoint's resilience features on the shared local cluster (issue 6 scenarios).

Same layout as test_waypoint_mesh: a waypoint for the namespace, reviews v1/v2 echo
deployments, a client pod; traffic client -> ztunnel -> waypoint -> ztunnel -> echo.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from common.kube import KubeClient
from tests.integration.conftest import LocalCluster
from tests.integration.test_waypoint_mesh import DR, Mesh, to, vs

pytestmark = [pytest.mark.netns, pytest.mark.slow]


async def test_retries_timeouts_and_fault_injection(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    await mesh.apply(DR, vs([
        {"match": [{"uri": {"prefix": "/slow"}}], "timeout": "0.5s", "route": [to("v1")]},
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}},
         "route": [to("v1")]},
        {"retries": {"attempts": 3, "retryOn": "5xx"}, "route": [to("v1"), ]}]))
    await mesh.until(lambda r: r.status == 500, headers={"end-user": "jason"},
                     what="the fault route in force")
    # Retries: a backend failing 25 % behind attempts: 3 (4 tries: 99.6 % expected).
    client = await mesh.connect()
    statuses: Counter[int] = Counter()
    for _ in range(500):
        statuses[(await mesh.get("/flaky?fail=25", client=client)).status] += 1
    assert statuses[200] >= 495, statuses
    # Timeouts: ?delay=2s under a 500 ms route timeout -> 504 in under 600 ms.
    start = trio.current_time()
    reply = await mesh.get("/slow?delay=2s")
    elapsed = trio.current_time() - start
    assert reply.status == 504 and reply.body == b"upstream request timeout"
    assert elapsed < 0.6, elapsed
    # Fault injection: abort for end-user jason only, never reaching the backend.
    jason = await mesh.get("/", headers={"end-user": "jason"})
    assert jason.status == 500 and jason.body == b"fault filter abort"
    assert (await mesh.get("/")).status == 200


async def test_circuit_breaking_istio_sample(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    breaker: dict[str, Any] = {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {"host": "reviews", "subsets": DR["spec"]["subsets"],
                 "trafficPolicy": {"connectionPool": {
                     "tcp": {"maxConnections": 1},
                     "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}}}
    await mesh.apply(breaker, vs([{"retries": {"attempts": 0}, "route": [to("v1")]}]))

    async def overflows() -> bool:
        results: list[tuple[int, str | None]] = []

        async def one_client() -> None:
            client = await mesh.connect()
            for _ in range(30):
                reply = await mesh.get("/get?delay=20ms", client=client)
                results.append((reply.status, reply.headers.get("x-envoy-overloaded")))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one_client)
        statuses = Counter(status for status, _ in results)
        assert set(statuses) <= {200, 503}, statuses
        assert all(flag == "true" for status, flag in results if status == 503)
        return statuses[503] > 0 and statuses[200] > 0

    # The DestinationRule reaches the waypoint through discovery: retry until it is in force.
    with trio.fail_after(60):
        while not await overflows():  # noqa: ASYNC110 -- polls the cluster, bounded
            await trio.sleep(0.5)
