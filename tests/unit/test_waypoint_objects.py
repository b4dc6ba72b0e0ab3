"""The objects of a waypoint and the status of its Gateway (pure functions, no server)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from common.api.gateway import GatewaySpec
from common.errors import ConfigError
from common.kube import (
    Deployment,
    Gateway,
    KubeClient,
    KubeConfig,
    Namespace,
    Service,
    ServiceAccount,
    by_kind,
)
from common.kube.objects import Container
from common.model import WaypointRef
from common.translate import translate
from deploy import install
from deploy.ambientctl.waypoint import (
    apply_object,
    apply_waypoint,
    client_config,
    delete_waypoint,
    dry_run_yaml,
    list_rows,
    parse_duration,
    serves_rbac,
    spec_from,
)
from deploy.local.apiserver.validation import check_object
from deploy.local.runtime import container_argv
from deploy.waypoint_objects import (
    GATEWAY_NAME_LABEL,
    Owner,
    WaypointSpec,
    condition_of,
    dependants_of,
    gateway,
    owned_by_waypoint,
    waypoint_objects,
)

SPEC = WaypointSpec(namespace="shop", name="reviews-wp")
OWNER = Owner("reviews-wp", "0b8f7c1e-uid")
NOW = "2026-11-25T20:00:00Z"


def by_kind_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_four_objects_named_like_the_gateway_in_its_namespace() -> None:
    objects = waypoint_objects(SPEC, OWNER)
    assert [o["kind"] for o in objects] == ["Gateway", "ServiceAccount", "Deployment",
                                            "Service"]
    for obj in objects:
        assert obj["metadata"]["name"] == "reviews-wp"
        assert obj["metadata"]["namespace"] == "shop"
        # The local API server's own checks (names, labels, apiVersion) accept each one.
        rt = by_kind(obj["kind"])
        check_object(rt, rt.version, copy.deepcopy(obj), "shop", "reviews-wp", creating=True)


def test_gateway_is_an_istio_waypoint_with_the_mesh_hbone_listener() -> None:
    gw = gateway(SPEC)
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = GatewaySpec.model_validate(gw["spec"])
    assert spec.gateway_class_name == "istio-waypoint"
    assert [(x.name, x.port, x.protocol) for x in spec.listeners] == [("mesh", 15008, "HBONE")]
    assert "ownerReferences" not in gw["metadata"]


@pytest.mark.parametrize(("traffic", "label"), [
    (None, None), ("service", None), ("workload", "workload"), ("all", "all"), ("none", "none")])
def test_waypoint_for_label_only_when_not_the_default(traffic: str | None,
                                                      label: str | None) -> None:
    labels = gateway(WaypointSpec(namespace="a", traffic_type=traffic))["metadata"].get(
        "labels", {})
    assert labels.get("istio.io/waypoint-for") == label


def test_dependants_carry_owner_reference_and_gateway_name_label() -> None:
    for obj in waypoint_objects(SPEC, OWNER)[1:]:
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "name": "reviews-wp", "uid": "0b8f7c1e-uid", "controller": True}]
        assert meta["labels"][GATEWAY_NAME_LABEL] == "reviews-wp"
        assert owned_by_waypoint(meta, "reviews-wp")
        assert not owned_by_waypoint(meta, "other")
    # Without a uid (dry run) there is no owner reference, but the label still says whose.
    for obj in waypoint_objects(SPEC)[1:]:
        assert "ownerReferences" not in obj["metadata"]
        assert owned_by_waypoint(obj["metadata"], "reviews-wp")
    assert not owned_by_waypoint({"name": "reviews-wp"}, "reviews-wp")


def test_deployment_runs_one_uncaptured_waypoint_pod_as_the_gateway_account() -> None:
    dep = Deployment.model_validate(by_kind_of(waypoint_objects(SPEC, OWNER))["Deployment"])
    assert dep.spec.replicas == 1
    assert dep.spec.selector.match_labels == {GATEWAY_NAME_LABEL: "reviews-wp"}
    template = dep.spec.template
    assert template.metadata.labels == {GATEWAY_NAME_LABEL: "reviews-wp",
                                        "istio.io/dataplane-mode": "none"}
    assert template.spec.service_account_name == "reviews-wp"
    [container] = template.spec.containers
    assert container.image == "ambient/waypoint"
    assert container.command == ["python", "-m", "waypoint", "--name", "reviews-wp",
                                 "--namespace", "shop"]
    assert [p.container_port for p in container.ports or []] == [15021, 15008, 15020]
    extra = container.model_extra or {}
    assert extra["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    custom = Deployment.model_validate(by_kind_of(waypoint_objects(WaypointSpec(
        namespace="shop", image="ghcr.io/x/pyambient:1.0")))["Deployment"])
    assert custom.spec.template.spec.containers[0].image == "ghcr.io/x/pyambient:1.0"


def test_local_runtime_runs_python_as_its_own_interpreter() -> None:
    dep = Deployment.model_validate(by_kind_of(waypoint_objects(SPEC))["Deployment"])
    container = dep.spec.template.spec.containers[0]
    assert container_argv(container, python="/venv/bin/python") == [
        "/venv/bin/python", "-m", "waypoint", "--name", "reviews-wp", "--namespace", "shop"]
    assert container_argv(Container(name="c", command=["python3", "x.py"]), python="/p") == [
        "/p", "x.py"]


def test_service_selects_the_pods_on_the_mesh_port() -> None:
    svc = Service.model_validate(by_kind_of(waypoint_objects(SPEC, OWNER))["Service"])
    assert svc.spec.selector == {GATEWAY_NAME_LABEL: "reviews-wp"}
    assert [(p.name, p.port, p.target_port) for p in svc.spec.ports] == [
        ("mesh", 15008, 15008), ("status-port", 15021, 15021)]
    ServiceAccount.model_validate(by_kind_of(waypoint_objects(SPEC, OWNER))["ServiceAccount"])


def test_revision_labels_gateway_dependants_and_pods() -> None:
    objects = waypoint_objects(WaypointSpec(namespace="a", revision="canary"), OWNER)
    for obj in objects:
        assert obj["metadata"]["labels"]["istio.io/rev"] == "canary"
    template = by_kind_of(objects)["Deployment"]["spec"]["template"]
    assert template["metadata"]["labels"]["istio.io/rev"] == "canary"


@pytest.mark.parametrize(("spec", "message"), [
    (WaypointSpec(namespace="a", name="none"), "--name none: 'none' is reserved"),
    (WaypointSpec(namespace="a", name="Bad_Name"), "--name: Invalid value"),
    (WaypointSpec(namespace="a", name="has.dot"), "--name: Invalid value"),
    (WaypointSpec(namespace="a", name="x" * 64), "no more than 63"),
    (WaypointSpec(namespace="A"), "--namespace: Invalid value"),
    (WaypointSpec(namespace="a", traffic_type="everything"), "--for 'everything': use one of"),
    (WaypointSpec(namespace="a", image=" "), "--image: must not be empty"),
])
def test_check_names_the_flag_in_error(spec: WaypointSpec, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec.check()
    assert message in str(err.value)


def test_dry_run_yaml_parses_to_the_four_kinds() -> None:
    spec = WaypointSpec(namespace="a", traffic_type="all")
    docs = list(yaml.safe_load_all(dry_run_yaml(spec, kubernetes=False)))
    assert [d["kind"] for d in docs] == ["Gateway", "ServiceAccount", "Deployment", "Service"]
    assert docs[0]["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}
    # For Kubernetes, also the bindings that let the waypoint's account read the mesh and
    # write its own Gateway's status.
    docs = list(yaml.safe_load_all(dry_run_yaml(spec, kubernetes=True)))
    assert [d["kind"] for d in docs[4:]] == ["ClusterRoleBinding", "Role", "RoleBinding"]
    for binding in (docs[4], docs[6]):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "waypoint",
                                        "namespace": "a"}]


def test_translator_sees_the_waypoint_with_the_account_identity() -> None:
    objects = waypoint_objects(SPEC, OWNER)
    snap = translate([Namespace.model_validate({"metadata": {"name": "shop"}}),
                      Gateway.model_validate(objects[0])])
    waypoint = snap.waypoints_by_ref[WaypointRef("shop", "reviews-wp")]
    assert str(waypoint.identity) == "spiffe://cluster.local/ns/shop/sa/reviews-wp"
    assert waypoint.traffic_type.value == "service"


def test_a_bare_waypoint_gateway_gets_its_default_dependants() -> None:
    body = gateway(WaypointSpec(namespace="shop", name="reviews-wp", revision="canary"))
    body["metadata"]["uid"] = OWNER.uid
    made = dependants_of(Gateway.model_validate(body))
    assert made == waypoint_objects(
        WaypointSpec(namespace="shop", name="reviews-wp", revision="canary"), OWNER)[1:]
    ingress = copy.deepcopy(body)
    ingress["spec"]["gatewayClassName"] = "istio"
    invalid = copy.deepcopy(body)
    invalid["spec"]["listeners"][0]["protocol"] = "HTTP"
    leaving = copy.deepcopy(body)
    leaving["metadata"]["deletionTimestamp"] = NOW
    unsaved = gateway(SPEC)
    for other in (ingress, invalid, leaving, unsaved):
        assert dependants_of(Gateway.model_validate(other)) == []


# -- status (read back) ------------------------------------------------------------------


def stored_gateway(status: dict[str, Any] | None = None, **spec: Any) -> Gateway:
    body = gateway(SPEC)
    body["metadata"].update(uid="0b8f7c1e-uid", generation=3)
    body["spec"].update(spec)
    if status is not None:
        body["status"] = status
    return Gateway.model_validate(body)


def test_condition_of_reads_a_model_or_a_raw_object() -> None:
    # The status itself is computed and written by the waypoint (test_gateway_status.py).
    accepted = {"type": "Accepted", "status": "True", "reason": "Accepted"}
    assert condition_of(stored_gateway({"conditions": [accepted]}), "Accepted") == accepted
    assert condition_of({"status": {"conditions": [accepted]}}, "Accepted") == accepted
    assert condition_of({}, "Accepted") is None


# -- CLI helpers ---------------------------------------------------------------------------


def test_list_rows_show_revision_traffic_type_and_programmed() -> None:
    labelled = Gateway.model_validate(gateway(WaypointSpec(
        namespace="a", name="w2", traffic_type="workload", revision="canary")))
    programmed = stored_gateway({"conditions": [{"type": "Programmed", "status": "True"}]})
    assert list_rows([labelled, programmed]) == [
        ("a", ["w2", "canary", "workload", "Unknown"]),
        ("shop", ["reviews-wp", "default", "service", "True"])]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("1.5m", 90.0), ("500ms", 0.5), ("1h", 3600.0)])
def test_parse_duration_reads_go_style_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_other_text() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_kubeconfig_selects_a_real_cluster_and_its_namespace(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "kind", "clusters": [
            {"name": "kind", "cluster": {"server": "https://127.0.0.1:6443",
                                         "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": "t0k3n"}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "admin",
                                                  "namespace": "team"}}]}))
    args = argparse.Namespace(kubeconfig=str(kubeconfig), context=None, namespace=None,
                              server=None, cluster=None)
    config = client_config(args)
    assert (config.server, config.namespace, config.token) == (
        "https://127.0.0.1:6443", "team", "t0k3n")
    args.namespace = "shop"
    assert client_config(args).namespace == "shop"


# Kubernetes release whose schemas the generated objects must pass, offline and strictly
# (unknown fields are errors); the Gateway is checked against GatewaySpec above.
KUBERNETES_VERSION = "1.31.0"


def test_dependants_validate_against_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in waypoint_objects(SPEC, OWNER)[1:]:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The check can fail: a misspelt probe field is refused.
    bad = by_kind_of(waypoint_objects(SPEC, OWNER))["Deployment"]
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


async def test_apply_merges_into_an_object_created_between_read_and_create() -> None:
    """The local cluster's controller may create a new waypoint's Service first."""
    body = by_kind_of(waypoint_objects(SPEC, OWNER))["Service"]
    theirs = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": "7"}}
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "GET":
            if calls.count("GET") == 1:
                return httpx.Response(404, json={"kind": "Status", "code": 404,
                                                 "reason": "NotFound"})
            return httpx.Response(200, json=theirs)
        if request.method == "POST":
            return httpx.Response(409, json={"kind": "Status", "code": 409,
                                             "reason": "AlreadyExists"})
        return httpx.Response(200, json=json.loads(request.content))

    config = KubeConfig.for_server("http://apiserver.invalid")
    async with KubeClient(config, transport=httpx.MockTransport(answer)) as client:
        assert await apply_object(client, body) == "configured"
    assert calls == ["GET", "POST", "GET", "PUT"]


class FakeKubernetes:
    """Just enough of a Kubernetes API server (with RBAC) for apply and delete."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/apis/rbac.authorization.k8s.io/v1":
            return httpx.Response(200, json={"kind": "APIResourceList", "resources": []})
        if request.method == "POST":
            body = json.loads(request.content)
            path = f"{path}/{body['metadata']['name']}"
            if path in self.objects:
                return self.status(409, "AlreadyExists")
            body["metadata"]["uid"] = f"uid-{len(self.objects)}"
        if request.method in ("POST", "PUT"):
            body = json.loads(request.content)
            self.version += 1
            body["metadata"]["resourceVersion"] = str(self.version)
            self.objects[path] = body
            return httpx.Response(200, json=body)
        if path not in self.objects:
            return self.status(404, "NotFound")
        if request.method == "DELETE":
            return httpx.Response(200, json=self.objects.pop(path))
        return httpx.Response(200, json=self.objects[path])

    @staticmethod
    def status(code: int, reason: str) -> httpx.Response:
        return httpx.Response(code, json={"kind": "Status", "code": code, "reason": reason})


async def test_on_kubernetes_apply_binds_the_account_and_delete_unbinds_it() -> None:
    fake = FakeKubernetes()
    config = KubeConfig.for_server("https://kubernetes.invalid")
    binding = ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/"
               "pyambient-waypoint-shop-reviews-wp")
    async with KubeClient(config, transport=httpx.MockTransport(fake)) as client:
        kubernetes = await serves_rbac(client)
        args = argparse.Namespace(name="reviews-wp", traffic_type=None, revision=None,
                                  image=None)
        spec = spec_from(args, "shop", kubernetes=kubernetes)
        assert spec.image == install.DEFAULT_IMAGE
        assert await apply_waypoint(client, spec, kubernetes=kubernetes)
        assert not await apply_waypoint(client, spec, kubernetes=kubernetes)
        assert fake.objects[binding]["roleRef"]["name"] == "pyambient-waypoint"
        assert len(fake.objects) == 7  # + ClusterRoleBinding, Role, RoleBinding
        role = fake.objects["/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/"
                            "pyambient-gateway-status-reviews-wp"]
        assert role["rules"][0]["resources"] == ["gateways/status"]
        assert role["metadata"]["ownerReferences"][0]["name"] == "reviews-wp"
        await delete_waypoint(client, "shop", "reviews-wp")
        assert fake.objects == {}
