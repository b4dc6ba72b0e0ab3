"""The Kubernetes install, checked offline: schemas of a pinned Kubernetes version, our CRD
models, least-privilege RBAC, and the DaemonSet's capabilities, probes and drain."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.kube.resources import by_kind
from common.translate import KINDS
from deploy.ambientctl import main as ambientctl
from deploy.install import (
    CA_SECRET,
    CAPABILITIES,
    CRD_GROUPS,
    CRD_SOURCES,
    GATEWAY_TEMPLATE_SECRET,
    KUBERNETES_VERSION,
    NAMESPACE,
    OLDEST_KUBERNETES_VERSION,
    READ_RESOURCES,
    WAYPOINT_TEMPLATE_NAME,
    WAYPOINT_TEMPLATE_NAMESPACE,
    ZTUNNEL,
    InstallOptions,
    base_files,
    gateway_status_rbac,
    install_objects,
    proxy_rbac,
    waypoint_rbac,
)
from tests.manifest_checks import problems
from ztunnel.__main__ import parse as parse_ztunnel_args

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VERSIONS = (KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION)
# DESIGN.md section 6: the kinds the mesh reads (ServiceEntry included for later).
DESIGN_KINDS = ("Namespace", "Node", "Pod", "Service", "EndpointSlice", "ServiceAccount",
                "Gateway", "HTTPRoute", "VirtualService", "DestinationRule",
                "AuthorizationPolicy", "PeerAuthentication", "ServiceEntry")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _base_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _docs((K8S / name).read_text())]


def _all_problems(objects: list[dict[str, Any]], version: str) -> list[str]:
    return [p for obj in objects for p in problems(obj, version)]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _daemonset() -> dict[str, Any]:
    (ds,) = _by_kind(_base_objects(), "DaemonSet")
    return ds


def _ztunnel_container() -> dict[str, Any]:
    (container,) = _daemonset()["spec"]["template"]["spec"]["containers"]
    return container


# -- files and schemas ------------------------------------------------------------------------


def test_the_kustomize_base_is_what_deploy_install_renders() -> None:
    expected = base_files()
    for name, text in expected.items():
        assert (K8S / name).read_text() == text, \
            f"deploy/k8s/{name} is stale: run python -m deploy.install write deploy/k8s"
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")}
    assert on_disk == set(expected)


def test_the_base_holds_exactly_the_install_objects() -> None:
    assert _base_objects() == install_objects()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_base_manifest_validates(version: str) -> None:
    objects = _base_objects()
    assert {o["kind"] for o in objects} >= {"Namespace", "ServiceAccount", "ClusterRole",
                                            "ClusterRoleBinding", "Role", "RoleBinding",
                                            "DaemonSet"}
    assert _all_problems(objects, version) == []


def _filled(template: str) -> list[dict[str, Any]]:
    text = (K8S / template).read_text()
    return _docs(text.replace(WAYPOINT_TEMPLATE_NAMESPACE, "demo").replace(
        WAYPOINT_TEMPLATE_NAME, "waypoint").replace(GATEWAY_TEMPLATE_SECRET, "edge-cert"))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_waypoint_rbac_template_validates_once_filled(version: str) -> None:
    objects = _filled("waypoint-rbac-template.yaml")
    assert objects == proxy_rbac("demo", "waypoint")
    assert objects[0] == waypoint_rbac("demo", "waypoint")
    assert _all_problems(objects, version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_the_gateway_rbac_template_validates_once_filled(version: str) -> None:
    objects = _filled("gateway-rbac-template.yaml")
    assert objects == proxy_rbac("demo", "waypoint", secrets=["edge-cert"])
    assert _all_problems(objects, version) == []


@pytest.mark.parametrize("secrets", [(), ("edge-cert", "other-cert")])
def test_a_proxy_may_write_only_its_own_gateway_status_in_its_namespace(
        secrets: tuple[str, ...]) -> None:
    owner = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "name": "edge", "uid": "u-1", "controller": True}
    binding, role, role_binding = proxy_rbac("demo", "edge", secrets=secrets, owner=owner)
    assert binding["kind"] == "ClusterRoleBinding"
    assert binding["roleRef"]["name"] == "pyambient-waypoint"  # reads only (checked above)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == "demo"
    status_rule, *secret_rules = role["rules"]
    assert status_rule == {"apiGroups": ["gateway.networking.k8s.io"],
                           "resources": ["gateways/status"], "resourceNames": ["edge"],
                           "verbs": ["get", "patch"]}
    assert secret_rules == ([{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": sorted(secrets), "verbs": ["get"]}]
                            if secrets else [])
    assert role_binding["kind"] == "RoleBinding"
    assert role_binding["metadata"]["namespace"] == "demo"
    assert role_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                       "kind": "Role", "name": role["metadata"]["name"]}
    assert role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "edge",
                                         "namespace": "demo"}]
    # Deleting the Gateway deletes them (same namespace); the binding is deleted by name.
    assert role["metadata"]["ownerReferences"] == [owner] == \
        role_binding["metadata"]["ownerReferences"]
    assert _all_problems([binding, role, role_binding], KUBERNETES_VERSION) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_install_dry_run_objects_validate(version: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert ambientctl(["install", "--dry-run", "--image", "registry.test/pyambient:dev"]) == 0
    objects = _docs(capsys.readouterr().out)
    assert objects == install_objects(InstallOptions(image="registry.test/pyambient:dev"))
    (ds,) = _by_kind(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == \
        {"registry.test/pyambient:dev"}
    assert _all_problems(objects, version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_waypoint_apply_dry_run_objects_validate(version: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert ambientctl(["waypoint", "apply", "--dry-run", "-n", "demo", "--name", "wp",
                       "--for", "all", "--image", "pyambient:dev"]) == 0
    objects = _docs(capsys.readouterr().out)
    assert [o["kind"] for o in objects] == ["Gateway", "ServiceAccount", "Deployment",
                                            "Service"]
    assert _all_problems(objects, version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_waypoint_apply_dry_run_for_kubernetes_validates(
        version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind",
        "clusters": [{"name": "kind", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "kind", "user": {"token": "t"}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "kind",
                                                  "namespace": "demo"}}]}))
    assert ambientctl(["waypoint", "apply", "--dry-run", "--kubeconfig", str(kubeconfig)]) == 0
    objects = _docs(capsys.readouterr().out)
    kinds = [o["kind"] for o in objects]
    assert "ClusterRoleBinding" in kinds, kinds
    (binding,) = _by_kind(objects, "ClusterRoleBinding")
    assert binding == waypoint_rbac("demo", "waypoint")
    assert [o for o in objects if o["kind"] in ("Role", "RoleBinding")] == \
        gateway_status_rbac("demo", "waypoint")
    (deployment,) = _by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        InstallOptions().image
    assert _all_problems(objects, version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_gateway_apply_dry_run_for_kubernetes_validates(
        version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind",
        "clusters": [{"name": "kind", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "kind", "user": {"token": "t"}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "kind",
                                                  "namespace": "demo"}}]}))
    assert ambientctl(["gateway", "apply", "--dry-run", "--kubeconfig", str(kubeconfig),
                       "--name", "edge", "--tls-secret", "edge-cert"]) == 0
    objects = _docs(capsys.readouterr().out)
    assert [o["kind"] for o in objects] == ["Gateway", "ServiceAccount", "Deployment",
                                            "Service", "ClusterRoleBinding", "Role",
                                            "RoleBinding"]
    assert objects[4:] == proxy_rbac("demo", "edge", secrets=["edge-cert"])
    (deployment,) = _by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        InstallOptions().image
    assert _all_problems(objects, version) == []


def test_the_crd_check_catches_a_misspelt_field() -> None:
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "wp", "namespace": "demo"},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocl": "HBONE"}]}}
    found = problems(gateway, KUBERNETES_VERSION)
    assert any("protocl" in p for p in found), found


def test_the_schema_check_catches_a_misspelt_field() -> None:
    ds = _daemonset()
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    found = problems(ds, KUBERNETES_VERSION)
    assert any("hostNetwrok" in p for p in found), found


# -- RBAC -------------------------------------------------------------------------------------


def _rules(objects: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    (role,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


@pytest.mark.parametrize("role", ["pyambient-ztunnel", "pyambient-waypoint"])
def test_cluster_roles_only_read_the_mesh_kinds(role: str) -> None:
    rules = _rules(_base_objects(), "ClusterRole", role)
    granted = set()
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames tricks
        assert sorted(rule["verbs"]) == ["get", "list", "watch"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource)
                granted.add((group, resource))
    wanted = {(by_kind(k).group, by_kind(k).plural) for k in DESIGN_KINDS}
    assert granted == wanted


def test_what_discovery_watches_is_granted() -> None:
    granted = {(g, r) for g, resources in READ_RESOURCES for r in resources}
    for kind in KINDS:
        rt = by_kind(kind)
        assert (rt.group, rt.plural) in granted, kind


def test_secrets_only_through_a_role_in_ambient_system() -> None:
    objects = _base_objects()
    secret_rules = [(o, r) for o in objects for r in o.get("rules", [])
                    if "secrets" in r["resources"]]
    assert secret_rules
    for role, rule in secret_rules:
        assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE
        assert rule["resources"] == ["secrets"]
        if "get" in rule["verbs"]:
            assert rule["verbs"] == ["get"] and rule["resourceNames"] == [CA_SECRET]
        else:
            assert rule["verbs"] == ["create"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == secret_rules[0][0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ZTUNNEL,
                                    "namespace": NAMESPACE}]


def test_ztunnel_cluster_role_is_bound_to_its_service_account_only() -> None:
    (binding,) = [o for o in _base_objects() if o["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == "pyambient-ztunnel"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ZTUNNEL,
                                    "namespace": NAMESPACE}]
    assert _daemonset()["spec"]["template"]["spec"]["serviceAccountName"] == ZTUNNEL


# -- the DaemonSet ----------------------------------------------------------------------------


def test_capabilities_are_only_what_in_pod_capture_needs() -> None:
    sc = _ztunnel_container()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "SYS_ADMIN"]
    text = (K8S / "daemonset.yaml").read_text()
    for capability in sc["capabilities"]["add"]:  # each justified, in the manifest too
        assert CAPABILITIES[capability].strip()
        assert f"- {capability}  # {CAPABILITIES[capability]}" in text
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    (init,) = _daemonset()["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pod = _daemonset()["spec"]["template"]["spec"]
    assert "hostPID" not in pod and "hostIPC" not in pod


def test_readiness_metrics_and_drain() -> None:
    container = _ztunnel_container()
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (15021, "/healthz/ready")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 15020, "readiness": 15021}
    args = container["args"]
    drain = float(args[args.index("--drain-seconds") + 1])
    grace = _daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain + 5  # SIGKILL only after the drain deadline, with room to exit


def test_ztunnel_args_are_accepted_by_ztunnel() -> None:
    container = _ztunnel_container()
    args = [a.replace("$(NODE_NAME)", "kind-worker") for a in container["args"]]
    options, level, json_logs = parse_ztunnel_args(args)
    assert options.node == "kind-worker" and json_logs and level == "info"
    assert (options.metrics_port, options.readiness_port) == (15020, 15021)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert str(options.ca_dir) == mounts["ca"]["mountPath"]
    assert {e["name"] for e in container["env"]} >= {"NODE_NAME"}


def test_pod_namespaces_are_visible_as_they_appear() -> None:
    mounts = {m["name"]: m for m in _ztunnel_container()["volumeMounts"]}
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    assert mounts["netns"]["readOnly"] is True
    volumes = {v["name"]: v for v in _daemonset()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["netns"]["hostPath"]["path"] == mounts["netns"]["mountPath"]
    assert volumes["ca"]["emptyDir"]["medium"] == "Memory"  # the CA key never hits a disk


# -- CRDs -------------------------------------------------------------------------------------


def test_crds_are_referenced_at_named_releases() -> None:
    crds = yaml.safe_load((K8S / "crds" / "kustomization.yaml").read_text())
    assert crds["resources"] == [url for _, url in CRD_SOURCES]
    gateway_api, istio = (url for _, url in CRD_SOURCES)
    match = re.search(r"/releases/download/v1\.(\d+)\.(\d+)/standard-install\.yaml$",
                      gateway_api)
    assert match and int(match.group(1)) >= 2
    assert re.search(r"/istio/istio/1\.\d+\.\d+/manifests/charts/base/files/"
                     r"crd-all\.gen\.yaml$", istio)
    for url in (gateway_api, istio):
        assert url.startswith("https://")
        assert not re.search(r"/(main|master|latest)/", url)


def test_crd_groups_cover_every_custom_kind_the_mesh_reads() -> None:
    custom = {(by_kind(k).group, by_kind(k).version) for k in DESIGN_KINDS
              if by_kind(k).group not in ("", "discovery.k8s.io")}
    assert custom == set(CRD_GROUPS)
