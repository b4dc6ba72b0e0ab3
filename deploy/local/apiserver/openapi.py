"""Just enough OpenAPI v3 for ``kubectl apply`` to trust the server with validation.

kubectl (1.27+) validates documents before sending them.  It first asks ``/openapi/v3``
whether the server validates fields itself: for each kind it looks for a PATCH operation
tagged with the kind's ``x-kubernetes-group-version-kind`` that accepts the
``fieldValidation`` query parameter.  If it finds one it leaves validation to the server;
otherwise it downloads the whole ``/openapi/v2`` schema and fails without it.  So the
documents served here describe the operations (with that parameter) and no schemas; the
server's own checks (:mod:`.validation`) are the validation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from common.kube.resources import RESOURCES, group_versions

_FIELD_VALIDATION = {"name": "fieldValidation", "in": "query",
                     "description": "accepted for kubectl; the server validates every write",
                     "schema": {"type": "string", "uniqueItems": True}}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _all_group_versions() -> list[tuple[str, str]]:
    return [("", "v1")] + [(g, v) for g, vs in group_versions().items() for v in vs]


def group_version_document(group: str, version: str) -> dict[str, Any] | None:
    """The OpenAPI v3 document of one group/version, or None if it is not served."""
    if (group, version) not in _all_group_versions():
        return None
    paths: dict[str, Any] = {}
    for rt in RESOURCES:
        if rt.group != group or version not in rt.versions:
            continue
        gvk = {"group": group, "version": version, "kind": rt.kind}
        base = f"/{_gv_path(group, version)}"
        item = (f"{base}/namespaces/{{namespace}}/{rt.plural}/{{name}}" if rt.namespaced
                else f"{base}/{rt.plural}/{{name}}")
        collection = item.rsplit("/", 1)[0]
        operation = {"x-kubernetes-group-version-kind": gvk, "parameters": [_FIELD_VALIDATION],
                     "responses": {"200": {"description": "OK"}}}
        paths[item] = {"get": operation, "put": operation, "patch": operation,
                       "delete": operation}
        paths[collection] = {"get": operation, "post": operation}
    return {"openapi": "3.0.0", "info": {"title": "pyambient local API", "version": version},
            "paths": paths, "components": {"schemas": {}}}


def root_document() -> dict[str, Any]:
    """``/openapi/v3``: one entry per group/version, each with a content hash, as served."""
    paths = {}
    for group, version in _all_group_versions():
        doc = json.dumps(group_version_document(group, version), sort_keys=True).encode()
        digest = hashlib.sha256(doc).hexdigest()[:32].upper()
        path = _gv_path(group, version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}
