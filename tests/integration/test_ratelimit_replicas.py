"""Rate limits across two waypoint replicas (separate processes) sharing one Redis.

Layout: an echo backend on loopback, a private redis-server, and two ``waypoint``
processes in bench mode (plain HTTP in, the same route objects, annotated with
``ratelimit.pyambient.io/policy``) both pointed at that Redis.  Requests alternate
between the replicas, as a Service would spread them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from deploy.local import echo
from tests.integration.redis_support import RedisServer, free_port, needs_redis
from tests.unit.waypoint_helpers import Client

pytestmark = [pytest.mark.slow, needs_redis]


def _route(name: str, prefix: str, policy: str) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "annotations": {"ratelimit.pyambient.io/policy": policy}},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend"}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                                "backendRefs": [{"name": "backend", "port": 80}]}]}}


OBJECTS = [
    _route("global", "/global", "global: {requests: 100, window: 60s}"),
    _route("local", "/local", "local: {maxTokens: 10, fillInterval: 60s}"),
    _route("open", "/open", "global: {requests: 1000, failMode: open}"),
    _route("closed", "/closed", "global: {requests: 1000, failMode: closed}"),
]


class Replicas:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.clients: list[Client] = []

    async def connect(self) -> Replicas:
        # Every replica up first: a connection left silent too long is taken for a
        # server-first protocol by the waypoint's sniffer and closed.
        for port in self.ports:
            # Generous: a waypoint process imports everything before it listens, which
            # takes many seconds on a loaded 2-core machine.
            with trio.fail_after(60):
                while True:
                    try:
                        probe = await trio.open_tcp_stream("127.0.0.1", port)
                        await probe.aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
        for port in self.ports:
            self.clients.append(Client(await trio.open_tcp_stream("127.0.0.1", port)))
        return self

    async def statuses(self, path: str, n: int) -> tuple[Counter[int], list[dict[str, str]]]:
        counts: Counter[int] = Counter()
        limited: list[dict[str, str]] = []
        for i in range(n):
            reply = await self.clients[i % len(self.clients)].request(path, host="backend")
            counts[reply.status] += 1
            if reply.status == 429:
                limited.append(reply.headers)
        return counts, limited


def _spawn_waypoint(config: Path, port: int, redis: str, logs: Path) -> subprocess.Popen[bytes]:
    with open(logs / f"waypoint-{port}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "waypoint", "--name", "wp", "--namespace", "bench",
             "--bench-config", str(config), "--bench-listen", f"127.0.0.1:{port}",
             "--ratelimit-redis", redis, "--ratelimit-timeout", "5", "--no-access-log"],
            stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def replicas(tmp_path: Path, redis: RedisServer, nursery: trio.Nursery
                   ) -> AsyncIterator[Replicas]:
    server = echo.Server(echo.Identity(pod="backend", namespace="bench", service_account="default",
                                       node="local"))
    (echo_port,) = await nursery.start(echo.serve, [0], server, "127.0.0.1")
    config = {"namespace": "bench", "destination": "10.96.0.1:80",
              "services": [{"name": "backend", "ports": [80], "vips": ["10.96.0.1"],
                            "endpoints": [{"address": f"127.0.0.1:{echo_port}"}]}],
              "objects": OBJECTS}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(config))
    ports = [free_port(), free_port()]
    procs = [_spawn_waypoint(path, port, redis.address, tmp_path) for port in ports]
    try:
        yield await Replicas(ports).connect()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def test_two_replicas_share_a_global_limit_of_100_per_minute(replicas: Replicas) -> None:
    counts, limited = await replicas.statuses("/global", 300)
    assert set(counts) <= {200, 429}, counts
    assert 98 <= counts[200] <= 102, counts
    last = limited[-1]
    assert last["x-ratelimit-limit"] == "100" and last["x-ratelimit-remaining"] == "0"
    assert 0 < int(last["x-ratelimit-reset"]) <= 60


async def test_local_limit_holds_per_replica(replicas: Replicas) -> None:
    counts, limited = await replicas.statuses("/local", 60)
    # 10 tokens in each of the two replicas; the 60-second fill cannot come in between.
    assert counts == Counter({200: 20, 429: 40}), counts
    assert limited[0]["x-ratelimit-limit"] == "10"


async def test_killing_redis_triggers_each_fail_mode(replicas: Replicas,
                                                     redis: RedisServer) -> None:
    assert (await replicas.statuses("/closed", 2))[0] == Counter({200: 2})
    redis.kill()
    assert (await replicas.statuses("/open", 4))[0] == Counter({200: 4})
    assert (await replicas.statuses("/closed", 4))[0] == Counter({500: 4})
