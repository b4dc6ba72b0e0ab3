"""A global rate limit on the shared local cluster: two waypoint replicas, one Redis.

The namespace's waypoint (``Mesh`` of test_waypoint_mesh) is scaled to two pods with
``RATELIMIT_REDIS`` pointing at a private redis-server this test runs in the cluster's
fabric namespace (every pod routes there).  An HTTPRoute on ``reviews`` carries a
global limit of 100 requests a minute per ``x-rl-key``; 300 requests from the client
pod, each on its own connection so ztunnel spreads them over both waypoint pods, let
100 +- 2 through; a local limit of 5 holds in each replica (10 of 40); with Redis killed
the global limit's ``failMode: closed`` answers 500.  ztunnel prefers a waypoint pod in
the client's zone, so the requests alternate between two client pods on different nodes
to reach both replicas.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from common.kube import Deployment, HTTPRoute, KubeClient, Pod
from deploy.local.network import FABRIC_GATEWAY, Names
from tests.integration.conftest import LocalCluster, is_ready, wait_for
from tests.integration.redis_support import RedisServer, needs_redis
from tests.integration.test_waypoint_mesh import PORT, Mesh
from tests.integration.ztunnel_support import fabric_get, netns_of, open_from
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow, needs_redis]

POLICY = ("descriptors: [{header: x-rl-key}]\n"
          "global: {requests: 100, window: 60s, failMode: closed}")
LOCAL_POLICY = "local: {maxTokens: 5, fillInterval: 60s}"


@pytest.fixture
async def fabric_redis(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", host=str(FABRIC_GATEWAY),
                         port=20000 + os.getpid() % 10000, netns=Names(cluster.name).fabric)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def _ready_pod(kube: KubeClient, namespace: str, name: str) -> Pod | None:
    pod = await kube.get(Pod, name, namespace)
    return pod if is_ready(pod) else None


async def test_two_waypoint_replicas_share_a_global_limit_through_redis(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        fabric_redis: RedisServer) -> None:
    mesh = await Mesh(cluster, kube, namespace).up()
    dep = await kube.get(Deployment, "waypoint", namespace)
    container = dep.to_dict()["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [*container.get("env", []),
                        {"name": "RATELIMIT_REDIS", "value": fabric_redis.address},
                        {"name": "RATELIMIT_TIMEOUT", "value": "5"}]
    # A merge patch, not GET + PUT: the deployment controller writes the status in
    # between, and the PUT would then fail with 409 Conflict.
    await kube.patch(Deployment, "waypoint", {"spec": {
        "replicas": 2, "template": {"spec": {"containers": [container]}}}}, namespace)

    async def two_new_waypoints() -> list[Pod] | None:
        pods = (await kube.list(Pod, namespace,
                                label_selector="gateway.networking.k8s.io/gateway-name="
                                "waypoint")).items
        fresh = [p for p in pods if is_ready(p) and not p.metadata.deletion_timestamp
                 and any(e.name == "RATELIMIT_REDIS"
                         for e in (p.spec.containers[0].env or []))]
        return fresh if len(fresh) == 2 and len(pods) == 2 else None

    waypoints = await wait_for(two_new_waypoints, 120, interval=0.5,
                               what="two waypoint pods with RATELIMIT_REDIS")
    ips = [str(p.status.pod_ip) for p in waypoints]
    await kube.create(HTTPRoute.model_validate({
        "metadata": {"name": "reviews-limit", "namespace": namespace,
                     "annotations": {"ratelimit.pyambient.io/policy": POLICY}},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews",
                                 "port": PORT}],
                 "rules": [{"backendRefs": [{"name": "reviews", "port": PORT}]}]}}))
    await kube.create(HTTPRoute.model_validate({
        "metadata": {"name": "reviews-local", "namespace": namespace,
                     "annotations": {"ratelimit.pyambient.io/policy": LOCAL_POLICY}},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews",
                                 "port": PORT}],
                 "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/local"}}],
                            "backendRefs": [{"name": "reviews", "port": PORT}]}]}}))
    keys = {f"HTTPRoute/{namespace}/reviews-limit", f"HTTPRoute/{namespace}/reviews-local"}

    async def policy_everywhere() -> bool:
        for ip in ips:
            try:
                dump = json.loads(await fabric_get(cluster, ip, 15000, "/config_dump"))
            except (OSError, ValueError, trio.TooSlowError):
                return False
            if not keys <= set(dump.get("ratelimits", [])):
                return False
        return True

    await wait_for(policy_everywhere, 60, interval=0.5, what="the policy on both replicas")
    await mesh.until(lambda r: r.status == 200, what="reviews answering",
                     headers={"x-rl-key": "warm-up"})
    await kube.create(Pod.model_validate({
        "metadata": {"name": "client2", "namespace": namespace},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "ambient/echo"}]}}))
    client2 = (await wait_for(lambda: _ready_pod(kube, namespace, "client2"), 60,
                              what="client2 ready"))
    assert mesh.client_pod is not None
    sources = [netns_of(mesh.client_pod), netns_of(client2)]

    async def send(i: int, path: str) -> Reply:
        stream = await open_from(sources[i % 2], mesh.vip, PORT)
        with trio.fail_after(10):
            reply = await Client(stream).request(path, host=f"reviews:{PORT}",
                                                 headers={"x-rl-key": "run"})
        await stream.aclose()
        return reply

    statuses: Counter[int] = Counter()
    for i in range(300):
        statuses[(await send(i, "/")).status] += 1
    assert set(statuses) <= {200, 429}, statuses
    assert 98 <= statuses[200] <= 102, statuses
    # Both replicas took part: each counted decisions for the route.
    for ip in ips:
        metrics = await fabric_get(cluster, ip, 15020, "/metrics")
        lines = [ln for ln in metrics.splitlines()
                 if ln.startswith("pyambient_ratelimit_decisions_total")
                 and f'route="HTTPRoute {namespace}/reviews-limit"' in ln]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) > 0, (ip, lines)
    # The local limit holds per replica: 5 tokens in each of the two.
    local: Counter[int] = Counter()
    for i in range(40):
        local[(await send(i, "/local")).status] += 1
    assert local == Counter({200: 10, 429: 30}), local
    # Redis killed: the global limit's failMode (closed) answers 500 on every replica.
    fabric_redis.kill()
    failed = Counter([(await send(i, "/")).status for i in range(6)])
    assert failed == Counter({500: 6}), failed
