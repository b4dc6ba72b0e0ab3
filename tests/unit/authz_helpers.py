"""Builders shared by the authorization tests: policy objects and request contexts."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

from common.authz.compile import (
    AuthorizationConfig,
    PolicyObject,
    compile_authorization_policies,
)
from common.authz.evaluate import check_connection, check_request
from common.authz.model import (
    Decision,
    GatewayRef,
    RequestContext,
    ServiceRef,
    WorkloadRef,
)
from common.identity import SpiffeId

WAYPOINT = GatewayRef("foo", "waypoint")
HTTPBIN = WorkloadRef("foo", {"app": "httpbin", "version": "v1"})


def policy(name: str, spec: Mapping[str, Any], namespace: str = "foo",
           dry_run: bool = False) -> PolicyObject:
    annotations = {"istio.io/dry-run": "true"} if dry_run else {}
    return PolicyObject(namespace, name, spec, annotations)


def compile_all(*objects: PolicyObject, root: str = "istio-system") -> AuthorizationConfig:
    return compile_authorization_policies(objects, root_namespace=root)


def ctx(ns: str | None = "default", sa: str = "sleep", *, src: str = "10.0.0.1",
        dst: str = "10.0.0.2", port: int = 80, td: str = "cluster.local",
        method: str | None = None, host: str | None = None, path: str | None = None,
        headers: Mapping[str, str] | None = None, remote: str | None = None,
        sni: str | None = None) -> RequestContext:
    """A connection from ``ns``/``sa`` (``ns=None``: plaintext), optionally with HTTP fields."""
    return RequestContext(
        source_identity=None if ns is None else SpiffeId(td, ns, sa),
        source_ip=ip_address(src), destination_ip=ip_address(dst), destination_port=port,
        method=method, host=host, path=path, headers=dict(headers or {}),
        remote_ip=None if remote is None else ip_address(remote), sni=sni)


def l4(cfg: AuthorizationConfig, request: RequestContext,
       workload: WorkloadRef = HTTPBIN) -> Decision:
    return check_connection(cfg.ztunnel, workload, request)


def l7(cfg: AuthorizationConfig, request: RequestContext,
       service: ServiceRef | None = None, gateway: GatewayRef = WAYPOINT) -> Decision:
    return check_request(cfg.waypoint, gateway, service, request)


def targeting_waypoint(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with ``targetRefs`` to the test waypoint (enforced at L7), without a selector."""
    rest = {k: v for k, v in spec.items() if k != "selector"}
    return {**rest, "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                    "name": WAYPOINT.name}]}
