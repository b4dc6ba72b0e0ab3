"""Figures for the API server under load; run with ``-s`` to see them.

``pytest -s -m slow tests/integration/test_apiserver_scale.py``
"""

from __future__ import annotations

import functools
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from common.kube import Change, KubeClient, KubeConfig, Namespace, ObjectMeta, Pod, watch_kind
from common.kube.objects import Container, PodSpec
from deploy.local.apiserver import serve

WATCHERS = 50
PODS = 100


def pod(name: str, app: str) -> Pod:
    return Pod(metadata=ObjectMeta(name=name, namespace="demo", labels={"app": app}),
               spec=PodSpec(node_name="node-1", containers=[Container(name="c",
                                                                      image="ambient/echo")]))


@pytest.mark.slow
async def test_create_list_and_fan_out_figures(nursery: trio.Nursery, tmp_path: Path) -> None:
    port = await nursery.start(functools.partial(serve, tmp_path / "db.sqlite"))
    config = KubeConfig.for_server(f"http://127.0.0.1:{port}")
    async with KubeClient(config) as client:
        await client.create(Namespace(metadata=ObjectMeta(name="demo")))
        start = time.perf_counter()
        for i in range(PODS):
            await client.create(pod(f"web-{i}", "web"))
        create_s = time.perf_counter() - start
        start = time.perf_counter()
        listed = await client.list(Pod, "demo")
        list_s = time.perf_counter() - start
        assert len(listed.items) == PODS

        received: dict[str, list[float]] = {}
        synced = [0]
        all_synced = trio.Event()
        all_seen = trio.Event()

        async def watcher(watch_client: KubeClient) -> None:
            async with aclosing(watch_kind(watch_client, Pod, "demo",
                                           label_selector="app=fan")) as events:
                async for event in events:
                    if not isinstance(event, Change):
                        synced[0] += 1
                        if synced[0] == WATCHERS:
                            all_synced.set()
                        continue
                    received.setdefault(event.object.name, []).append(time.perf_counter())
                    if sum(map(len, received.values())) == WATCHERS * PODS:
                        all_seen.set()

        clients = [KubeClient(config) for _ in range(4)]
        sent: dict[str, float] = {}
        async with trio.open_nursery() as watchers:
            for i in range(WATCHERS):
                watchers.start_soon(watcher, clients[i % len(clients)])
            with trio.fail_after(60):
                await all_synced.wait()
                for i in range(PODS):
                    sent[f"fan-{i}"] = time.perf_counter()
                    await client.create(pod(f"fan-{i}", "fan"))
                await all_seen.wait()
            watchers.cancel_scope.cancel()
        for c in clients:
            await c.aclose()
    latency = sorted(max(times) - sent[name] for name, times in received.items())
    assert len(latency) == PODS and all(len(t) == WATCHERS for t in received.values())
    print(f"\ncreate {PODS} pods one by one: {create_s * 1000:.0f} ms "
          f"({PODS / create_s:.0f}/s); list {PODS}: {list_s * 1000:.1f} ms; "
          f"{WATCHERS} informers x {PODS} creates, time until the last informer has the "
          f"event: p50 {latency[PODS // 2] * 1000:.1f} ms, "
          f"p99 {latency[PODS * 99 // 100] * 1000:.1f} ms")
    assert create_s < 30
