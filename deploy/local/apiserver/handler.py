"""Request handling without sockets: a parsed request in, a response (or a watch plan) out.

The HTTP layer (:mod:`.server`) parses bytes with h11 and calls :meth:`ApiHandler.handle`;
everything Kubernetes-specific (URL layout, discovery, verbs, Status errors, Tables)
happens here, against the synchronous :class:`~.store.Store`, so it is tested directly.
A watch cannot be answered in one response: ``handle`` returns a :class:`WatchPlan` and
the HTTP layer streams it, using :func:`watch_events` to filter the stored history.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from common.errors import KubeApiError
from common.kube.resources import RESOURCES, ResourceType, by_group_plural, group_versions
from common.kube.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

from . import openapi, protobuf, status, tables
from .patch import apply_patch
from .store import Store, StoredEvent
from .validation import check_object

JSON = "application/json"
# Longest watch when the client gives no timeoutSeconds, like kube-apiserver's
# --min-request-timeout (1800 s); clients reconnect from their last resourceVersion.
DEFAULT_WATCH_TIMEOUT = 1800.0
SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-pyambient",
                  "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                  "goVersion": f"python{platform.python_version()}", "compiler": "cpython",
                  "platform": "linux/amd64"}
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as on the request line
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON


@dataclass(frozen=True)
class WatchPlan:
    """What a watch request asked for; the HTTP layer streams it."""

    rt: ResourceType
    version: str
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    resource_version: int | None  # None: start with the current state as ADDED events
    bookmarks: bool
    timeout: float
    # kubectl get -w asks for Tables: each event's object is then a one-row Table.
    table_include_object: str | None = None

    def render(self, kind: str, obj: dict[str, Any], resource_version: int) -> dict[str, Any]:
        """The object as this watch sends it (a one-row Table when one was asked for)."""
        if self.table_include_object is None or kind in ("BOOKMARK", "ERROR"):
            return obj
        return tables.table(self.rt, [obj], resource_version, self.table_include_object)


@dataclass(frozen=True)
class _Target:
    rt: ResourceType
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


def json_response(code: int, body: Any) -> Response:
    return Response(code, json.dumps(body, separators=(",", ":")).encode())


def error_response(error: KubeApiError) -> Response:
    body = error.status or status.status_body(error.code, error.reason, str(error))
    return json_response(error.code or 500, body)


def present(obj: dict[str, Any], rt: ResourceType, version: str) -> dict[str, Any]:
    """The stored object as served at ``version`` (stored once, served under aliases)."""
    if version == rt.version:
        return obj
    return {**obj, "apiVersion": rt.api_version_for(version)}


def watch_events(plan: WatchPlan, events: list[StoredEvent]) -> list[tuple[str, dict[str, Any]]]:
    """The stored events as this watch sees them through its selectors.

    An object that stops matching is seen as DELETED and one that starts matching as
    ADDED, as kube-apiserver does, so a selector-scoped cache never keeps stale entries.
    """
    seen: list[tuple[str, dict[str, Any]]] = []
    for event in events:
        now = _selected(plan, event.object)
        before = event.previous is not None and _selected(plan, event.previous)
        if event.type == "DELETED":
            kind = "DELETED" if now else None
        elif event.type == "ADDED":
            kind = "ADDED" if now else None
        elif now and before:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif before:
            kind = "DELETED"
        else:
            kind = None
        if kind is not None:
            seen.append((kind, present(event.object, plan.rt, plan.version)))
    return seen


def _selected(plan: WatchPlan, obj: dict[str, Any]) -> bool:
    return plan.labels.matches(obj.get("metadata", {}).get("labels")) and plan.fields.matches(obj)


def bookmark(plan: WatchPlan, resource_version: int) -> dict[str, Any]:
    return {"kind": plan.rt.kind, "apiVersion": plan.rt.api_version_for(plan.version),
            "metadata": {"resourceVersion": str(resource_version)}}


class ApiHandler:
    """Answers Kubernetes REST requests from a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def handle(self, request: Request) -> Response | WatchPlan:
        try:
            return self._handle(request)
        except KubeApiError as exc:
            return error_response(exc)

    def _handle(self, request: Request) -> Response | WatchPlan:
        split = urlsplit(request.target)
        path = unquote(split.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        discovery = self._discovery(path)
        if discovery is not None:
            if request.method != "GET":
                raise status.method_not_allowed(request.method, path)
            return discovery
        target = self._resolve(path)
        if target is None:
            raise status.unknown_path(path)
        method = request.method
        if query.get("dryRun") and method != "GET":
            # Better refused than silently performed: a dry run must never write.
            raise status.bad_request("dryRun is not supported by this API server; "
                                     "use client-side dry run (kubectl --dry-run=client)")
        if target.name is None:
            if method == "GET" and query.get("watch") in ("1", "true"):
                return self._watch_plan(target, query, request.headers)
            if method == "GET":
                return self._list(target, query, request.headers)
            if method == "POST":
                return self._create(target, request)
            if method == "DELETE":
                return self._delete_collection(target, query)
            raise status.method_not_allowed(method, path)
        if target.subresource == "scale" and target.rt.kind in _SCALABLE:
            return self._scale(target, request)
        if target.subresource not in (None, "status"):
            raise status.unknown_path(path)
        if method == "GET":
            return self._get(target, query, request.headers)
        if method == "PUT":
            return self._update(target, request)
        if method == "PATCH":
            return self._patch(target, request)
        if method == "DELETE" and target.subresource is None:
            return self._delete(target, request)
        raise status.method_not_allowed(method, path)

    # -- URLs ------------------------------------------------------------------------------

    def _discovery(self, path: str) -> Response | None:
        if path in ("/healthz", "/readyz", "/livez"):
            return Response(200, b"ok", "text/plain")
        if path == "/openapi/v3":
            return json_response(200, openapi.root_document())
        if path.startswith("/openapi/v3/"):
            rest = path.removeprefix("/openapi/v3/").split("/")
            doc = None
            if len(rest) == 2 and rest[0] == "api":
                doc = openapi.group_version_document("", rest[1])
            elif len(rest) == 3 and rest[0] == "apis":
                doc = openapi.group_version_document(rest[1], rest[2])
            return json_response(200, doc) if doc else None
        if path == "/version":
            return json_response(200, SERVER_VERSION)
        if path == "/api":
            return json_response(200, {"kind": "APIVersions", "versions": ["v1"],
                                       "serverAddressByClientCIDRs": []})
        groups = group_versions()
        if path == "/apis":
            return json_response(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                       "groups": [_api_group(g, vs) for g, vs in groups.items()]})
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"]:
            return json_response(200, _resource_list("", "v1"))
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return json_response(200, {"kind": "APIGroup", "apiVersion": "v1",
                                       **_api_group(parts[1], groups[parts[1]])})
        if len(parts) == 3 and parts[0] == "apis" and parts[2] in groups.get(parts[1], ()):
            return json_response(200, _resource_list(parts[1], parts[2]))
        return None

    def _resolve(self, path: str) -> _Target | None:
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace: str | None = None
        if (len(rest) >= 3 and rest[0] == "namespaces"
                and by_group_plural(group, version, rest[2]) is not None):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        rt = by_group_plural(group, version, rest[0])
        if rt is None or (namespace is not None and not rt.namespaced):
            return None
        name = rest[1] if len(rest) > 1 else None
        if name is not None and rt.namespaced and namespace is None:
            return None
        return _Target(rt, version, namespace, name, rest[2] if len(rest) > 2 else None)

    # -- verbs -----------------------------------------------------------------------------

    def _list(self, target: _Target, query: dict[str, str],
              headers: dict[str, str]) -> Response:
        labels, fields = _selectors(query)
        items, rv = self.store.list_objects(target.rt, target.namespace)
        items = [present(o, target.rt, target.version) for o in items
                 if labels.matches(o.get("metadata", {}).get("labels")) and fields.matches(o)]
        if _wants_table(headers):
            return json_response(200, tables.table(target.rt, items, rv,
                                                   query.get("includeObject", "Metadata")))
        return json_response(200, {
            "kind": f"{target.rt.kind}List",
            "apiVersion": target.rt.api_version_for(target.version),
            "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _watch_plan(self, target: _Target, query: dict[str, str],
                    headers: dict[str, str]) -> WatchPlan:
        labels, fields = _selectors(query)
        raw_rv = query.get("resourceVersion", "")
        if raw_rv in ("", "0"):
            rv: int | None = None
        elif raw_rv.isdigit():
            rv = int(raw_rv)
        else:
            raise status.bad_request(f"resourceVersion {raw_rv!r} is not a number")
        timeout = DEFAULT_WATCH_TIMEOUT
        if query.get("timeoutSeconds"):
            try:
                timeout = max(0.0, float(query["timeoutSeconds"]))
            except ValueError as exc:
                raise status.bad_request("timeoutSeconds must be a number") from exc
        return WatchPlan(target.rt, target.version, target.namespace, labels, fields, rv,
                         query.get("allowWatchBookmarks") in ("1", "true"), timeout,
                         query.get("includeObject", "Metadata") if _wants_table(headers)
                         else None)

    def _get(self, target: _Target, query: dict[str, str], headers: dict[str, str]) -> Response:
        assert target.name is not None
        obj = self.store.get(target.rt, target.namespace, target.name)
        if obj is None:
            raise status.not_found(target.rt, target.name)
        obj = present(obj, target.rt, target.version)
        if _wants_table(headers):
            return json_response(200, tables.table(target.rt, [obj], self.store.resource_version,
                                                   query.get("includeObject", "Metadata")))
        return json_response(200, obj)

    def _create(self, target: _Target, request: Request) -> Response:
        obj = check_object(target.rt, target.version, _body(request), target.namespace, None,
                           creating=True)
        obj["metadata"].pop("resourceVersion", None)
        return json_response(201, present(self.store.create(target.rt, obj), target.rt,
                                          target.version))

    def _update(self, target: _Target, request: Request) -> Response:
        obj = check_object(target.rt, target.version, _body(request), target.namespace,
                           target.name, creating=False)
        obj["metadata"]["name"] = target.name
        stored = self.store.update(target.rt, obj, status_only=target.subresource == "status")
        return json_response(200, present(stored, target.rt, target.version))

    def _patch(self, target: _Target, request: Request) -> Response:
        assert target.name is not None
        old = self.store.get(target.rt, target.namespace, target.name)
        if old is None:
            raise status.not_found(target.rt, target.name)
        patched = apply_patch(request.headers.get("content-type", JSON), old, _body(request))
        obj = check_object(target.rt, target.version, patched, target.namespace, target.name,
                           creating=False)
        stored = self.store.update(target.rt, obj, status_only=target.subresource == "status")
        return json_response(200, present(stored, target.rt, target.version))

    def _scale(self, target: _Target, request: Request) -> Response:
        """The ``/scale`` subresource (kubectl scale): an autoscaling/v1 Scale view of
        ``spec.replicas``; writes change only that field."""
        assert target.name is not None
        stored = self.store.get(target.rt, target.namespace, target.name)
        if stored is None:
            raise status.not_found(target.rt, target.name)
        current = _scale_of(stored)
        if request.method == "GET":
            return json_response(200, current)
        if request.method == "PUT":
            wanted = _body(request)
        elif request.method == "PATCH":
            wanted = apply_patch(request.headers.get("content-type", JSON), current,
                                 _body(request))
        else:
            raise status.method_not_allowed(request.method, request.target)
        replicas = wanted.get("spec", {}).get("replicas") if isinstance(wanted, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise status.invalid(target.rt, target.name, [
                ("spec.replicas", f"Invalid value: {replicas!r}: must be a non-negative integer")])
        updated = {**stored, "spec": {**stored.get("spec", {}), "replicas": replicas}}
        wanted_rv = wanted.get("metadata", {}).get("resourceVersion")
        updated["metadata"] = {**stored["metadata"], "resourceVersion": wanted_rv or None}
        return json_response(200, _scale_of(self.store.update(target.rt, updated)))

    def _delete_collection(self, target: _Target, query: dict[str, str]) -> Response:
        """deletecollection: every object the selectors match; answers the deleted list."""
        labels, fields = _selectors(query)
        items, _ = self.store.list_objects(target.rt, target.namespace)
        deleted = [self.store.delete(target.rt, o["metadata"].get("namespace"),
                                     o["metadata"]["name"]) for o in items
                   if labels.matches(o.get("metadata", {}).get("labels")) and fields.matches(o)]
        return json_response(200, {
            "kind": f"{target.rt.kind}List",
            "apiVersion": target.rt.api_version_for(target.version),
            "metadata": {"resourceVersion": str(self.store.resource_version)},
            "items": [present(o, target.rt, target.version) for o in deleted]})

    def _delete(self, target: _Target, request: Request) -> Response:
        assert target.name is not None
        options = _body(request) if request.body.strip() else {}
        pre = options.get("preconditions") if isinstance(options, dict) else None
        pre = pre if isinstance(pre, dict) else {}
        deleted = self.store.delete(target.rt, target.namespace, target.name,
                                    precondition_uid=pre.get("uid"),
                                    precondition_rv=pre.get("resourceVersion"))
        return json_response(200, present(deleted, target.rt, target.version))


_SCALABLE = {"Deployment"}


def _scale_of(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    selector = obj.get("spec", {}).get("selector", {}).get("matchLabels") or {}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": obj.get("spec", {}).get("replicas", 1)},
            "status": {"replicas": obj.get("status", {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))}}


def _body(request: Request) -> Any:
    media = request.headers.get("content-type", JSON).split(";", 1)[0].strip().lower()
    if media.startswith("application/vnd.kubernetes.protobuf"):
        # kubectl's generators (create namespace|secret|serviceaccount ...) send protobuf.
        try:
            return protobuf.decode(request.body)
        except (protobuf.ProtobufError, UnicodeDecodeError) as exc:
            raise status.unsupported_media_type(
                media, f"{exc}: send JSON instead (kubectl apply -f / create -f FILE)"
            ) from exc
    if media == "application/cbor":
        raise status.unsupported_media_type(media, "this server reads JSON")
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise status.bad_request(f"the request body is not valid JSON: {exc}") from exc


def _selectors(query: dict[str, str]) -> tuple[LabelSelector, FieldSelector]:
    try:
        return (parse_label_selector(query.get("labelSelector")),
                parse_field_selector(query.get("fieldSelector")))
    except SelectorError as exc:
        raise status.bad_request(str(exc)) from exc


def _wants_table(headers: dict[str, str]) -> bool:
    """True when the client prefers a Table (kubectl get); plain JSON is never refused."""
    accept = headers.get("accept", "")
    first = accept.split(",", 1)[0]
    return "as=Table" in first and "g=meta.k8s.io" in first


def _api_group(group: str, versions: tuple[str, ...]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def _resource_list(group: str, version: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for rt in RESOURCES:
        if rt.group != group or version not in rt.versions:
            continue
        resources.append({"name": rt.plural, "singularName": rt.singular,
                          "namespaced": rt.namespaced, "kind": rt.kind, "verbs": _VERBS,
                          **({"shortNames": list(rt.short_names)} if rt.short_names else {})})
        resources.append({"name": f"{rt.plural}/status", "singularName": "",
                          "namespaced": rt.namespaced, "kind": rt.kind,
                          "verbs": ["get", "patch", "update"]})
        if rt.kind in _SCALABLE:
            resources.append({"name": f"{rt.plural}/scale", "singularName": "",
                              "namespaced": rt.namespaced, "group": "autoscaling",
                              "version": "v1", "kind": "Scale",
                              "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
