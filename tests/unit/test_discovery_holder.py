"""SnapshotHolder waits and the publisher's debounce, on trio's MockClock (no API server)."""

from __future__ import annotations

import itertools
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing

from common.discovery import Discovery, SnapshotHolder
from common.kube import Change, KubeClient, KubeConfig, Resync
from common.model import Snapshot
from tests.unit.mesh_objects import pod


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_holder_waiters_see_newer_snapshots_and_subscribers_skip_to_the_newest() -> None:
    holder = SnapshotHolder()
    assert holder.current.version == 0 and not holder.ready.is_set()
    seen: list[int] = []

    async def follow() -> None:
        async for snap in holder.subscribe():
            seen.append(snap.version)
            if snap.version >= 3:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        holder.publish(Snapshot(version=1))
        await trio.testing.wait_all_tasks_blocked()
        holder.publish(Snapshot(version=2))
        holder.publish(Snapshot(version=3))  # 2 is superseded before the reader wakes
    assert seen == [0, 1, 3]
    assert holder.ready.is_set()
    with trio.fail_after(1):
        assert (await holder.wait_newer(2)).version == 3
        assert (await holder.wait_for(lambda s: s.version == 3)).version == 3


def offline_discovery(debounce: float, max_delay: float) -> Discovery:
    """A Discovery whose informers are driven by hand (the publisher is the part under test)."""
    return Discovery(cast(KubeClient, None), kinds=("Pod",), debounce=debounce,
                     max_delay=max_delay)


def feed(discovery: Discovery, event: Any) -> None:
    discovery.caches["Pod"].apply(event)
    discovery.translator.apply("Pod", event)
    discovery._listed.add("Pod")
    discovery._wake.set()


async def test_publisher_waits_for_the_first_list_then_debounces_and_bounds_bursts(
        autojump_clock: trio.testing.MockClock) -> None:
    discovery = offline_discovery(debounce=0.02, max_delay=0.25)
    holder = discovery.holder
    versions: list[tuple[float, int]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(discovery._publish_loop)
        await trio.sleep(1)
        assert not holder.ready.is_set()  # nothing listed yet: nothing published
        feed(discovery, Resync([pod("a")], "1"))
        with trio.fail_after(1):
            await holder.ready.wait()
        assert holder.current.version == 1
        # A second of events 10 ms apart: never quiet for 20 ms, so only max_delay publishes.
        start = trio.current_time()
        for i in range(100):
            feed(discovery, Change("ADDED", pod(f"p{i}", ip=f"10.1.1.{i + 1}")))
            await trio.sleep(0.01)
            if holder.current.version != (versions[-1][1] if versions else 1):
                versions.append((trio.current_time() - start, holder.current.version))
        with trio.fail_after(1):
            await holder.wait_for(lambda s: len(s.workloads_by_uid) == 101)
        nursery.cancel_scope.cancel()
    assert 3 <= len(versions) <= 5, versions
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(versions)]
    assert all(gap <= 0.25 + 0.02 for gap in gaps), gaps


async def test_a_relist_with_nothing_new_publishes_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    discovery = offline_discovery(debounce=0.02, max_delay=0.25)
    objects = [pod("a")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(discovery._publish_loop)
        feed(discovery, Resync(objects, "1"))
        await discovery.holder.ready.wait()
        first = discovery.holder.current
        feed(discovery, Resync(objects, "1"))
        await trio.sleep(1)
        assert discovery.holder.current is first
        nursery.cancel_scope.cancel()


def fake_api_without_istio_crds(pods: list[dict[str, Any]]) -> httpx.MockTransport:
    """Core kinds and the Gateway API are served; the Istio groups are not (404)."""
    served = {"/api/v1": ["namespaces", "nodes", "pods", "services"],
              "/apis/discovery.k8s.io/v1": ["endpointslices"],
              "/apis/gateway.networking.k8s.io/v1": ["gateways", "httproutes"]}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in served:
            return httpx.Response(200, json={"kind": "APIResourceList", "resources": [
                {"name": name} for name in served[path]]})
        base, _, plural = path.rpartition("/")
        if base not in served:
            return httpx.Response(404, json={"kind": "Status", "code": 404,
                                             "reason": "NotFound", "message": "not found"})
        if request.url.params.get("watch"):
            return httpx.Response(200, content=b"")  # the watch ends at once: backoff
        items = pods if plural == "pods" else []
        return httpx.Response(200, json={"items": items, "metadata": {"resourceVersion": "7"}})

    return httpx.MockTransport(handle)


async def test_kinds_whose_crd_is_missing_do_not_block_readiness(
        autojump_clock: trio.testing.MockClock) -> None:
    transport = fake_api_without_istio_crds([pod("a").to_dict()])
    async with KubeClient(KubeConfig.for_server("http://api.invalid"),
                          transport=transport) as client:
        discovery = Discovery(client)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(discovery.run)
            snap = discovery.holder.current
            assert [w.name for w in snap.workloads_by_uid.values()] == ["a"]
            assert snap.virtual_services == () and len(snap.ztunnel_policies) == 0
            nursery.cancel_scope.cancel()
