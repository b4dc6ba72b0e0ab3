"""Discovery against the local API server on loopback: the snapshot converges on the objects,
survives the server going away, resumes its watches, and re-lists after a 410."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from common.discovery import Discovery, SnapshotHolder
from common.kube import Backoff, KubeClient, KubeConfig, Namespace, Pod, by_kind
from common.model import Snapshot
from deploy.local.apiserver import Store, serve
from tests.unit.mesh_objects import (
    endpoint,
    endpoint_slice,
    namespace,
    node,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class Server:
    """An API server on a fixed port that a test can stop and start again."""

    def __init__(self, nursery: trio.Nursery, db: Path, retain_events: int = 10_000) -> None:
        self.nursery = nursery
        self.db = db
        self.retain_events = retain_events
        self.port = 0
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            try:
                with self.scope:
                    await serve(self.db, port=self.port, retain_events=self.retain_events,
                                bookmark_interval=0.2, task_status=task_status)
            finally:
                self.stopped.set()

        self.port = await self.nursery.start(run)

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def fast_backoff() -> Backoff:
    return Backoff(base=0.05, cap=0.2)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    srv = Server(nursery, tmp_path / "api.sqlite", retain_events=20)
    await srv.start()
    return srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[KubeClient]:
    async with KubeClient(KubeConfig.for_server(server.url), timeout=5.0) as kube:
        yield kube


async def start_discovery(nursery: trio.Nursery, client: KubeClient) -> SnapshotHolder:
    holder = SnapshotHolder()
    discovery = Discovery(client, holder, debounce=0.01, max_delay=0.1, backoff=fast_backoff)
    with trio.fail_after(10):
        await nursery.start(discovery.run)
    return holder


async def converge(holder: SnapshotHolder, what: str,
                   predicate: Callable[[Snapshot], object]) -> Snapshot:
    try:
        with trio.fail_after(10):
            return await holder.wait_for(lambda s: bool(predicate(s)))
    except trio.TooSlowError:
        pytest.fail(f"the snapshot never showed {what}; last: version "
                    f"{holder.current.version}, pods {sorted(holder.current.workloads_by_uid)}")


async def seed(client: KubeClient) -> None:
    await client.create(namespace("demo", **AMBIENT))
    await client.create(node("node-1", "r1", "z1"))
    await client.create(pod("web-1", ip="10.1.0.5", labels={"app": "web"}))
    await client.create(service("web"))
    await client.create(endpoint_slice("web", [endpoint("10.1.0.5", "web-1")]))


async def test_snapshot_converges_on_created_objects(nursery: trio.Nursery,
                                                     client: KubeClient) -> None:
    await seed(client)
    holder = await start_discovery(nursery, client)
    assert holder.ready.is_set()
    snap = await converge(holder, "the service endpoint",
                          lambda s: "10.96.0.10" in s.services_by_vip
                          and s.services_by_vip["10.96.0.10"].ready_endpoints)
    web = snap.workloads_by_ip["10.1.0.5"]
    assert web.captured and web.locality.zone == "z1"
    assert snap.services_by_vip["10.96.0.10"].ready_endpoints[0].ip == "10.1.0.5"

    # A waypoint appears and the namespace starts using it: services go through it.
    await client.create(waypoint_gateway())
    await client.create(waypoint_pod("waypoint-1", ip="10.1.9.1"))
    await client.patch(Namespace, "demo",
                       {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}})
    snap = await converge(holder, "the service using the waypoint",
                          lambda s: s.services_by_vip["10.96.0.10"].waypoint is not None)
    ref = snap.services_by_vip["10.96.0.10"].waypoint
    assert ref is not None
    assert [e.ip for e in snap.waypoints_by_ref[ref].endpoints] == ["10.1.9.1"]

    await client.delete(Pod, "web-1", "demo")
    await converge(holder, "the pod gone", lambda s: "10.1.0.5" not in s.workloads_by_ip)


async def test_bursts_are_coalesced(nursery: trio.Nursery, client: KubeClient) -> None:
    await client.create(namespace("demo", **AMBIENT))
    holder = await start_discovery(nursery, client)
    start = holder.current.version
    for i in range(30):
        await client.create(pod(f"p{i}", ip=f"10.1.1.{i + 1}"))
    snap = await converge(holder, "30 pods", lambda s: len(s.workloads_by_uid) == 30)
    # 30 events, a handful of snapshots (each write is a round trip of a few ms).
    assert snap.version - start < 30


async def test_last_snapshot_is_served_while_the_server_is_down_and_watches_resume(
        nursery: trio.Nursery, server: Server, client: KubeClient) -> None:
    await seed(client)
    holder = await start_discovery(nursery, client)
    before = await converge(holder, "the seeded pod", lambda s: "10.1.0.5" in s.workloads_by_ip)
    await server.stop()
    # Informers are now failing and backing off; poll the holder for a while: unchanged.
    with trio.move_on_after(0.5):
        await holder.wait_newer(before.version)
    assert holder.current is before or holder.current.workloads_by_ip.keys() == \
        before.workloads_by_ip.keys()
    await server.start()
    await client.create(pod("web-2", ip="10.1.0.6", labels={"app": "web"}))
    snap = await converge(holder, "the pod created after the restart",
                          lambda s: "10.1.0.6" in s.workloads_by_ip)
    assert "10.1.0.5" in snap.workloads_by_ip


async def test_relist_after_410_converges(nursery: trio.Nursery, server: Server,
                                          client: KubeClient) -> None:
    await seed(client)
    holder = await start_discovery(nursery, client)
    await converge(holder, "the seeded pod", lambda s: "10.1.0.5" in s.workloads_by_ip)
    await server.stop()
    # While the server is down, history moves past what it retains (20 events): the
    # informers' resourceVersions are compacted away and they must list again.
    store = Store(server.db, retain_events=server.retain_events)
    pods = by_kind("Pod")
    for i in range(40):
        store.create(pods, pod(f"late-{i}", ip=f"10.1.2.{i + 1}").to_dict())
    store.delete(pods, "demo", "web-1")
    store.close()
    await server.start()
    snap = await converge(holder, "the state written while it was away",
                          lambda s: len(s.workloads_by_uid) == 40
                          and "10.1.0.5" not in s.workloads_by_ip)
    assert {w.name for w in snap.workloads_by_uid.values()} == {f"late-{i}" for i in range(40)}
