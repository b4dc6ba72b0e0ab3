"""Patch documents applied to stored objects: merge, strategic merge, JSON patch.

- ``application/merge-patch+json`` (RFC 7386): maps merge, ``null`` deletes, lists replace.
- ``application/strategic-merge-patch+json``: merge patch plus what kubectl sends: lists of
  maps with a known merge key (``containers`` by ``name``, ``ports`` by ``containerPort`` or
  ``port``, ...) merge element-wise, and the directives ``$patch: delete|replace``,
  ``$setElementOrder/...``, ``$retainKeys`` and ``$deleteFromPrimitiveList/...`` are honoured
  or dropped.  This is a subset of Kubernetes' schema-driven strategic merge, adequate for
  the kinds served here; lists without a known merge key are replaced, as in a merge patch.
- ``application/json-patch+json`` (RFC 6902): add, remove, replace, move, copy, test.
"""

from __future__ import annotations

import copy
from typing import Any

from . import status

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"

# Field name -> merge key candidates, the first present in the elements wins.
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "volumeMounts": ("mountPath",),
    "imagePullSecrets": ("name",), "ports": ("containerPort", "port"),
    "conditions": ("type",), "ownerReferences": ("uid",), "tolerations": ("key",),
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch of ``patch`` onto ``target`` (neither is modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key(field: str, items: list[Any]) -> str | None:
    for key in _MERGE_KEYS.get(field, ()):
        if items and all(isinstance(i, dict) and key in i for i in items):
            return key
    return None


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch (the subset described in the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith(("$setElementOrder/", "$retainKeys", "$patch")):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(field: str, current: list[Any], patch: list[Any]) -> list[Any]:
    # Directive elements ({"name": x, "$patch": "delete"}) carry the merge key too.
    key = _merge_key(field, patch)
    if key is None or not all(isinstance(c, dict) and key in c for c in current):
        return [copy.deepcopy(p) for p in patch if not _is_directive(p)]
    merged = [copy.deepcopy(c) for c in current]
    index = {c[key]: i for i, c in enumerate(merged)}
    deleted: set[Any] = set()
    for item in patch:
        if isinstance(item, dict) and item.get("$patch") == "delete":
            deleted.add(item.get(key))
        elif item[key] in index:
            merged[index[item[key]]] = strategic_merge_patch(merged[index[item[key]]], item)
        else:
            index[item[key]] = len(merged)
            merged.append(strategic_merge_patch({}, item))
    return [m for m in merged if m.get(key) not in deleted]


def _is_directive(item: Any) -> bool:
    return isinstance(item, dict) and "$patch" in item


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise status.bad_request(f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise status.bad_request(f"JSON patch path {path!r} does not exist")
    if not parts:
        raise status.bad_request("JSON patch cannot address the whole document")
    return node, parts[-1]


def _get(doc: Any, path: str) -> Any:
    parent, last = _parent(doc, _pointer(path), path)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise status.bad_request(f"JSON patch path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    parent, last = _parent(doc, _pointer(path), path)
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise status.bad_request(f"JSON patch path {path!r} does not exist")


def _add(doc: Any, path: str, value: Any) -> None:
    parent, last = _parent(doc, _pointer(path), path)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and last == "-":
        parent.append(value)
    elif isinstance(parent, list) and last.isdigit() and int(last) <= len(parent):
        parent.insert(int(last), value)
    else:
        raise status.bad_request(f"JSON patch path {path!r} cannot be added to")


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; a failed ``test`` or a bad path is a 400 (nothing applied)."""
    if not isinstance(operations, list):
        raise status.bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise status.bad_request(f"JSON patch operation {op!r} needs 'op' and 'path'")
        kind, path = op["op"], op["path"]
        if kind == "add":
            _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _remove(doc, path)
            _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            _add(doc, path, _remove(doc, op.get("from", "")))
        elif kind == "copy":
            _add(doc, path, copy.deepcopy(_get(doc, op.get("from", ""))))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise status.bad_request(f"JSON patch test failed at {path!r}")
        else:
            raise status.bad_request(f"unknown JSON patch operation {kind!r}")
    return doc


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> Any:
    """Apply a patch body of the given media type to ``target``."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == MERGE_PATCH:
        return merge_patch(target, patch)
    if media == STRATEGIC_MERGE_PATCH:
        return strategic_merge_patch(target, patch)
    if media == JSON_PATCH:
        return json_patch(target, patch)
    raise status.unsupported_media_type(content_type)
