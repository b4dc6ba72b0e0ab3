"""``ambientctl install|uninstall`` against a fake API server (no cluster needed)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from common.errors import ConfigError
from common.kube import KubeClient, KubeConfig
from deploy.ambientctl.install import (
    APPLY_MEDIA_TYPE,
    download_crds,
    install,
    removal_order,
    uninstall,
    wait_for_ztunnel,
)
from deploy.install import CRD_SOURCES, install_objects, object_path, waypoint_rbac

DS_PATH = "/apis/apps/v1/namespaces/ambient-system/daemonsets/ztunnel"


class FakeApi:
    """Serves the CRD group discovery, server-side apply, deletes and the DaemonSet status."""

    def __init__(self, groups: tuple[str, ...] = ("gateway.networking.k8s.io/v1",
                                                  "networking.istio.io/v1",
                                                  "security.istio.io/v1"),
                 enrolled: tuple[str, ...] = (),
                 ds_statuses: list[dict[str, Any]] | None = None,
                 existing: set[str] | None = None) -> None:
        self.groups = groups
        self.enrolled = enrolled
        self.ds_statuses = ds_statuses or [{"observedGeneration": 1,
                                            "desiredNumberScheduled": 3, "numberReady": 3,
                                            "updatedNumberScheduled": 3}]
        self.existing = existing
        self.applied: list[tuple[str, dict[str, Any], httpx.Request]] = []
        self.deleted: list[str] = []
        self.discovery_calls = 0
        self.served_after = 0  # discovery calls answered 404 before the groups appear

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.startswith("/apis/") and path.count("/") == 3:
            self.discovery_calls += 1
            if path[len("/apis/"):] in self.groups and self.discovery_calls > self.served_after:
                return httpx.Response(200, json={"kind": "APIResourceList"})
            return _status(404, "NotFound", "the server could not find the requested resource")
        if request.method == "PATCH":
            self.applied.append((path, json.loads(request.content), request))
            return httpx.Response(200, json=json.loads(request.content))
        if request.method == "GET" and path == DS_PATH:
            status = self.ds_statuses.pop(0) if len(self.ds_statuses) > 1 \
                else self.ds_statuses[0]
            return httpx.Response(200, json={"metadata": {"generation": 1}, "status": status})
        if request.method == "GET" and path == "/api/v1/namespaces":
            return httpx.Response(200, json={"kind": "NamespaceList", "metadata": {}, "items": [
                {"metadata": {"name": n, "labels": {"istio.io/dataplane-mode": "ambient"}}}
                for n in self.enrolled]})
        if request.method == "GET" and path.endswith("/clusterrolebindings"):
            assert request.url.params["labelSelector"] == "app.kubernetes.io/part-of=pyambient"
            return httpx.Response(200, json={"items": [waypoint_rbac("demo", "waypoint")]})
        if request.method == "DELETE":
            if self.existing is not None and path not in self.existing:
                return _status(404, "NotFound", "not found")
            self.deleted.append(path)
            return httpx.Response(200, json={"kind": "Status", "status": "Success"})
        return _status(405, "MethodNotAllowed", f"{request.method} {path}")


def _status(code: int, reason: str, message: str) -> httpx.Response:
    return httpx.Response(code, json={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "code": code, "reason": reason, "message": message})


def _client(api: FakeApi) -> KubeClient:
    return KubeClient(KubeConfig.for_server("http://apiserver.test"),
                      transport=httpx.MockTransport(api))


async def test_install_applies_every_object_server_side_in_order(
        capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeApi()
    objects = install_objects()
    async with _client(api) as client:
        assert await install(client, objects, crds=False, wait_timeout=5) == 0
    assert [path for path, _, _ in api.applied] == [object_path(o) for o in objects]
    assert [body for _, body, _ in api.applied] == objects
    request = api.applied[0][2]
    assert request.headers["content-type"] == APPLY_MEDIA_TYPE
    assert dict(request.url.params) == {"fieldManager": "ambientctl", "force": "true"}
    out = capsys.readouterr().out
    assert "daemonset.apps/ztunnel serverside-applied" in out
    assert "ztunnel is ready on every node (3/3 ready, 3/3 up to date)" in out


async def test_install_without_the_crds_applies_nothing_and_says_how() -> None:
    api = FakeApi(groups=("gateway.networking.k8s.io/v1",))
    async with _client(api) as client:
        with pytest.raises(ConfigError, match=r"networking\.istio\.io/v1.*--crds"):
            await install(client, install_objects(), crds=False, wait_timeout=0)
    assert api.applied == []


async def test_crds_are_applied_and_waited_for_until_served(
        autojump_clock: trio.abc.Clock) -> None:
    api = FakeApi()
    api.served_after = 7  # two polls after the CRDs were applied
    crd = ("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
           "metadata: {name: gateways.gateway.networking.k8s.io}\n")
    fetched: list[str] = []

    def downloads(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, text=crd)

    async with _client(api) as client:
        assert await install(client, install_objects(), crds=True, wait_timeout=0,
                             download=httpx.MockTransport(downloads)) == 0
    assert fetched == [url for _, url in CRD_SOURCES]
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/" \
               "gateways.gateway.networking.k8s.io"
    assert [p for p, _, _ in api.applied[:2]] == [crd_path, crd_path]
    assert len(api.applied) == 2 + len(install_objects())
    assert api.discovery_calls > api.served_after


async def test_wait_follows_the_daemonset_until_every_node_is_ready() -> None:
    api = FakeApi(ds_statuses=[
        {"observedGeneration": 0},
        {"observedGeneration": 1, "desiredNumberScheduled": 3, "numberReady": 1,
         "updatedNumberScheduled": 3},
        {"observedGeneration": 1, "desiredNumberScheduled": 3, "numberReady": 3,
         "updatedNumberScheduled": 3}])
    async with _client(api) as client:
        with trio.fail_after(10):
            ready, detail = await wait_for_ztunnel(client, 30)
    assert ready and detail == "3/3 ready, 3/3 up to date"


async def test_wait_gives_up_and_says_what_it_waited_for(autojump_clock: trio.abc.Clock,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    api = FakeApi(ds_statuses=[{"observedGeneration": 1, "desiredNumberScheduled": 3,
                                "numberReady": 2, "updatedNumberScheduled": 3}])
    async with _client(api) as client:
        assert await install(client, install_objects(), crds=False, wait_timeout=20) == 1
    assert "2/3 ready" in capsys.readouterr().err


async def test_crds_are_downloaded_document_by_document() -> None:
    def serve(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "crds.test"
        return httpx.Response(200, text="---\napiVersion: apiextensions.k8s.io/v1\n"
                              "kind: CustomResourceDefinition\nmetadata: {name: a.b.c}\n"
                              "---\n# only a comment\n---\napiVersion: v1\nkind: x\n")
    docs = await download_crds(["https://crds.test/one.yaml"], httpx.MockTransport(serve))
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition", "x"]
    assert object_path(docs[0]) == \
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/a.b.c"


async def test_a_crd_download_failure_says_what_to_do_instead() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(404, text="nope"))
    with pytest.raises(ConfigError, match="kubectl apply --server-side"):
        await download_crds(["https://crds.test/missing.yaml"], transport)


async def test_uninstall_refuses_while_namespaces_are_enrolled() -> None:
    api = FakeApi(enrolled=("shop", "demo"))
    async with _client(api) as client:
        with pytest.raises(ConfigError, match="demo, shop"):
            await uninstall(client, removal_order(install_objects()), force=False)
    assert api.deleted == []


async def test_uninstall_drains_first_removes_bindings_and_the_namespace_last(
        capsys: pytest.CaptureFixture[str]) -> None:
    objects = removal_order(install_objects())
    present = {object_path(o) for o in objects if o["kind"] != "Role"}
    present.add(object_path(waypoint_rbac("demo", "waypoint")))
    api = FakeApi(enrolled=("demo",), existing=present)
    async with _client(api) as client:
        assert await uninstall(client, objects, force=True) == 0
    assert api.deleted[0] == DS_PATH
    assert api.deleted[-1] == "/api/v1/namespaces/ambient-system"
    assert object_path(waypoint_rbac("demo", "waypoint")) in api.deleted
    assert "role.rbac.authorization.k8s.io/ztunnel-ca was not there" in capsys.readouterr().out
