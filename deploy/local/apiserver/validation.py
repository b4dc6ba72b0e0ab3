"""Checks an object must pass before it is stored: shape, names, labels.

Minimal but real: what kube-apiserver rejects for every kind (missing or malformed
name, wrong apiVersion/kind for the URL, bad label keys and values, namespace in the
body differing from the URL).  Kind-specific schemas are not checked here.
"""

from __future__ import annotations

import re
from typing import Any

from common.kube.resources import ResourceType

from . import status

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

_LABEL_RULE = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
               "or '-', and must start and end with an alphanumeric character")
_SUBDOMAIN_RULE = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                   "characters, '-' or '.', and must start and end with an alphanumeric character")


def name_problem(name: str, label_only: bool) -> str | None:
    """Why ``name`` is not a valid object name, or None when it is."""
    if label_only:
        if len(name) > 63:
            return f'Invalid value: "{name}": must be no more than 63 characters'
        if not _LABEL.match(name):
            return f'Invalid value: "{name}": {_LABEL_RULE}'
        return None
    if len(name) > 253:
        return f'Invalid value: "{name}": must be no more than 253 characters'
    if not _SUBDOMAIN.match(name):
        return f'Invalid value: "{name}": {_SUBDOMAIN_RULE}'
    return None


def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return f'Invalid value: "{key}": prefix part {_SUBDOMAIN_RULE}'
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (f'Invalid value: "{key}": name part must consist of alphanumeric characters, '
                "'-', '_' or '.', start and end with an alphanumeric character, "
                "at most 63 characters")
    return None


def _label_value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"Invalid value: {value!r}: label values must be strings"
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (f'Invalid value: "{value}": a valid label must be an empty string or consist of '
                "alphanumeric characters, '-', '_' or '.', at most 63 characters")
    return None


def check_object(rt: ResourceType, version: str, obj: Any, url_namespace: str | None,
                 url_name: str | None, *, creating: bool) -> dict[str, Any]:
    """Validate ``obj`` for ``rt`` served at ``version``; returns it with defaults filled.

    Raises 400 for a body of the wrong shape or kind, 422 Invalid for bad field values.
    """
    if not isinstance(obj, dict):
        raise status.bad_request(f"the body must be a JSON object for a {rt.kind}")
    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    if kind is not None and kind != rt.kind:
        raise status.bad_request(
            f"the kind {kind!r} of the body does not match the URL, which serves {rt.kind}")
    if api_version is not None and api_version not in {rt.api_version_for(v) for v in rt.versions}:
        raise status.bad_request(
            f"the apiVersion {api_version!r} of the body does not match the URL, which serves "
            f"{rt.api_version_for(version)}")
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise status.bad_request("metadata must be a JSON object")
    obj["kind"] = rt.kind
    obj["apiVersion"] = rt.api_version

    name = meta.get("name") or ""
    causes: list[tuple[str, str]] = []
    if not name and not (creating and meta.get("generateName")):
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif name and not isinstance(name, str):
        causes.append(("metadata.name", f"Invalid value: {name!r}: must be a string"))
    elif name and (problem := name_problem(name, rt.name_is_label)):
        causes.append(("metadata.name", problem))
    if url_name is not None and name and name != url_name:
        raise status.bad_request(
            f"the name of the object ({name}) does not match the name on the URL ({url_name})")

    if rt.namespaced:
        body_ns = meta.get("namespace")
        if body_ns and url_namespace is not None and body_ns != url_namespace:
            raise status.bad_request("the namespace of the provided object does not match the "
                                     "namespace sent on the request")
        if url_namespace is None and not body_ns:
            raise status.bad_request(f"a {rt.kind} needs a namespace (use .../namespaces/NS/...)")
        meta["namespace"] = body_ns or url_namespace
    else:
        meta.pop("namespace", None)

    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            causes.append((f"metadata.{field}", "Invalid value: must be a map of strings"))
            continue
        for key, item in value.items():
            if problem := _label_key_problem(key):
                causes.append((f"metadata.{field}", problem))
            if field == "labels" and (problem := _label_value_problem(item)):
                causes.append((f"metadata.labels.{key}", problem))
            elif field == "annotations" and not isinstance(item, str):
                causes.append((f"metadata.annotations.{key}",
                               "Invalid value: annotation values must be strings"))
    if causes:
        raise status.invalid(rt, name or str(meta.get("generateName", "")), causes)
    return obj

