"""Server-side printing: the ``meta.k8s.io/v1`` Table kubectl asks for.

kubectl sends ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io,...`` and prints the
columns it gets back, adding NAMESPACE itself for ``-A`` from each row's object metadata.
Columns with priority 1 appear only with ``-o wide``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from common.kube.resources import ResourceType

Cell = str | int
Column = tuple[str, str, int, Callable[[dict[str, Any]], Cell]]  # name, type, priority, value


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 5h, 3d (``<unknown>`` without a timestamp)."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _get(obj: dict[str, Any], *path: str) -> Any:
    node: Any = obj
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _name(obj: dict[str, Any]) -> Cell:
    return str(_get(obj, "metadata", "name") or "")


def _age(obj: dict[str, Any]) -> Cell:
    return age(_get(obj, "metadata", "creationTimestamp"))


def _text(*path: str, default: str = "<none>") -> Callable[[dict[str, Any]], Cell]:
    def cell(obj: dict[str, Any]) -> Cell:
        value = _get(obj, *path)
        return default if value in (None, "") else str(value)
    return cell


def _pod_ready(obj: dict[str, Any]) -> Cell:
    containers = _get(obj, "spec", "containers") or []
    statuses = _get(obj, "status", "containerStatuses") or []
    ready = sum(1 for s in statuses if isinstance(s, dict) and s.get("ready"))
    if not statuses and _get(obj, "status", "phase") == "Running":
        ready = len(containers)
    return f"{ready}/{len(containers)}"


def _pod_status(obj: dict[str, Any]) -> Cell:
    if _get(obj, "metadata", "deletionTimestamp"):
        return "Terminating"
    return str(_get(obj, "status", "reason") or _get(obj, "status", "phase") or "Pending")


def _pod_restarts(obj: dict[str, Any]) -> Cell:
    statuses = _get(obj, "status", "containerStatuses") or []
    return sum(int(s.get("restartCount", 0)) for s in statuses if isinstance(s, dict))


def _service_ports(obj: dict[str, Any]) -> Cell:
    ports = _get(obj, "spec", "ports") or []
    text = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports
                    if isinstance(p, dict))
    return text or "<none>"


def _selector(obj: dict[str, Any]) -> Cell:
    selector = _get(obj, "spec", "selector") or {}
    if isinstance(selector, dict) and "matchLabels" in selector:
        selector = selector["matchLabels"] or {}
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>"


def _node_status(obj: dict[str, Any]) -> Cell:
    for cond in _get(obj, "status", "conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return "Ready" if cond.get("status") == "True" else "NotReady"
    return "Unknown"


def _deploy_ready(obj: dict[str, Any]) -> Cell:
    return f"{_get(obj, 'status', 'readyReplicas') or 0}/{_get(obj, 'spec', 'replicas') or 0}"


def _count(*path: str) -> Callable[[dict[str, Any]], Cell]:
    def cell(obj: dict[str, Any]) -> Cell:
        return int(_get(obj, *path) or 0)
    return cell


def _endpoints(obj: dict[str, Any]) -> Cell:
    addresses = [a for e in (_get(obj, "endpoints") or []) if isinstance(e, dict)
                 for a in e.get("addresses", [])]
    if not addresses:
        return "<unset>"
    more = f" + {len(addresses) - 3} more..." if len(addresses) > 3 else ""
    return ",".join(addresses[:3]) + more


def _joined(*path: str) -> Callable[[dict[str, Any]], Cell]:
    def cell(obj: dict[str, Any]) -> Cell:
        values = _get(obj, *path)
        return ",".join(map(str, values)) if isinstance(values, list) else ""
    return cell


def _condition(kind: str) -> Callable[[dict[str, Any]], Cell]:
    def cell(obj: dict[str, Any]) -> Cell:
        for cond in _get(obj, "status", "conditions") or []:
            if isinstance(cond, dict) and cond.get("type") == kind:
                return str(cond.get("status", "Unknown"))
        return "Unknown"
    return cell


_NAME: Column = ("Name", "string", 0, _name)
_AGE: Column = ("Age", "string", 0, _age)

COLUMNS: dict[str, list[Column]] = {
    "Pod": [_NAME, ("Ready", "string", 0, _pod_ready), ("Status", "string", 0, _pod_status),
            ("Restarts", "integer", 0, _pod_restarts), _AGE,
            ("IP", "string", 1, _text("status", "podIP")),
            ("Node", "string", 1, _text("spec", "nodeName"))],
    "Namespace": [_NAME, ("Status", "string", 0, _text("status", "phase", default="Active")),
                  _AGE],
    "Node": [_NAME, ("Status", "string", 0, _node_status),
             ("Roles", "string", 0, lambda _o: "<none>"), _AGE,
             ("Version", "string", 0, _text("status", "nodeInfo", "kubeletVersion", default=""))],
    "Service": [_NAME, ("Type", "string", 0, _text("spec", "type", default="ClusterIP")),
                ("Cluster-IP", "string", 0, _text("spec", "clusterIP")),
                ("External-IP", "string", 0, lambda _o: "<none>"),
                ("Port(s)", "string", 0, _service_ports), _AGE,
                ("Selector", "string", 1, _selector)],
    "Deployment": [_NAME, ("Ready", "string", 0, _deploy_ready),
                   ("Up-to-date", "integer", 0, _count("status", "updatedReplicas")),
                   ("Available", "integer", 0, _count("status", "availableReplicas")), _AGE,
                   ("Selector", "string", 1, _selector)],
    "EndpointSlice": [_NAME, ("AddressType", "string", 0, _text("addressType")),
                      ("Ports", "string", 0, lambda o: ",".join(
                          str(p.get("port")) for p in (o.get("ports") or [])
                          if isinstance(p, dict)) or "<unset>"),
                      ("Endpoints", "string", 0, _endpoints), _AGE],
    # The printer columns the Gateway API and Istio CRDs declare.
    "Gateway": [_NAME, ("Class", "string", 0, _text("spec", "gatewayClassName")),
                ("Address", "string", 0, lambda o: ",".join(
                    str(a.get("value")) for a in (_get(o, "status", "addresses") or [])
                    if isinstance(a, dict))),
                ("Programmed", "string", 0, _condition("Programmed")), _AGE],
    "HTTPRoute": [_NAME, ("Hostnames", "string", 0, _joined("spec", "hostnames")), _AGE],
    "VirtualService": [_NAME, ("Gateways", "string", 0, _joined("spec", "gateways")),
                       ("Hosts", "string", 0, _joined("spec", "hosts")), _AGE],
    "DestinationRule": [_NAME, ("Host", "string", 0, _text("spec", "host", default="")), _AGE],
    "ServiceEntry": [_NAME, ("Hosts", "string", 0, _joined("spec", "hosts")),
                     ("Location", "string", 0, _text("spec", "location", default="")),
                     ("Resolution", "string", 0, _text("spec", "resolution", default="")),
                     _AGE],
    "AuthorizationPolicy": [_NAME, ("Action", "string", 0,
                                    _text("spec", "action", default="ALLOW")), _AGE],
    "PeerAuthentication": [_NAME, ("Mode", "string", 0,
                                   _text("spec", "mtls", "mode", default="")), _AGE],
}


def table(rt: ResourceType, objects: list[dict[str, Any]], resource_version: int,
          include_object: str) -> dict[str, Any]:
    """The Table for ``objects``; ``include_object`` is None, Metadata (default) or Object."""
    columns = COLUMNS.get(rt.kind, [_NAME, _AGE])
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [value(obj) for _, _, _, value in columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj.get("metadata", {})}
        rows.append(row)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(resource_version)},
        "columnDefinitions": [
            {"name": name, "type": kind, "format": "name" if name == "Name" else "",
             "description": name, "priority": priority}
            for name, kind, priority, _ in columns],
        "rows": rows,
    }
