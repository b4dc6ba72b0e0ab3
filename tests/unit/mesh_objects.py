"""Builders of API objects for the snapshot and decision tests (plain dicts through the models)."""

from __future__ import annotations

from typing import Any, TypeVar

from common.kube.objects import (
    AuthorizationPolicy,
    EndpointSlice,
    Gateway,
    HTTPRoute,
    Namespace,
    Node,
    PeerAuthentication,
    Pod,
    Resource,
    Service,
)

_counter = 0
R = TypeVar("R", bound=Resource)


def _rv() -> str:
    global _counter
    _counter += 1
    return str(_counter)


def namespace(name: str, **labels: str) -> Namespace:
    return Namespace.model_validate({"metadata": {"name": name, "labels": labels,
                                                  "resourceVersion": _rv()}})


def node(name: str, region: str = "", zone: str = "", subzone: str = "") -> Node:
    labels = {k: v for k, v in (("topology.kubernetes.io/region", region),
                                ("topology.kubernetes.io/zone", zone),
                                ("topology.istio.io/subzone", subzone)) if v}
    return Node.model_validate({"metadata": {"name": name, "labels": labels,
                                             "resourceVersion": _rv()}})


def pod(name: str, ns: str = "demo", ip: str | None = "10.1.0.1", node_name: str = "node-1",
        labels: dict[str, str] | None = None, sa: str | None = None, phase: str = "Running",
        ports: dict[str, int] | None = None, annotations: dict[str, str] | None = None,
        ready: bool | None = None, uid: str | None = None, host_network: bool = False
        ) -> Pod:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    container: dict[str, Any] = {"name": "app", "image": "echo"}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    spec: dict[str, Any] = {"nodeName": node_name, "containers": [container]}
    if sa:
        spec["serviceAccountName"] = sa
    if host_network:
        spec["hostNetwork"] = True
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}",
                     "labels": labels or {}, "annotations": annotations or {},
                     "resourceVersion": _rv()},
        "spec": spec, "status": status})


def service(name: str, ns: str = "demo", vip: str | None = "10.96.0.10",
            ports: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None
            ) -> Service:
    spec: dict[str, Any] = {"ports": ports if ports is not None else
                            [{"name": "http", "port": 80, "targetPort": 8080}],
                            "selector": {"app": name}}
    if vip:
        spec["clusterIP"] = vip
        spec["clusterIPs"] = [vip]
    return Service.model_validate({"metadata": {"name": name, "namespace": ns,
                                                "labels": labels or {}, "resourceVersion": _rv()},
                                   "spec": spec})


def endpoint(ip: str, pod_name: str | None = None, ns: str = "demo", ready: bool | None = True,
             node_name: str | None = "node-1", terminating: bool | None = None,
             zone: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "conditions": {}}
    if ready is not None:
        ep["conditions"]["ready"] = ready
    if terminating is not None:
        ep["conditions"]["terminating"] = terminating
    if node_name:
        ep["nodeName"] = node_name
    if zone:
        ep["zone"] = zone
    if pod_name:
        ep["targetRef"] = {"kind": "Pod", "name": pod_name, "namespace": ns,
                           "uid": f"uid-{ns}-{pod_name}"}
    return ep


def endpoint_slice(service_name: str, endpoints: list[dict[str, Any]], ns: str = "demo",
                   ports: dict[str, int] | None = None, name: str | None = None
                   ) -> EndpointSlice:
    slice_ports = [{"name": n, "port": p, "protocol": "TCP"}
                   for n, p in (ports if ports is not None else {"http": 8080}).items()]
    return EndpointSlice.model_validate({
        "metadata": {"name": name or f"{service_name}-abc", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name},
                     "resourceVersion": _rv()},
        "addressType": "IPv4", "endpoints": endpoints, "ports": slice_ports})


def waypoint_gateway(name: str = "waypoint", ns: str = "demo", waypoint_for: str | None = None,
                     listeners: list[dict[str, Any]] | None = None,
                     class_name: str = "istio-waypoint") -> Gateway:
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}
    return Gateway.model_validate({
        "metadata": {"name": name, "namespace": ns, "labels": labels, "resourceVersion": _rv()},
        "spec": {"gatewayClassName": class_name,
                 "listeners": listeners if listeners is not None else
                 [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})


def waypoint_pod(name: str, gateway: str = "waypoint", ns: str = "demo",
                 ip: str = "10.1.9.1", node_name: str = "node-1", sa: str | None = None
                 ) -> Pod:
    return pod(name, ns, ip, node_name, labels={"gateway.networking.k8s.io/gateway-name": gateway},
               sa=sa or gateway)


def authorization_policy(name: str, ns: str, spec: dict[str, Any]) -> AuthorizationPolicy:
    return AuthorizationPolicy.model_validate({
        "metadata": {"name": name, "namespace": ns, "resourceVersion": _rv()}, "spec": spec})


def peer_authentication(name: str, ns: str, mode: str) -> PeerAuthentication:
    return PeerAuthentication.model_validate({
        "metadata": {"name": name, "namespace": ns, "resourceVersion": _rv()},
        "spec": {"mtls": {"mode": mode}}})


def http_route(name: str, ns: str, parent: str) -> HTTPRoute:
    return HTTPRoute.model_validate({
        "metadata": {"name": name, "namespace": ns, "resourceVersion": _rv()},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                 "rules": [{"backendRefs": [{"name": parent, "port": 80}]}]}})


def relabel(obj: R, changes: dict[str, str | None]) -> R:
    """A copy of ``obj`` with labels set (None removes) and a new resourceVersion."""
    data = obj.model_copy(deep=True)
    for label, value in changes.items():
        if value is None:
            data.metadata.labels.pop(label, None)
        else:
            data.metadata.labels[label] = value
    data.metadata.resource_version = _rv()
    return data
