"""The local API server over real loopback HTTP, driven by the project's own client."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from common.errors import KubeApiError, ResourceExpiredError
from common.kube import (
    Backoff,
    Change,
    Deployment,
    KubeClient,
    KubeConfig,
    Namespace,
    ObjectMeta,
    Pod,
    Resync,
    Service,
    by_kind,
    watch_kind,
)
from common.kube.objects import Container, PodSpec, PodStatus
from deploy.local.apiserver import Store, serve
from deploy.local.apiserver import server as server_module

PODS = by_kind("Pod")


class Server:
    """An API server on a fixed port that a test can stop and start again."""

    def __init__(self, nursery: trio.Nursery, db: Path, retain_events: int = 10_000) -> None:
        self.nursery = nursery
        self.db = db
        self.retain_events = retain_events
        self.port = 0
        self.scope: trio.CancelScope | None = None
        self.stopped = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            assert self.scope is not None
            try:
                with self.scope:
                    await serve(self.db, port=self.port, retain_events=self.retain_events,
                                bookmark_interval=0.2, task_status=task_status)
            finally:
                self.stopped.set()

        self.port = await self.nursery.start(run)

    async def stop(self) -> None:
        """Stop serving and wait until the port and the database are released."""
        assert self.scope is not None
        self.scope.cancel()
        await self.stopped.wait()


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    srv = Server(nursery, tmp_path / "api.sqlite")
    await srv.start()
    return srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[KubeClient]:
    async with KubeClient(KubeConfig.for_server(server.url)) as kube:
        yield kube


def pod(name: str, namespace: str = "demo", labels: dict[str, str] | None = None,
        node: str = "node-1") -> Pod:
    return Pod(metadata=ObjectMeta(name=name, namespace=namespace, labels=labels or {}),
               spec=PodSpec(node_name=node, containers=[Container(name="app",
                                                                  image="ambient/echo")]))


async def make_namespace(client: KubeClient, name: str = "demo") -> None:
    await client.create(Namespace(metadata=ObjectMeta(name=name)))


async def test_create_get_list_delete_round_trip(client: KubeClient) -> None:
    await make_namespace(client)
    created = await client.create(pod("web-1", labels={"app": "web"}))
    assert created.metadata.uid and created.metadata.resource_version
    assert created.metadata.creation_timestamp and created.metadata.generation == 1
    fetched = await client.get(Pod, "web-1", "demo")
    assert fetched.spec.node_name == "node-1"
    assert fetched.metadata.uid == created.metadata.uid
    listed = await client.list(Pod, "demo")
    assert [p.name for p in listed.items] == ["web-1"]
    assert int(listed.resource_version) >= int(created.metadata.resource_version or 0)
    deleted = await client.delete(Pod, "web-1", "demo")
    assert deleted is not None and deleted.name == "web-1"
    with pytest.raises(KubeApiError) as err:
        await client.get(Pod, "web-1", "demo")
    assert err.value.code == 404 and err.value.reason == "NotFound"


async def test_unknown_fields_survive_update(client: KubeClient) -> None:
    await make_namespace(client)
    raw = pod("web-1").to_dict()
    raw["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
    raw["spec"]["tolerations"] = [{"key": "k", "operator": "Exists"}]
    await client.request("POST", PODS.collection_path("demo"), body=raw)
    current = await client.get(Pod, "web-1", "demo")
    current.metadata.labels["touched"] = "yes"
    updated = await client.update(current)
    stored = await client.request("GET", PODS.object_path("web-1", "demo"))
    assert updated.metadata.labels == {"touched": "yes"}
    assert stored["spec"]["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert stored["spec"]["containers"][0]["resources"] == {"limits": {"cpu": "1"}}


async def test_stale_update_conflicts_with_409(client: KubeClient) -> None:
    await make_namespace(client)
    first = await client.create(pod("web-1"))
    first.metadata.labels["a"] = "1"
    await client.update(first)
    first.metadata.labels["a"] = "2"  # still carries the old resourceVersion
    with pytest.raises(KubeApiError) as err:
        await client.update(first)
    assert err.value.code == 409 and err.value.reason == "Conflict"


async def test_label_and_field_selectors_filter_lists(client: KubeClient) -> None:
    await make_namespace(client)
    await client.create(pod("a", labels={"app": "web", "version": "v1"}))
    await client.create(pod("b", labels={"app": "web", "version": "v2"}, node="node-2"))
    await client.create(pod("c", labels={"app": "db"}))

    async def names(selector: str | None = None, fields: str | None = None) -> list[str]:
        listed = await client.list(Pod, label_selector=selector, field_selector=fields)
        return [p.name for p in listed.items]

    assert await names("app=web") == ["a", "b"]
    assert await names("app==web,version!=v1") == ["b"]
    assert await names("version in (v1, v2)") == ["a", "b"]
    assert await names("version notin (v1)") == ["b", "c"]
    assert await names("version") == ["a", "b"]
    assert await names("!version") == ["c"]
    assert await names(fields="spec.nodeName=node-2") == ["b"]
    assert await names("app=web", "metadata.name!=a") == ["b"]


async def test_status_subresource_updates_only_status(client: KubeClient) -> None:
    await make_namespace(client)
    await client.create(pod("web-1"))
    await client.patch(Pod, "web-1", {"status": {"phase": "Running", "podIP": "10.1.0.5"},
                                      "metadata": {"labels": {"ignored": "x"}}}, "demo",
                       status=True)
    current = await client.get(Pod, "web-1", "demo")
    assert current.status.phase == "Running" and current.status.pod_ip == "10.1.0.5"
    assert "ignored" not in current.metadata.labels
    current.status = PodStatus(phase="Failed")
    current.metadata.labels["kept"] = "y"
    await client.update(current)  # the main resource ignores status
    again = await client.get(Pod, "web-1", "demo")
    assert again.status.phase == "Running" and again.metadata.labels == {"kept": "y"}


async def test_errors_are_kubernetes_status_objects(client: KubeClient) -> None:
    await make_namespace(client)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/api/v1/namespaces/demo/pods", b"{not json", 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/demo/widgets", None, 404, "NotFound"),
        ("POST", "/api/v1/namespaces/absent/pods", pod("x", "absent").to_dict(), 404, "NotFound"),
        ("POST", "/api/v1/namespaces/demo/pods", pod("Bad_Name").to_dict(), 422, "Invalid"),
        ("POST", "/api/v1/namespaces/demo/pods", {"apiVersion": "v1", "kind": "Pod",
                                                   "metadata": {}}, 422, "Invalid"),
        ("POST", "/api/v1/namespaces/demo/pods", {"apiVersion": "v1", "kind": "Service",
                                                   "metadata": {"name": "x"}}, 400, "BadRequest"),
    ]
    for method, path, body, code, reason in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client._http.request(method, path, content=content if body else None)
        status = response.json()
        assert (response.status_code, status["kind"], status["status"], status["code"],
                status["reason"]) == (code, "Status", "Failure", code, reason), (path, status)
    invalid = (await client._http.post("/api/v1/namespaces/demo/pods",
                                       json=pod("Bad_Name").to_dict())).json()
    assert invalid["details"]["causes"][0]["field"] == "metadata.name"


async def test_generate_name_and_namespace_cascade(client: KubeClient) -> None:
    await make_namespace(client)
    made = await client.create(Pod(metadata=ObjectMeta(generate_name="web-", namespace="demo")))
    assert made.name.startswith("web-") and len(made.name) == len("web-") + 5
    await client.create(Service(metadata=ObjectMeta(name="web", namespace="demo")))
    await client.delete(Namespace, "demo")
    assert (await client.list(Pod)).items == []
    assert (await client.list(Service)).items == []


async def test_watch_streams_changes_and_bookmarks(client: KubeClient) -> None:
    await make_namespace(client)
    start = (await client.list(Pod, "demo")).resource_version
    seen: list[tuple[str, str | None]] = []
    with trio.fail_after(5):
        async with aclosing(client.watch(PODS, namespace="demo", resource_version=start)) as ev:
            await client.create(pod("web-1"))
            await client.patch(Pod, "web-1", {"metadata": {"labels": {"v": "2"}}}, "demo")
            await client.delete(Pod, "web-1", "demo")
            async for event in ev:
                seen.append((event.type, event.object["metadata"].get("name")))
                if event.type == "BOOKMARK":
                    bookmark_rv = int(event.resource_version or 0)
                    break
    assert seen[:3] == [("ADDED", "web-1"), ("MODIFIED", "web-1"), ("DELETED", "web-1")]
    assert bookmark_rv > int(start)


async def test_selector_watch_sees_objects_leave_and_enter(client: KubeClient) -> None:
    await make_namespace(client)
    await client.create(pod("web-1", labels={"app": "web"}))
    start = (await client.list(Pod)).resource_version
    seen: list[str] = []
    with trio.fail_after(5):
        async with aclosing(client.watch(PODS, resource_version=start, label_selector="app=web",
                                         allow_bookmarks=False)) as ev:
            await client.patch(Pod, "web-1", {"metadata": {"labels": {"app": "db"}}}, "demo")
            await client.patch(Pod, "web-1", {"metadata": {"labels": {"app": "web"}}}, "demo")
            async for event in ev:
                seen.append(event.type)
                if len(seen) == 2:
                    break
    assert seen == ["DELETED", "ADDED"]


async def test_watch_from_compacted_version_gets_410_error_event(nursery: trio.Nursery,
                                                                 tmp_path: Path) -> None:
    srv = Server(nursery, tmp_path / "api.sqlite", retain_events=3)
    await srv.start()
    async with KubeClient(KubeConfig.for_server(srv.url)) as client:
        await make_namespace(client)
        for i in range(6):
            await client.create(pod(f"p{i}"))
        response = await client._http.get(PODS.collection_path("demo"),
                                           params={"watch": "1", "resourceVersion": "1"})
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert response.status_code == 200
        assert lines[0]["type"] == "ERROR" and lines[0]["object"]["code"] == 410
        assert lines[0]["object"]["reason"] == "Expired"
        with pytest.raises(ResourceExpiredError), trio.fail_after(5):
            async for _ in client.watch(PODS, namespace="demo", resource_version="1"):
                pass


class Collector:
    """Runs an informer and records what it yields; tests wait on it without polling."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.events: list[Resync[Pod] | Change[Pod]] = []
        self._changed = trio.Event()

    async def run(self) -> None:
        backoff = Backoff(base=0.02, cap=0.2)
        async with aclosing(watch_kind(self.client, Pod, backoff=backoff)) as events:
            async for event in events:
                self.events.append(event)
                self._changed.set()
                self._changed = trio.Event()

    async def until(self, predicate: Any) -> None:
        with trio.fail_after(10):
            while not predicate(self.events):
                await self._changed.wait()


async def test_informer_survives_restart_without_resync(nursery: trio.Nursery,
                                                        server: Server) -> None:
    async with KubeClient(KubeConfig.for_server(server.url)) as client:
        await make_namespace(client)
        await client.create(pod("before"))
        collector = Collector(client)
        events = collector.events
        nursery.start_soon(collector.run)
        await collector.until(lambda e: len(e) == 1)
        first = events[0]
        assert isinstance(first, Resync) and [p.name for p in first.objects] == ["before"]
        await server.stop()
        await server.start()
        await client.create(pod("after"))
        await collector.until(lambda evs: any(
            isinstance(e, Change) and e.object.name == "after" for e in evs))
        assert sum(isinstance(e, Resync) for e in events) == 1
        changes = [(e.type, e.object.name) for e in events if isinstance(e, Change)]
        assert changes == [("ADDED", "after")]


async def test_informer_relists_after_compaction(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = Server(nursery, tmp_path / "api.sqlite", retain_events=3)
    await srv.start()
    async with KubeClient(KubeConfig.for_server(srv.url)) as client:
        await make_namespace(client)
        await client.create(pod("p0"))
        collector = Collector(client)
        events = collector.events
        nursery.start_soon(collector.run)
        await collector.until(lambda e: len(e) == 1)
        await srv.stop()
        # While the server is down, history moves past what it retains.
        store = Store(srv.db, retain_events=3)
        for i in range(1, 6):
            obj = pod(f"p{i}").to_dict()
            store.create(PODS, obj)
        store.close()
        await srv.start()
        await collector.until(lambda evs: sum(isinstance(e, Resync) for e in evs) == 2)
        last = [e for e in events if isinstance(e, Resync)][-1]
        assert sorted(p.name for p in last.objects) == [f"p{i}" for i in range(6)]


async def test_informer_waits_with_backoff_while_server_is_down(nursery: trio.Nursery,
                                                                server: Server) -> None:
    async with KubeClient(KubeConfig.for_server(server.url)) as client:
        collector = Collector(client)
        events = collector.events
        nursery.start_soon(collector.run)
        await collector.until(lambda e: len(e) == 1)
        await server.stop()
        await trio.sleep(0.5)  # a stretch of downtime; the informer must not spin or yield
        assert len(events) == 1
        await server.start()
        await make_namespace(client)
        await client.create(pod("back"))
        await collector.until(lambda e: len(e) == 2)
        assert isinstance(events[1], Change) and events[1].object.name == "back"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
async def test_kubectl_get_pods_lists_pod_names(client: KubeClient, server: Server,
                                                tmp_path: Path) -> None:
    await make_namespace(client)
    await make_namespace(client, "other")
    await client.create(pod("web-1"))
    await client.create(pod("db-1", namespace="other"))
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")}
    kubectl = ["kubectl", "--server", server.url]
    with trio.fail_after(30):
        result = await trio.run_process([*kubectl, "get", "pods", "-A"], capture_stdout=True,
                                        capture_stderr=True, env=env, check=False)
        namespaces = await trio.run_process([*kubectl, "get", "ns"], capture_stdout=True,
                                            capture_stderr=True, env=env, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    header = out.splitlines()[0].split()
    assert header[:3] == ["NAMESPACE", "NAME", "READY"]
    assert "web-1" in out and "db-1" in out and "other" in out
    assert namespaces.returncode == 0 and "demo" in namespaces.stdout.decode()


async def test_watch_outlives_the_keepalive_idle_timeout(client: KubeClient,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 0.3)
    start = trio.current_time()
    bookmarks = 0
    with trio.fail_after(5):
        async with aclosing(client.watch(PODS, resource_version="0")) as events:
            async for event in events:
                bookmarks += event.type == "BOOKMARK"
                if trio.current_time() - start > 1.0:
                    break
    assert bookmarks >= 3  # every 0.2 s, well past the 0.3 s idle timeout


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
async def test_kubectl_apply_creates_then_configures(client: KubeClient, server: Server,
                                                     tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    text = ("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n"
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n"
            "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    manifest.write_text(text)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")}
    outputs = []
    with trio.fail_after(60):
        for content in (text, text.replace("port: 80,", "port: 81,")):
            manifest.write_text(content)
            result = await trio.run_process(
                ["kubectl", "--server", server.url, "apply", "-f", str(manifest)],
                capture_stdout=True, capture_stderr=True, env=env, check=False)
            assert result.returncode == 0, result.stderr.decode()
            outputs.append(result.stdout.decode().splitlines())
    assert outputs == [["namespace/demo created", "service/web created"],
                       ["namespace/demo unchanged", "service/web configured"]]
    svc = await client.get(Service, "web", "demo")
    assert [p.port for p in svc.spec.ports] == [81]


async def test_informer_resyncs_when_the_store_is_replaced(nursery: trio.Nursery,
                                                           server: Server,
                                                           tmp_path: Path) -> None:
    async with KubeClient(KubeConfig.for_server(server.url)) as client:
        await make_namespace(client)
        for i in range(3):
            await client.create(pod(f"old{i}"))
        collector = Collector(client)
        nursery.start_soon(collector.run)
        await collector.until(lambda e: len(e) == 1)
        await server.stop()
        server.db = tmp_path / "fresh.sqlite"  # a new cluster behind the same address
        await server.start()
        await make_namespace(client)
        await client.create(pod("new"))
        await collector.until(lambda evs: any(
            isinstance(e, Resync) and [p.name for p in e.objects] == ["new"] for e in evs)
            or any(isinstance(e, Change) and e.object.name == "new" for e in evs))
        resyncs = [e for e in collector.events if isinstance(e, Resync)]
        assert len(resyncs) == 2, "the informer must drop the old cluster's objects"


async def test_expect_100_continue_is_answered(server: Server) -> None:
    body = json.dumps({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "big"}}).encode()
    head = (f"POST /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(head)
            interim = await stream.receive_some(4096)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            final = await stream.receive_some(65536)
    assert final.startswith(b"HTTP/1.1 201 ")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
async def test_kubectl_generators_label_and_scale(client: KubeClient, server: Server,
                                                  tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")}
    commands = [
        ["create", "namespace", "demo"],  # protobuf body
        ["label", "namespace", "demo", "istio.io/dataplane-mode=ambient"],
        ["create", "deployment", "web", "--image=ambient/echo", "-n", "demo"],
        ["scale", "deployment", "web", "--replicas=3", "-n", "demo"],
    ]
    with trio.fail_after(60):
        for command in commands:
            result = await trio.run_process(["kubectl", "--server", server.url, *command],
                                            capture_stdout=True, capture_stderr=True, env=env,
                                            check=False)
            assert result.returncode == 0, (command, result.stderr.decode())
    ns = await client.get(Namespace, "demo")
    assert ns.metadata.labels == {"istio.io/dataplane-mode": "ambient"}
    deployment = await client.get(Deployment, "web", "demo")
    assert deployment.spec.replicas == 3
    assert deployment.spec.template.spec.containers[0].image == "ambient/echo"
