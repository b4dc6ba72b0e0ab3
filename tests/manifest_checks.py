"""Offline validation of API objects: Kubernetes kinds against the pinned OpenAPI schemas
(``kubernetes-validate``), the mesh's CRD kinds against the spec models in common/api.

Used by the unit tests (every manifest the project ships or generates) and by the kind
tests (their manifests, before they are applied).
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
from pydantic import BaseModel, ValidationError

from common.api.base import field_errors
from common.api.gateway import GatewaySpec, HTTPRouteSpec
from common.api.istio_networking import DestinationRuleSpec, ServiceEntrySpec, VirtualServiceSpec
from common.api.istio_security import AuthorizationPolicySpec, PeerAuthenticationSpec
from common.kube.resources import lookup
from deploy.local.apiserver.validation import name_problem

CRD_SPECS: dict[str, type[BaseModel]] = {
    "Gateway": GatewaySpec,
    "HTTPRoute": HTTPRouteSpec,
    "VirtualService": VirtualServiceSpec,
    "DestinationRule": DestinationRuleSpec,
    "ServiceEntry": ServiceEntrySpec,
    "AuthorizationPolicy": AuthorizationPolicySpec,
    "PeerAuthentication": PeerAuthenticationSpec,
}
_CRD_METADATA = {"name", "namespace", "labels", "annotations", "ownerReferences"}


def problems(obj: dict[str, Any], k8s_version: str) -> list[str]:
    """What is wrong with ``obj`` (empty when it validates)."""
    kind = obj.get("kind")
    if kind in CRD_SPECS:
        return crd_problems(obj)
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        return [f"{kind} {obj.get('metadata', {}).get('name')}: {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def crd_problems(obj: dict[str, Any]) -> list[str]:
    """A structural check of one of the mesh's CRD kinds: apiVersion served, metadata
    shape, and the spec against the model the translator reads it with."""
    kind = str(obj.get("kind"))
    rt = lookup(kind)
    out: list[str] = []
    if rt is None:
        return [f"unknown kind {kind}"]
    if obj.get("apiVersion") not in {rt.api_version_for(v) for v in rt.versions}:
        out.append(f"{kind}: apiVersion {obj.get('apiVersion')!r} is not served")
    meta = obj.get("metadata") or {}
    if extra := set(meta) - _CRD_METADATA:
        out.append(f"{kind}: unexpected metadata fields {sorted(extra)}")
    if problem := name_problem(str(meta.get("name", "")), rt.name_is_label):
        out.append(f"{kind}: metadata.name: {problem}")
    if extra := set(obj) - {"apiVersion", "kind", "metadata", "spec"}:
        out.append(f"{kind}: unexpected top-level fields {sorted(extra)}")
    try:
        CRD_SPECS[kind].model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        out.extend(f"{kind} {meta.get('name')}: {path}: {msg}"
                   for path, msg in field_errors(exc))
    return out
