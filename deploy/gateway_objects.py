"""The objects of an ingress gateway, as ``ambientctl gateway apply`` writes them.

Pure functions (unit-tested): a Gateway of class ``pyambient`` (the project's ingress
class; Istio's ``istio`` is served too) with an HTTP listener and, when a TLS Secret is
named, an HTTPS one; its ServiceAccount; a Deployment running ``waypoint --mode
ingress``; a Service exposing the listener ports.  Owner references make the Gateway's
deletion enough (the local cluster's controller collects owned objects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from deploy.local.apiserver.validation import name_problem
from deploy.waypoint_objects import (
    DATAPLANE_MODE_LABEL,
    DEFAULT_IMAGE,
    GATEWAY_API_VERSION,
    GATEWAY_NAME_LABEL,
    METRICS_PORT,
    READY_PATH,
    STATUS_PORT,
    Owner,
)

INGRESS_CLASS = "pyambient"
INGRESS_CLASSES = (INGRESS_CLASS, "istio")
DEFAULT_NAME = "ingress"
DEFAULT_HTTP_PORT = 80
DEFAULT_HTTPS_PORT = 443
CONTAINER_NAME = "ingress"


@dataclass(frozen=True, kw_only=True)
class GatewaySpec:
    namespace: str
    name: str = DEFAULT_NAME
    http_port: int | None = DEFAULT_HTTP_PORT
    https_port: int = DEFAULT_HTTPS_PORT
    tls_secrets: tuple[str, ...] = ()
    hostname: str | None = None
    image: str = DEFAULT_IMAGE

    def check(self) -> None:
        if problem := name_problem(self.name, True):
            raise ConfigError(f"--name: {problem}")
        if problem := name_problem(self.namespace, True):
            raise ConfigError(f"--namespace: {problem}")
        if self.http_port is None and not self.tls_secrets:
            raise ConfigError("no listener: give --http-port, or --tls-secret for HTTPS")
        ports = [p for p in (self.http_port, self.https_port if self.tls_secrets else None)
                 if p is not None]
        if len(set(ports)) != len(ports) or any(not 1 <= p <= 65535 for p in ports):
            raise ConfigError(f"listener ports {ports} must be distinct, 1-65535")
        if any(p in (STATUS_PORT, METRICS_PORT, 15000, 15008) for p in ports):
            raise ConfigError("listener ports must not be 15000, 15008, 15020 or 15021 "
                              "(the gateway's admin, HBONE and status ports)")

    @property
    def listeners(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        host = {"hostname": self.hostname} if self.hostname else {}
        if self.http_port is not None:
            out.append({"name": "http", "port": self.http_port, "protocol": "HTTP", **host,
                        "allowedRoutes": {"namespaces": {"from": "All"}}})
        if self.tls_secrets:
            out.append({"name": "https", "port": self.https_port, "protocol": "HTTPS", **host,
                        "tls": {"mode": "Terminate", "certificateRefs": [
                            {"kind": "Secret", "group": "", "name": s}
                            for s in self.tls_secrets]},
                        "allowedRoutes": {"namespaces": {"from": "All"}}})
        return out


def _meta(spec: GatewaySpec, owner: Owner | None, labels: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace}
    if labels:
        meta["labels"] = {GATEWAY_NAME_LABEL: spec.name}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def gateway(spec: GatewaySpec) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway",
            "metadata": _meta(spec, None, labels=False),
            "spec": {"gatewayClassName": INGRESS_CLASS, "listeners": spec.listeners}}


def listener_ports(gw_spec: dict[str, Any]) -> list[int]:
    """The HTTP/HTTPS ports of a Gateway spec (what the Deployment and Service expose)."""
    return [int(lst["port"]) for lst in gw_spec.get("listeners") or []
            if lst.get("protocol") in ("HTTP", "HTTPS")]


def command(spec: GatewaySpec) -> list[str]:
    return ["python", "-m", "waypoint", "--mode", "ingress", "--name", spec.name,
            "--namespace", spec.namespace]


def deployment(spec: GatewaySpec, ports: list[int], owner: Owner | None) -> dict[str, Any]:
    selector = {GATEWAY_NAME_LABEL: spec.name}
    container = {
        "name": CONTAINER_NAME, "image": spec.image, "command": command(spec),
        # status-port first: the local kubelet judges readiness by the first port.
        "ports": [{"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
                  *({"name": f"listener-{p}", "containerPort": p, "protocol": "TCP"}
                    for p in ports),
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "readinessProbe": {"httpGet": {"path": READY_PATH, "port": STATUS_PORT},
                           "periodSeconds": 5},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, owner),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": {**selector,
                                                          DATAPLANE_MODE_LABEL: "none"}},
                                  "spec": {"serviceAccountName": spec.name,
                                           "containers": [container]}}}}


def service(spec: GatewaySpec, ports: list[int], owner: Owner | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, owner),
            "spec": {"type": "ClusterIP", "selector": {GATEWAY_NAME_LABEL: spec.name},
                     "ports": [{"name": f"listener-{p}", "port": p, "targetPort": p,
                                "protocol": "TCP"} for p in ports]}}


def dependants(spec: GatewaySpec, ports: list[int], owner: Owner | None
               ) -> list[dict[str, Any]]:
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, owner)}
    return [account, deployment(spec, ports, owner), service(spec, ports, owner)]


def gateway_objects(spec: GatewaySpec, owner: Owner | None = None) -> list[dict[str, Any]]:
    """The Gateway first, then what it owns (``--dry-run`` prints exactly these)."""
    gw = gateway(spec)
    return [gw, *dependants(spec, listener_ports(gw["spec"]), owner)]
