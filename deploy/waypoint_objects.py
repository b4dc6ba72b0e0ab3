"""The API objects of one waypoint, and the status its Gateway earns (pure functions).

A waypoint named ``NAME`` in namespace ``NS`` is four objects, all named ``NAME``:

* the ``Gateway`` (``gatewayClassName: istio-waypoint``, listener ``mesh`` 15008 HBONE),
  labelled ``istio.io/waypoint-for`` only when the traffic type is not the default
  (``service``), as ``istioctl waypoint apply`` leaves the default to the class;
* a ``ServiceAccount``: the waypoint's identity is ``spiffe://<td>/ns/NS/sa/NAME``;
* a ``Deployment`` of one pod labelled ``gateway.networking.k8s.io/gateway-name=NAME``
  (how the mesh finds a waypoint's pods) and ``istio.io/dataplane-mode=none`` (a
  waypoint's own traffic is never captured), running ``python -m waypoint --name NAME
  --namespace NS``: the local kubelet runs that command as a process, the project's image
  runs the same entry point on Kubernetes;
* a ``Service`` selecting those pods, port 15008 ``mesh`` (its VIP is the waypoint's
  address) and 15021 ``status-port`` as Istio's waypoint Service has.

The Deployment, Service and ServiceAccount carry an owner reference to the Gateway once
its uid is known, so that on Kubernetes deleting the Gateway deletes the rest.  Objects
are plain JSON-shaped dicts, ready for the API or for YAML.  :func:`dependants_of` gives
them for a Gateway that was applied on its own (Istio's documented alternative to
``istioctl waypoint apply``), for the local cluster's controller to create.

The status of a waypoint's Gateway (``Accepted``, ``Programmed``, addresses, listeners)
is written by the waypoint itself once it is ready (:mod:`waypoint.gateway_status`), on
the local cluster and on Kubernetes alike; :func:`condition_of` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from common.api.gateway import GatewaySpec
from common.errors import ConfigError
from common.kube import Gateway, Pod
from deploy.local.apiserver.validation import name_problem

GATEWAY_CLASS = "istio-waypoint"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
REVISION_LABEL = "istio.io/rev"

DEFAULT_NAME = "waypoint"
DEFAULT_IMAGE = "ambient/waypoint"
DEFAULT_TRAFFIC_TYPE = "service"
TRAFFIC_TYPES = ("service", "workload", "all", "none")
CONTAINER_NAME = "waypoint"

MESH_LISTENER = "mesh"
HBONE_PORT = 15008
METRICS_PORT = 15020
STATUS_PORT = 15021
READY_PATH = "/healthz/ready"

# The kubelet's downward API fills these on Kubernetes; the local kubelet sets the same
# names itself, so the waypoint reads one environment in both places.
_DOWNWARD_ENV = (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                 ("POD_IP", "status.podIP"), ("HOST_IP", "status.hostIP"),
                 ("NODE_NAME", "spec.nodeName"), ("SERVICE_ACCOUNT", "spec.serviceAccountName"))


@dataclass(frozen=True, kw_only=True)
class WaypointSpec:
    """What ``ambientctl waypoint apply`` was asked for; :meth:`check` says what is wrong."""

    namespace: str
    name: str = DEFAULT_NAME
    traffic_type: str | None = None  # None: no label, the class default (service)
    revision: str | None = None
    image: str = DEFAULT_IMAGE

    def check(self) -> None:
        """Raise ConfigError naming the flag whose value the API server would refuse."""
        if self.name == "none":
            raise ConfigError("--name none: 'none' is reserved (istio.io/use-waypoint=none "
                              "means no waypoint); choose another name")
        # The name becomes a Service name, hence a DNS label (no dots, at most 63).
        if problem := name_problem(self.name, True):
            raise ConfigError(f"--name: {problem}")
        if problem := name_problem(self.namespace, True):
            raise ConfigError(f"--namespace: {problem}")
        if self.traffic_type is not None and self.traffic_type not in TRAFFIC_TYPES:
            raise ConfigError(f"--for {self.traffic_type!r}: use one of "
                              f"{', '.join(TRAFFIC_TYPES)}")
        if self.revision is not None and (problem := name_problem(self.revision, True)):
            raise ConfigError(f"--revision: {problem}")
        if not self.image.strip():
            raise ConfigError("--image: must not be empty")

    @property
    def effective_traffic_type(self) -> str:
        return self.traffic_type or DEFAULT_TRAFFIC_TYPE


@dataclass(frozen=True)
class Owner:
    """The Gateway as an owner: known once the API server has given it a uid."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "name": self.name,
                "uid": self.uid, "controller": True}


def _meta(spec: WaypointSpec, labels: Mapping[str, str], owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace}
    if spec.revision:
        labels = {**labels, REVISION_LABEL: spec.revision}
    if labels:
        meta["labels"] = dict(labels)
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def _owned_labels(spec: WaypointSpec) -> dict[str, str]:
    """Labels of the Gateway's dependants: ``delete`` finds them by these too, when they
    were applied from ``--dry-run`` output without owner references."""
    return {GATEWAY_NAME_LABEL: spec.name}


def gateway(spec: WaypointSpec) -> dict[str, Any]:
    labels = {}
    if spec.traffic_type is not None and spec.traffic_type != DEFAULT_TRAFFIC_TYPE:
        labels[WAYPOINT_FOR_LABEL] = spec.traffic_type
    return {
        "apiVersion": GATEWAY_API_VERSION, "kind": "Gateway",
        "metadata": _meta(spec, labels, None),
        "spec": {"gatewayClassName": GATEWAY_CLASS,
                 "listeners": [{"name": MESH_LISTENER, "port": HBONE_PORT,
                                "protocol": "HBONE"}]},
    }


def service_account(spec: WaypointSpec, owner: Owner | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(spec, _owned_labels(spec), owner)}


def command(spec: WaypointSpec) -> list[str]:
    return ["python", "-m", "waypoint", "--name", spec.name, "--namespace", spec.namespace]


def deployment(spec: WaypointSpec, owner: Owner | None) -> dict[str, Any]:
    selector = {GATEWAY_NAME_LABEL: spec.name}
    pod_labels = {**selector, DATAPLANE_MODE_LABEL: "none"}
    if spec.revision:
        pod_labels[REVISION_LABEL] = spec.revision
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": command(spec),
        # status-port first: the local kubelet judges readiness by connecting to the
        # first port, which is then the port Kubernetes' readinessProbe asks.
        "ports": [{"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
                  {"name": MESH_LISTENER, "containerPort": HBONE_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
                for name, path in _DOWNWARD_ENV],
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": STATUS_PORT},
                           "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 4},
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(spec, _owned_labels(spec), owner),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"serviceAccountName": spec.name, "containers": [container]},
            },
        },
    }


def service(spec: WaypointSpec, owner: Owner | None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, _owned_labels(spec), owner),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: spec.name},
            "ports": [
                {"name": MESH_LISTENER, "port": HBONE_PORT, "targetPort": HBONE_PORT,
                 "protocol": "TCP"},
                {"name": "status-port", "port": STATUS_PORT, "targetPort": STATUS_PORT,
                 "protocol": "TCP"},
            ],
        },
    }


def dependants(spec: WaypointSpec, owner: Owner | None) -> list[dict[str, Any]]:
    """ServiceAccount, Deployment and Service, in the order they should be created."""
    return [service_account(spec, owner), deployment(spec, owner), service(spec, owner)]


def waypoint_objects(spec: WaypointSpec, owner: Owner | None = None) -> list[dict[str, Any]]:
    """All four objects, the Gateway first (``--dry-run`` prints exactly these)."""
    return [gateway(spec), *dependants(spec, owner)]


def owned_by_waypoint(meta: Mapping[str, Any], name: str) -> bool:
    """Whether an object's metadata says it belongs to waypoint ``name``."""
    if (meta.get("labels") or {}).get(GATEWAY_NAME_LABEL) == name:
        return True
    return any(ref.get("kind") == "Gateway" and ref.get("name") == name
               for ref in meta.get("ownerReferences") or [])


# -- validity and status -------------------------------------------------------------------


def _problems(gw: Gateway) -> str | None:
    """Why the Gateway cannot be a waypoint, or None."""
    try:
        spec = GatewaySpec.model_validate(gw.spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"spec.{where}: {first['msg']}"
    if not any(lst.port == HBONE_PORT and lst.protocol == "HBONE" for lst in spec.listeners):
        return (f"a waypoint needs a listener with port {HBONE_PORT} and protocol HBONE "
                f"(name it {MESH_LISTENER!r})")
    return None


def pod_ready(pod: Pod) -> bool:
    """Ready, and not on its way out."""
    return not pod.metadata.deletion_timestamp and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def dependants_of(gw: Gateway) -> list[dict[str, Any]]:
    """What a waypoint Gateway owns when nobody said otherwise (default image): what
    istiod's deployment controller would create for a Gateway applied on its own.  Empty
    for a Gateway that is not a valid waypoint, or is being deleted."""
    if gw.spec.get("gatewayClassName") != GATEWAY_CLASS or gw.metadata.deletion_timestamp \
            or not gw.metadata.uid or _problems(gw) is not None:
        return []
    spec = WaypointSpec(namespace=gw.metadata.namespace or "default", name=gw.metadata.name,
                        revision=gw.metadata.labels.get(REVISION_LABEL))
    return dependants(spec, Owner(gw.metadata.name, gw.metadata.uid))


def condition_of(gw: Gateway | Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The Gateway's condition of type ``kind`` (from a model or a raw object)."""
    status = gw.status if isinstance(gw, Gateway) else (gw.get("status") or {})
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None
