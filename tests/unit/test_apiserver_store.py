"""The SQLite store and the request handler, without sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import KubeApiError, ResourceExpiredError
from common.kube.resources import by_kind
from deploy.local.apiserver.handler import ApiHandler, Request, Response, WatchPlan, watch_events
from deploy.local.apiserver.store import Store

PODS, NS = by_kind("Pod"), by_kind("Namespace")


def ns(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "ambient/echo"}]}}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite", retain_events=5)
    s.create(NS, ns("demo"))
    return s


def test_one_global_resource_version_counts_every_write(store: Store) -> None:
    a = store.create(PODS, pod("a"))
    b = store.create(PODS, pod("b"))
    assert (a["metadata"]["resourceVersion"], b["metadata"]["resourceVersion"]) == ("2", "3")
    deleted = store.delete(PODS, "demo", "a")
    assert deleted["metadata"]["resourceVersion"] == "4" and store.resource_version == 4


def test_noop_update_writes_nothing_and_spec_change_bumps_generation(store: Store) -> None:
    created = store.create(PODS, pod("a"))
    same = store.update(PODS, json.loads(json.dumps(created)))
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    changed = json.loads(json.dumps(created))
    changed["spec"]["containers"][0]["image"] = "other"
    updated = store.update(PODS, changed)
    assert updated["metadata"]["generation"] == 2
    relabeled = json.loads(json.dumps(updated))
    relabeled["metadata"]["labels"] = {"x": "y"}
    assert store.update(PODS, relabeled)["metadata"]["generation"] == 2


def test_history_survives_reopen_and_is_bounded(tmp_path: Path, store: Store) -> None:
    for i in range(3):
        store.create(PODS, pod(f"p{i}"))
    store.close()
    reopened = Store(tmp_path / "db.sqlite", retain_events=5)
    assert reopened.resource_version == 4
    assert [e.object["metadata"]["name"] for e in reopened.events_since(PODS, "demo", 2)] == \
        ["p1", "p2"]
    for i in range(3, 8):
        reopened.create(PODS, pod(f"p{i}"))
    assert reopened.compacted == 4  # 9 writes, 5 kept
    with pytest.raises(ResourceExpiredError) as err:
        reopened.events_since(PODS, "demo", 3)
    assert err.value.status["code"] == 410
    assert len(reopened.events_since(PODS, "demo", 4)) == 5


def test_failed_write_leaves_counters_and_data_alone(store: Store) -> None:
    store.create(PODS, pod("a"))
    before = store.resource_version
    with pytest.raises(KubeApiError) as err:
        store.create(PODS, pod("a"))
    assert err.value.code == 409 and store.resource_version == before


def test_namespace_delete_cascades_with_events(store: Store) -> None:
    store.create(PODS, pod("a"))
    store.delete(NS, None, "demo")
    assert store.list_objects(PODS, None)[0] == []
    kinds = [(e.type, e.object["metadata"]["name"]) for e in store.events_since(PODS, None, 2)]
    assert kinds == [("DELETED", "a")]


def handle(store: Store, method: str, target: str, body: Any = None,
           headers: dict[str, str] | None = None) -> tuple[int, Any]:
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    result = ApiHandler(store).handle(Request(method, target, headers or {}, raw))
    assert isinstance(result, Response)
    return result.status, json.loads(result.body) if result.content_type.endswith("json") \
        else result.body


def test_discovery_documents(store: Store) -> None:
    code, core = handle(store, "GET", "/api/v1")
    assert code == 200 and core["kind"] == "APIResourceList"
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert pods["namespaced"] and "watch" in pods["verbs"] and pods["shortNames"] == ["po"]
    assert any(r["name"] == "pods/status" for r in core["resources"])
    _, groups = handle(store, "GET", "/apis")
    names = {g["name"] for g in groups["groups"]}
    assert {"apps", "discovery.k8s.io", "gateway.networking.k8s.io", "networking.istio.io",
            "security.istio.io"} <= names
    code, istio = handle(store, "GET", "/apis/networking.istio.io/v1alpha3")
    assert code == 200 and {r["kind"] for r in istio["resources"]} >= {"VirtualService"}
    assert handle(store, "GET", "/openapi/v2")[0] == 404
    code, v3 = handle(store, "GET", "/openapi/v3")
    assert code == 200 and "apis/apps/v1" in v3["paths"]


def test_alias_versions_serve_the_same_objects(store: Store) -> None:
    vs = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
          "metadata": {"name": "web"}, "spec": {"hosts": ["web"]}}
    code, created = handle(store, "POST",
                           "/apis/networking.istio.io/v1alpha3/namespaces/demo/virtualservices",
                           vs)
    assert code == 201 and created["apiVersion"] == "networking.istio.io/v1alpha3"
    _, got = handle(store, "GET",
                    "/apis/networking.istio.io/v1/namespaces/demo/virtualservices/web")
    assert got["apiVersion"] == "networking.istio.io/v1" and got["spec"] == {"hosts": ["web"]}


def test_patch_media_types(store: Store) -> None:
    store.create(PODS, pod("a", {"app": "web"}))
    path = "/api/v1/namespaces/demo/pods/a"
    code, merged = handle(store, "PATCH", path, {"metadata": {"labels": {"app": None, "v": "2"}}},
                          {"content-type": "application/merge-patch+json"})
    assert code == 200 and merged["metadata"]["labels"] == {"v": "2"}
    code, strategic = handle(store, "PATCH", path, {
        "spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "d"}],
                 "containers": [{"name": "d", "image": "new"}]}},
        {"content-type": "application/strategic-merge-patch+json"})
    assert [c["name"] for c in strategic["spec"]["containers"]] == ["c", "d"]
    assert strategic["spec"]["containers"][0]["image"] == "ambient/echo"
    code, jsonp = handle(store, "PATCH", path, [{"op": "replace", "path": "/metadata/labels/v",
                                                 "value": "3"}],
                         {"content-type": "application/json-patch+json"})
    assert code == 200 and jsonp["metadata"]["labels"] == {"v": "3"}
    code, status = handle(store, "PATCH", path, {"x": 1}, {"content-type": "text/plain"})
    assert code == 415 and status["reason"] == "UnsupportedMediaType"


def test_put_with_stale_version_conflicts_and_missing_object_is_404(store: Store) -> None:
    created = store.create(PODS, pod("a"))
    store.update(PODS, {**created, "metadata": {**created["metadata"], "labels": {"x": "1"}}})
    code, status = handle(store, "PUT", "/api/v1/namespaces/demo/pods/a", created)
    assert code == 409 and status["reason"] == "Conflict"
    code, status = handle(store, "PUT", "/api/v1/namespaces/demo/pods/zz", pod("zz"))
    assert code == 404 and status["details"] == {"name": "zz", "kind": "pods"}
    code, status = handle(store, "PUT", "/api/v1/namespaces/demo/pods/a", pod("b"))
    assert code == 400


def test_tables_for_kubectl(store: Store) -> None:
    running = pod("a")
    running["status"] = {"phase": "Running"}
    store.create(PODS, running)
    accept = {"accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    code, table = handle(store, "GET", "/api/v1/pods", headers=accept)
    assert code == 200 and table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]][:5] == \
        ["Name", "Ready", "Status", "Restarts", "Age"]
    # Without containerStatuses a Running pod counts all its containers ready.
    assert table["rows"][0]["cells"][:3] == ["a", "1/1", "Running"]
    assert table["rows"][0]["object"]["metadata"]["namespace"] == "demo"


def test_watch_plan_and_selector_transitions(store: Store) -> None:
    result = ApiHandler(store).handle(Request(
        "GET", "/api/v1/namespaces/demo/pods?watch=1&resourceVersion=1&labelSelector=app%3Dweb"
        "&allowWatchBookmarks=true&timeoutSeconds=5"))
    assert isinstance(result, WatchPlan)
    assert (result.resource_version, result.bookmarks, result.timeout) == (1, True, 5.0)
    a = store.create(PODS, pod("a", {"app": "web"}))
    store.create(PODS, pod("b", {"app": "db"}))
    store.update(PODS, {**a, "metadata": {**a["metadata"], "labels": {"app": "db"}}})
    seen = [(t, o["metadata"]["name"]) for t, o in watch_events(result,
                                                               store.events_since(PODS, "demo", 1))]
    assert seen == [("ADDED", "a"), ("DELETED", "a")]


def test_table_watch_renders_one_row_tables(store: Store) -> None:
    accept = {"accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    plan = ApiHandler(store).handle(Request("GET", "/api/v1/pods?watch=true", accept))
    assert isinstance(plan, WatchPlan) and plan.table_include_object == "Metadata"
    created = store.create(PODS, pod("a"))
    rendered = plan.render("ADDED", created, store.resource_version)
    assert rendered["kind"] == "Table" and rendered["rows"][0]["cells"][0] == "a"
    assert plan.render("BOOKMARK", {"kind": "Pod"}, 1) == {"kind": "Pod"}


def test_watch_from_a_version_the_store_never_reached_is_expired(store: Store) -> None:
    with pytest.raises(ResourceExpiredError, match="store was reset"):
        store.events_since(PODS, "demo", store.resource_version + 5)
    assert store.events_since(PODS, "demo", store.resource_version) == []


def test_server_side_dry_run_is_refused_not_performed(store: Store) -> None:
    code, status = handle(store, "POST", "/api/v1/namespaces/demo/pods?dryRun=All", pod("a"))
    assert code == 400 and "dryRun" in status["message"]
    assert store.get(PODS, "demo", "a") is None


def test_istio_and_gateway_kinds_print_their_crd_columns(store: Store) -> None:
    accept = {"accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "web"}, "spec": {"hosts": ["web", "web.demo"]}}
    handle(store, "POST", "/apis/networking.istio.io/v1/namespaces/demo/virtualservices", vs)
    _, table = handle(store, "GET", "/apis/networking.istio.io/v1/virtualservices",
                      headers=accept)
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Gateways", "Hosts",
                                                                "Age"]
    assert table["rows"][0]["cells"][:3] == ["web", "", "web,web.demo"]


def test_scale_subresource_changes_only_replicas(store: Store) -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
              "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                       "template": {"metadata": {"labels": {"app": "web"}}}}}
    path = "/apis/apps/v1/namespaces/demo/deployments/web"
    handle(store, "POST", "/apis/apps/v1/namespaces/demo/deployments", deploy)
    code, scale = handle(store, "GET", path + "/scale")
    assert code == 200 and scale["kind"] == "Scale"
    assert (scale["spec"]["replicas"], scale["status"]["selector"]) == (2, "app=web")
    code, scaled = handle(store, "PATCH", path + "/scale", {"spec": {"replicas": 5}},
                          {"content-type": "application/merge-patch+json"})
    assert code == 200 and scaled["spec"]["replicas"] == 5
    _, stored = handle(store, "GET", path)
    assert stored["spec"]["replicas"] == 5 and stored["spec"]["selector"] == {
        "matchLabels": {"app": "web"}}
    stale = {**scale, "spec": {"replicas": 1}}  # carries the old resourceVersion
    assert handle(store, "PUT", path + "/scale", stale)[0] == 409
    assert handle(store, "PATCH", path + "/scale", {"spec": {"replicas": -1}},
                  {"content-type": "application/merge-patch+json"})[0] == 422


# What kubectl 1.32's generators send (see the file's _comment).
KUBECTL_CREATE = {k: bytes.fromhex(v) for k, v in json.loads(
    (Path(__file__).parent.parent / "fixtures" / "kube" / "kubectl-create-protobuf.json")
    .read_text()).items() if not k.startswith("_")}
PROTOBUF = {"content-type": "application/vnd.kubernetes.protobuf"}


def test_kubectl_create_protobuf_bodies_are_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "fresh.sqlite")
    code, created = handle(store, "POST", "/api/v1/namespaces", KUBECTL_CREATE["namespace"],
                           PROTOBUF)
    assert code == 201 and created["metadata"]["name"] == "demo"
    assert store.get(NS, None, "demo") is not None
    code, secret = handle(store, "POST", "/api/v1/namespaces/demo/secrets",
                          KUBECTL_CREATE["secret"], PROTOBUF)
    assert code == 201 and secret["data"] == {"a": "Yg=="} and secret["type"] == "Opaque"
    code, deploy = handle(store, "POST", "/apis/apps/v1/namespaces/demo/deployments",
                          KUBECTL_CREATE["deployment"], PROTOBUF)
    assert code == 201 and deploy["spec"] == {
        "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
            {"name": "echo", "image": "ambient/echo", "command": ["/bin/app", "--flag"],
             "ports": [{"containerPort": 8080}]}]}}}


def test_unreadable_protobuf_is_refused_with_a_way_out(store: Store) -> None:
    code, status = handle(store, "POST", "/api/v1/namespaces", b"k8s\x00\n\x0f", PROTOBUF)
    assert code == 415 and "apply -f" in status["message"]
    pod_pb = bytes.fromhex("6b3873000a090a0276311203506f64")  # TypeMeta v1/Pod, no object
    code, status = handle(store, "POST", "/api/v1/namespaces/demo/pods", pod_pb, PROTOBUF)
    assert code == 415 and "not Pod" in status["message"]


def test_delete_collection_honours_selectors(store: Store) -> None:
    for name, app in (("a", "web"), ("b", "web"), ("c", "db")):
        store.create(PODS, pod(name, {"app": app}))
    code, deleted = handle(store, "DELETE", "/api/v1/namespaces/demo/pods?labelSelector=app%3Dweb")
    assert code == 200 and [o["metadata"]["name"] for o in deleted["items"]] == ["a", "b"]
    assert [o["metadata"]["name"] for o in store.list_objects(PODS, "demo")[0]] == ["c"]
