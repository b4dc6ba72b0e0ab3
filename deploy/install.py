"""The mesh's install objects for a Kubernetes cluster (pure: render, never apply).

One source of truth: :func:`install_objects` renders the objects, ``deploy/k8s`` holds the
same objects as a kustomize base written by ``python -m deploy.install write deploy/k8s``
(a unit test fails when the two differ), and ``ambientctl install`` applies what this
module renders.  The CRDs the mesh reads are not copied here: :data:`CRD_SOURCES` names
them by URL at a pinned upstream release.

What an install is:

* namespace ``ambient-system`` (Pod Security ``privileged``: ztunnel needs host network,
  a host path and two capabilities, which ``baseline`` refuses);
* the ``ztunnel`` ServiceAccount, a ClusterRole that may only get/list/watch the kinds
  the mesh reads (DESIGN.md section 6), and a Role in ``ambient-system`` that may read
  the CA Secret ``ambient-ca`` by name and create it (on first start, when absent);
* a ClusterRole ``pyambient-waypoint`` with the same reads, bound per waypoint (or
  ingress gateway) by :func:`waypoint_rbac`, beside a Role in the proxy's namespace that
  may only get and patch its own Gateway's ``status`` (:func:`gateway_status_rbac`): the
  templates ``deploy/k8s/waypoint-rbac-template.yaml`` and ``gateway-rbac-template.yaml``
  hold the three objects, ``ambientctl waypoint|gateway apply`` creates them;
* the ztunnel DaemonSet: an init container that loads or creates the CA Secret into a
  memory-backed volume (:mod:`ztunnel.k8s_ca`), then ``ztunnel`` on the host network.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

NAMESPACE = "ambient-system"
CA_SECRET = "ambient-ca"
ZTUNNEL = "ztunnel"
ZTUNNEL_ROLE = "pyambient-ztunnel"
WAYPOINT_ROLE = "pyambient-waypoint"
STATUS_ROLE = "pyambient-gateway-status"
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
PART_OF = {"app.kubernetes.io/part-of": "pyambient"}
DEFAULT_IMAGE = "pyambient:0.1.0"
TRUST_DOMAIN = "cluster.local"

KUBERNETES_VERSION = "1.34"
"""The Kubernetes version the manifests are validated against (kind's node image)."""
OLDEST_KUBERNETES_VERSION = "1.30"
"""The oldest version they must also validate against (``appArmorProfile`` is 1.30+)."""

GATEWAY_API_VERSION = "v1.2.1"
ISTIO_VERSION = "1.24.2"
CRD_SOURCES: tuple[tuple[str, str], ...] = (
    ("Gateway API standard channel " + GATEWAY_API_VERSION,
     "https://github.com/kubernetes-sigs/gateway-api/releases/download/"
     f"{GATEWAY_API_VERSION}/standard-install.yaml"),
    ("Istio networking and security CRDs " + ISTIO_VERSION,
     f"https://raw.githubusercontent.com/istio/istio/{ISTIO_VERSION}/manifests/charts/base/"
     "files/crd-all.gen.yaml"),
)
"""(what, URL) of the CRDs the mesh reads, at named releases; applied server-side
(Istio's file is larger than client-side apply's annotation allows)."""

CRD_GROUPS: tuple[tuple[str, str], ...] = (
    ("gateway.networking.k8s.io", "v1"),
    ("networking.istio.io", "v1"),
    ("security.istio.io", "v1"),
)
"""API group versions that must be served before ztunnel can start its informers."""

# The kinds ztunnel and waypoints read (DESIGN.md section 6), by API group.
READ_RESOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("namespaces", "nodes", "pods", "services", "serviceaccounts")),
    ("discovery.k8s.io", ("endpointslices",)),
    ("gateway.networking.k8s.io", ("gateways", "httproutes")),
    ("networking.istio.io", ("virtualservices", "destinationrules", "serviceentries")),
    ("security.istio.io", ("authorizationpolicies", "peerauthentications")),
)
READ_VERBS = ("get", "list", "watch")

# Ports on the node (host network): DESIGN.md section 3.
METRICS_PORT = 15020
READINESS_PORT = 15021
READY_PATH = "/healthz/ready"
DRAIN_SECONDS = 20
# The kubelet's SIGKILL must come after the drain deadline, with room for the exit.
TERMINATION_GRACE_SECONDS = DRAIN_SECONDS + 10
CA_DIR = "/var/run/ambient/ca"
NETNS_DIR = "/var/run/netns"

CAPABILITIES: dict[str, str] = {
    "NET_ADMIN": "nft rules and policy routes in pod namespaces; SO_MARK and "
                 "IP_TRANSPARENT on ztunnel's sockets",
    "SYS_ADMIN": "setns() into pod network namespaces (listeners inside each pod) and "
                 "nsenter for nft",
}
"""The ztunnel container's only added capabilities, and why each is needed.  NET_RAW is
not: no raw sockets are opened, and IP_TRANSPARENT is allowed by NET_ADMIN alone."""


@dataclass(frozen=True, kw_only=True)
class InstallOptions:
    """What ``ambientctl install`` may change; the defaults render ``deploy/k8s``."""

    image: str = DEFAULT_IMAGE
    trust_domain: str = TRUST_DOMAIN
    log_level: str = "info"

    def check(self) -> None:
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise ConfigError(f"--image {self.image!r}: give an image reference such as "
                              f"{DEFAULT_IMAGE}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"--log-level {self.log_level!r}: use debug, info, warning "
                              "or error")


def _meta(name: str, namespace: str | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = {**PART_OF, **labels}
    return meta


def read_rules() -> list[dict[str, Any]]:
    """RBAC rules: get/list/watch on the mesh's kinds, nothing else."""
    return [{"apiGroups": [group], "resources": list(resources), "verbs": list(READ_VERBS)}
            for group, resources in READ_RESOURCES]


def namespace() -> dict[str, Any]:
    meta = _meta(NAMESPACE)
    meta["labels"].update({
        # ztunnel's pod needs host network, a host path and capabilities.
        "pod-security.kubernetes.io/enforce": "privileged",
        # The mesh's own pods are never captured.
        "istio.io/dataplane-mode": "none",
    })
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service_account() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(ZTUNNEL, NAMESPACE, app=ZTUNNEL)}


def rbac() -> list[dict[str, Any]]:
    """ztunnel's ClusterRole and Role (with bindings), and the waypoints' ClusterRole."""
    subject = [{"kind": "ServiceAccount", "name": ZTUNNEL, "namespace": NAMESPACE}]
    rbac_v1 = "rbac.authorization.k8s.io/v1"
    ref = {"apiGroup": "rbac.authorization.k8s.io"}
    return [
        {"apiVersion": rbac_v1, "kind": "ClusterRole", "metadata": _meta(ZTUNNEL_ROLE),
         "rules": read_rules()},
        {"apiVersion": rbac_v1, "kind": "ClusterRoleBinding", "metadata": _meta(ZTUNNEL_ROLE),
         "roleRef": {**ref, "kind": "ClusterRole", "name": ZTUNNEL_ROLE},
         "subjects": subject},
        {"apiVersion": rbac_v1, "kind": "Role", "metadata": _meta(f"{ZTUNNEL}-ca", NAMESPACE),
         "rules": [
             # Read only the CA Secret, by name.
             {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CA_SECRET],
              "verbs": ["get"]},
             # Create it on first start; RBAC cannot restrict create by name.
             {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
         ]},
        {"apiVersion": rbac_v1, "kind": "RoleBinding",
         "metadata": _meta(f"{ZTUNNEL}-ca", NAMESPACE),
         "roleRef": {**ref, "kind": "Role", "name": f"{ZTUNNEL}-ca"}, "subjects": subject},
        {"apiVersion": rbac_v1, "kind": "ClusterRole", "metadata": _meta(WAYPOINT_ROLE),
         "rules": read_rules()},
    ]


def waypoint_rbac(waypoint_namespace: str, waypoint_name: str) -> dict[str, Any]:
    """The binding that lets waypoint ``NS/NAME`` (its ServiceAccount is named like it)
    read the mesh's kinds; apply it beside ``ambientctl waypoint apply``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": _meta(f"{WAYPOINT_ROLE}-{waypoint_namespace}-{waypoint_name}",
                          **{GATEWAY_NAME_LABEL: waypoint_name}),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": WAYPOINT_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": waypoint_name,
                      "namespace": waypoint_namespace}],
    }


def gateway_status_role_name(gateway_name: str) -> str:
    return f"{STATUS_ROLE}-{gateway_name}"


def gateway_status_rbac(gateway_namespace: str, gateway_name: str, *,
                        secrets: Iterable[str] = (),
                        owner: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The Role and RoleBinding that let the proxy serving Gateway ``NS/NAME`` (its
    ServiceAccount is named like it) write that Gateway's status: ``get`` and ``patch``
    on ``gateways/status`` of that one Gateway, in its namespace only
    (:mod:`waypoint.gateway_status`); with ``secrets`` (an ingress gateway's TLS
    certificates) also ``get`` on those Secrets by name.  ``owner`` is an owner reference
    to the Gateway, so that deleting it deletes these too."""
    name = gateway_status_role_name(gateway_name)
    labels = {GATEWAY_NAME_LABEL: gateway_name}
    rules: list[dict[str, Any]] = [
        {"apiGroups": [GATEWAY_GROUP], "resources": ["gateways/status"],
         "resourceNames": [gateway_name], "verbs": ["get", "patch"]}]
    if secret_names := sorted(set(secrets)):
        rules.append({"apiGroups": [""], "resources": ["secrets"],
                      "resourceNames": secret_names, "verbs": ["get"]})
    role_meta = _meta(name, gateway_namespace, **labels)
    binding_meta = _meta(name, gateway_namespace, **labels)
    if owner is not None:
        role_meta["ownerReferences"] = [owner]
        binding_meta["ownerReferences"] = [owner]
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": role_meta,
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": binding_meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": gateway_name,
                       "namespace": gateway_namespace}]},
    ]


def proxy_rbac(gateway_namespace: str, gateway_name: str, *, secrets: Iterable[str] = (),
               owner: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Everything a waypoint or ingress gateway needs on Kubernetes: read the mesh
    (:func:`waypoint_rbac`) and write its own Gateway's status (:func:`gateway_status_rbac`)."""
    return [waypoint_rbac(gateway_namespace, gateway_name),
            *gateway_status_rbac(gateway_namespace, gateway_name, secrets=secrets, owner=owner)]


def _env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def daemonset(options: InstallOptions) -> dict[str, Any]:
    labels = {"app": ZTUNNEL}
    init = {
        "name": "ca",
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "ztunnel.k8s_ca", "--namespace", NAMESPACE,
                    "--secret", CA_SECRET, "--trust-domain", options.trust_domain,
                    "--out", CA_DIR],
        # Root without capabilities: the files it writes (key 0600) are then readable by
        # the ztunnel container, which runs as root too but without CAP_DAC_OVERRIDE.
        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "ca", "mountPath": CA_DIR}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "128Mi"}},
    }
    container = {
        "name": ZTUNNEL,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["ztunnel"],
        "args": ["--node", "$(NODE_NAME)", "--ca-dir", CA_DIR, "--find-netns",
                 "--trust-domain", options.trust_domain,
                 "--drain-seconds", str(DRAIN_SECONDS),
                 "--metrics-port", str(METRICS_PORT),
                 "--readiness-port", str(READINESS_PORT),
                 "--log-level", options.log_level, "--log-json"],
        "env": [_env("NODE_NAME", "spec.nodeName"), _env("POD_NAME", "metadata.name"),
                _env("POD_NAMESPACE", "metadata.namespace"),
                {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "readiness", "containerPort": READINESS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": READINESS_PORT},
                           "periodSeconds": 2, "timeoutSeconds": 1, "failureThreshold": 3},
        "securityContext": {
            # Entering other network namespaces and writing their nftables needs root
            # with the capabilities below; nothing else is granted.
            "runAsUser": 0,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": sorted(CAPABILITIES)},
            # Distribution AppArmor profiles (Ubuntu's) refuse setns even with SYS_ADMIN.
            "appArmorProfile": {"type": "Unconfined"},
        },
        "volumeMounts": [
            {"name": "ca", "mountPath": CA_DIR, "readOnly": True},
            # The runtime's pod namespaces (containerd: cni-<uuid>); HostToContainer so
            # that namespaces created after ztunnel started appear in the mount.
            {"name": "netns", "mountPath": NETNS_DIR, "readOnly": True,
             "mountPropagation": "HostToContainer"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "1Gi"}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": _meta(ZTUNNEL, NAMESPACE, **labels),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {**PART_OF, **labels},
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(METRICS_PORT)}},
                "spec": {
                    "serviceAccountName": ZTUNNEL,
                    # Pod namespaces are reached from the host's; operator ports are on
                    # the node (DESIGN.md section 3).
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    "tolerations": [{"operator": "Exists", "effect": "NoSchedule"},
                                    {"operator": "Exists", "effect": "NoExecute"},
                                    {"key": "CriticalAddonsOnly", "operator": "Exists"}],
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "initContainers": [init],
                    "containers": [container],
                    "volumes": [
                        {"name": "ca", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                        {"name": "netns", "hostPath": {"path": NETNS_DIR,
                                                       "type": "DirectoryOrCreate"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def install_objects(options: InstallOptions | None = None) -> list[dict[str, Any]]:
    """Every object of an install, in apply order (namespace first)."""
    options = options or InstallOptions()
    options.check()
    return [namespace(), service_account(), *rbac(), daemonset(options)]


# REST coordinates of the kinds an install (and the CRD files) contain:
# kind -> (URL prefix of its group version, plural, namespaced).
_REST: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Secret": ("/api/v1", "secrets", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1",
                                 "customresourcedefinitions", False),
    "ValidatingAdmissionPolicy": ("/apis/admissionregistration.k8s.io/v1",
                                  "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("/apis/admissionregistration.k8s.io/v1",
                                         "validatingadmissionpolicybindings", False),
}


def collection_path(kind: str, namespace: str | None = None) -> str:
    """URL path of a kind's collection (in ``namespace`` when it is namespaced)."""
    try:
        prefix, plural, namespaced = _REST[kind]
    except KeyError:
        raise ConfigError(f"ambientctl does not know where kind {kind!r} lives: apply that "
                          "document with kubectl instead") from None
    if namespaced:
        if not namespace:
            raise ConfigError(f"{kind} is namespaced: its metadata.namespace is missing")
        return f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{prefix}/{plural}"


def object_path(obj: dict[str, Any]) -> str:
    """URL path of one object of an install (or of a CRD file)."""
    meta = obj.get("metadata") or {}
    return f"{collection_path(str(obj.get('kind')), meta.get('namespace'))}/{meta['name']}"


def display(obj: dict[str, Any]) -> str:
    """kubectl's ``kind.group/name`` (``daemonset.apps/ztunnel``)."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    kind = str(obj.get("kind", "")).lower()
    return f"{kind}.{group}/{obj['metadata']['name']}" if group else \
        f"{kind}/{obj['metadata']['name']}"


# -- the kustomize base ---------------------------------------------------------------------

_HEADER = ("# Generated by `python -m deploy.install write deploy/k8s` from deploy/install.py;\n"
           "# edit that module and write again (tests/unit/test_k8s_manifests.py checks).\n")
WAYPOINT_TEMPLATE_NAMESPACE = "WAYPOINT_NAMESPACE"
WAYPOINT_TEMPLATE_NAME = "WAYPOINT_NAME"
GATEWAY_TEMPLATE_SECRET = "TLS_SECRET_NAME"


def _dump(objects: Iterable[dict[str, Any]]) -> str:
    return _HEADER + yaml.safe_dump_all(list(objects), sort_keys=False)


def _justify_capabilities(text: str) -> str:
    """Each added capability's line in the YAML carries its reason as a comment."""
    lines = []
    for line in text.splitlines():
        name = line.strip().removeprefix("- ")
        if line.strip().startswith("- ") and name in CAPABILITIES:
            line = f"{line}  # {CAPABILITIES[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def base_files() -> dict[str, str]:
    """File name -> content of ``deploy/k8s``."""
    options = InstallOptions()
    image_name, _, tag = options.image.rpartition(":")
    files = {
        "namespace.yaml": _dump([namespace()]),
        "serviceaccount.yaml": _dump([service_account()]),
        "rbac.yaml": _dump(rbac()),
        "daemonset.yaml": _justify_capabilities(_dump([daemonset(options)])),
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": list(files),
        # `kustomize edit set image pyambient=...` (or --image in ambientctl install).
        "images": [{"name": image_name, "newTag": tag}],
    }
    files["kustomization.yaml"] = _HEADER + yaml.safe_dump(kustomization, sort_keys=False)
    crds = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [url for _, url in CRD_SOURCES]}
    files["crds/kustomization.yaml"] = (
        _HEADER + "# Apply server-side: kubectl apply --server-side -k deploy/k8s/crds\n"
        + yaml.safe_dump(crds, sort_keys=False))
    files["waypoint-rbac-template.yaml"] = (
        _HEADER + f"# Replace {WAYPOINT_TEMPLATE_NAMESPACE} and {WAYPOINT_TEMPLATE_NAME} "
        "with the waypoint's namespace and name\n# (not part of the kustomization).  The "
        "waypoint reads the mesh and writes\n# its own Gateway's status.\n"
        + yaml.safe_dump_all(proxy_rbac(WAYPOINT_TEMPLATE_NAMESPACE, WAYPOINT_TEMPLATE_NAME),
                             sort_keys=False))
    files["gateway-rbac-template.yaml"] = (
        _HEADER + f"# Replace {WAYPOINT_TEMPLATE_NAMESPACE}, {WAYPOINT_TEMPLATE_NAME} and "
        f"{GATEWAY_TEMPLATE_SECRET} with the ingress\n# gateway's namespace, name and TLS "
        "Secret (drop that rule without HTTPS listeners;\n# not part of the kustomization).\n"
        + yaml.safe_dump_all(proxy_rbac(WAYPOINT_TEMPLATE_NAMESPACE, WAYPOINT_TEMPLATE_NAME,
                                        secrets=[GATEWAY_TEMPLATE_SECRET]), sort_keys=False))
    return files


def write_base(directory: Path) -> list[Path]:
    written = []
    for name, text in base_files().items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.install",
                                     description="Render the mesh's Kubernetes objects.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_write = sub.add_parser("write", help="write the kustomize base into DIR")
    p_write.add_argument("directory", type=Path)
    p_render = sub.add_parser("render", help="print the install objects as YAML")
    p_render.add_argument("--image", default=DEFAULT_IMAGE)
    p_wp = sub.add_parser("waypoint-rbac", help="print a waypoint's RBAC objects (read the "
                          "mesh, write its Gateway's status)")
    p_wp.add_argument("--namespace", required=True)
    p_wp.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            for path in write_base(args.directory):
                print(path)
        elif args.command == "render":
            sys.stdout.write(yaml.safe_dump_all(install_objects(InstallOptions(
                image=args.image)), sort_keys=False))
        else:
            sys.stdout.write(yaml.safe_dump_all(proxy_rbac(args.namespace, args.name),
                                                sort_keys=False))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
