"""The one Kubernetes API client of pyambient (httpx, usable from trio).

Typed verbs take a model class (``Pod``, ``Gateway``...) whose ``KIND`` selects the URL
from :mod:`common.kube.resources` and return instances of it; :meth:`KubeClient.request`
is the raw JSON layer under them, for callers (the CLI) that handle arbitrary documents.

Errors: a failure ``Status`` from the server raises :class:`~common.errors.KubeApiError`
(410 as :class:`~common.errors.ResourceExpiredError`); no answer at all raises
:class:`~common.errors.ApiServerUnreachableError`.  The informer loop on top of
:meth:`KubeClient.watch` is :func:`common.kube.watch.watch_kind`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import httpx
import pydantic

from common.errors import (
    ApiServerUnreachableError,
    InvalidObjectError,
    KubeApiError,
    ResourceExpiredError,
)
from common.kube.config import KubeConfig
from common.kube.objects import Resource
from common.kube.resources import ResourceType
from common.logging import get_logger

log = get_logger("kube.client")
R = TypeVar("R", bound=Resource)
PatchType = Literal["merge", "strategic", "json"]
_PATCH_MEDIA = {"merge": "application/merge-patch+json",
                "strategic": "application/strategic-merge-patch+json",
                "json": "application/json-patch+json"}
WatchEventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
# Kubernetes rotates projected tokens hourly; client-go re-reads the file every minute.
TOKEN_REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class ObjectList(Generic[R]):
    items: list[R]
    resource_version: str


@dataclass(frozen=True)
class RawWatchEvent:
    """One line of a watch stream (ERROR lines are raised, never returned)."""

    type: WatchEventType
    object: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        rv = self.object.get("metadata", {}).get("resourceVersion")
        return str(rv) if rv else None


class _BearerAuth(httpx.Auth):
    """A bearer token, from a string or a file re-read every :data:`TOKEN_REFRESH_SECONDS`."""

    def __init__(self, token: str | None, token_file: str | None) -> None:
        self._token = token
        self._file = token_file
        self._read_at = -TOKEN_REFRESH_SECONDS

    def _current(self) -> str | None:
        if self._file and time.monotonic() - self._read_at >= TOKEN_REFRESH_SECONDS:
            try:
                with open(self._file) as f:
                    self._token = f.read().strip()
            except OSError as exc:
                raise ApiServerUnreachableError(
                    0, "TokenUnreadable", f"cannot read the API token {self._file}: {exc}") from exc
            self._read_at = time.monotonic()
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


def status_error(code: int, body: bytes | str, url: str) -> KubeApiError:
    """The exception for a non-2xx answer: from its Status body, or a generic one."""
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        return error_from_status(status, default_code=code)
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    cls = ResourceExpiredError if code == 410 else KubeApiError
    return cls(code, "Unknown", f"the API server answered {code} for {url}: {text[:200]}")


def error_from_status(status: dict[str, Any], default_code: int = 500) -> KubeApiError:
    code = int(status.get("code") or default_code)
    reason = str(status.get("reason") or "Unknown")
    message = str(status.get("message") or reason)
    cls = ResourceExpiredError if code == 410 or reason in ("Expired", "Gone") else KubeApiError
    return cls(code, reason, message, status)


class KubeClient:
    """Talks to one API server; use as ``async with KubeClient(config) as client``."""

    def __init__(self, config: KubeConfig, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._timeout = timeout
        verify: Any = config.ssl_context() or True
        self._http = httpx.AsyncClient(
            base_url=config.server, verify=verify, transport=transport,
            auth=_BearerAuth(config.token, config.token_file), timeout=timeout,
            headers={"Accept": "application/json", "User-Agent": "pyambient"})

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- raw JSON ---------------------------------------------------------------------------

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      accept: str | None = None) -> Any:
        """One request; returns the decoded JSON answer or raises a KubeApiError."""
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        if accept:
            headers["Accept"] = accept
        try:
            response = await self._http.request(method, path, params=params, content=content,
                                                headers=headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise status_error(response.status_code, response.content, path)
        try:
            return response.json()
        except ValueError as exc:
            raise KubeApiError(response.status_code, "NotJSON",
                               f"{method} {path} answered {response.status_code} with a body "
                               "that is not JSON: is that address a Kubernetes API server?"
                               ) from exc

    def _unreachable(self, exc: Exception) -> ApiServerUnreachableError:
        return ApiServerUnreachableError(
            0, "Unreachable", f"cannot reach the API server at {self.config.server} "
            f"({type(exc).__name__}: {exc}): is it running, and is the address right?")

    async def watch(self, rt: ResourceType, *, namespace: str | None = None,
                    resource_version: str | None = None, label_selector: str | None = None,
                    field_selector: str | None = None, timeout_seconds: int | None = None,
                    allow_bookmarks: bool = True) -> AsyncGenerator[RawWatchEvent, None]:
        """One watch request, event by event, until the server ends it.

        An ERROR event raises (410 as ResourceExpiredError), as does a broken stream
        (ApiServerUnreachableError); events already yielded stay valid.
        """
        params = {"watch": "1", **_selectors(label_selector, field_selector)}
        if resource_version:
            params["resourceVersion"] = resource_version
        if allow_bookmarks:
            params["allowWatchBookmarks"] = "true"
        if timeout_seconds is not None:
            params["timeoutSeconds"] = str(timeout_seconds)
        # httpx's read timeout bounds the silence between two reads: events and bookmarks
        # keep a healthy stream talking, and a server that ends the watch on time has
        # closed it before this fires, so only a dead connection trips it.
        read = (timeout_seconds or 1800) + 30.0
        timeout = httpx.Timeout(self._timeout, read=read)
        path = rt.collection_path(namespace)
        try:
            async with self._http.stream("GET", path, params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    raise status_error(resp.status_code, await resp.aread(), path)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    yield _parse_event(line, path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    # -- typed verbs -----------------------------------------------------------------------

    async def get(self, kind: type[R], name: str, namespace: str | None = None) -> R:
        rt = kind.resource_type()
        return typed(kind, await self.request("GET", rt.object_path(
            name, _ns(rt, namespace, self.config))))

    async def list(self, kind: type[R], namespace: str | None = None, *,
                   label_selector: str | None = None,
                   field_selector: str | None = None,
                   skip_invalid: bool = False) -> ObjectList[R]:
        """Objects of ``kind`` in ``namespace`` (all namespaces when None).

        An item that does not fit the model raises InvalidObjectError, or with
        ``skip_invalid`` is logged and left out (one bad object must not blind an informer).
        """
        rt = kind.resource_type()
        data = await self.request("GET", rt.collection_path(namespace),
                                  params=_selectors(label_selector, field_selector))
        items: list[R] = []
        for item in data.get("items") or []:
            try:
                items.append(typed(kind, fill_type(item, rt)))
            except InvalidObjectError as exc:
                if not skip_invalid:
                    raise
                log.warning("invalid_object_skipped", kind=rt.kind, error=str(exc))
        return ObjectList(items, str(data.get("metadata", {}).get("resourceVersion", "")))

    async def create(self, obj: R) -> R:
        rt = type(obj).resource_type()
        ns = _ns(rt, obj.metadata.namespace, self.config)
        return typed(type(obj), await self.request(
            "POST", rt.collection_path(ns), body=obj.to_dict()))

    async def update(self, obj: R, *, status: bool = False) -> R:
        """PUT the object (or only its status); 409 Conflict when its resourceVersion is stale."""
        rt = type(obj).resource_type()
        path = rt.object_path(obj.metadata.name, _ns(rt, obj.metadata.namespace, self.config),
                              "status" if status else None)
        return typed(type(obj), await self.request("PUT", path, body=obj.to_dict()))

    async def patch(self, kind: type[R], name: str, patch: Any, namespace: str | None = None, *,
                    patch_type: PatchType = "merge", status: bool = False) -> R:
        rt = kind.resource_type()
        path = rt.object_path(name, _ns(rt, namespace, self.config), "status" if status else None)
        return typed(kind, await self.request("PATCH", path, body=patch,
                                              content_type=_PATCH_MEDIA[patch_type]))

    async def delete(self, kind: type[R], name: str, namespace: str | None = None) -> R | None:
        """Delete; returns the last state when the server sends it (None for a Status)."""
        rt = kind.resource_type()
        data = await self.request("DELETE", rt.object_path(name, _ns(rt, namespace, self.config)))
        return None if data.get("kind") == "Status" else typed(kind, fill_type(data, rt))


def typed(kind: type[R], data: Any) -> R:
    """``data`` as a ``kind`` model; InvalidObjectError names the object and the field."""
    try:
        return kind.model_validate(data)
    except pydantic.ValidationError as exc:
        meta = data.get("metadata", {}) if isinstance(data, dict) else {}
        where = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") \
            else str(meta.get("name"))
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidObjectError(f"{kind.__name__} {where}: {field}: {first['msg']} "
                                 f"({exc.error_count()} problem(s))") from exc


def fill_type(item: dict[str, Any], rt: ResourceType) -> dict[str, Any]:
    """List items from kube-apiserver omit kind and apiVersion; put them back."""
    item.setdefault("kind", rt.kind)
    item.setdefault("apiVersion", rt.api_version)
    return item


def _ns(rt: ResourceType, namespace: str | None, config: KubeConfig) -> str | None:
    if not rt.namespaced:
        return None
    return namespace or config.namespace


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _parse_event(line: str, path: str) -> RawWatchEvent:
    try:
        data = json.loads(line)
        kind, obj = data["type"], data["object"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KubeApiError(0, "BadWatchEvent",
                           f"watch on {path} sent a line that is not an event: {line[:200]!r}"
                           ) from exc
    if kind == "ERROR":
        raise error_from_status(obj if isinstance(obj, dict) else {})
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") or not isinstance(obj, dict):
        raise KubeApiError(0, "BadWatchEvent", f"watch on {path} sent unknown event {kind!r}")
    return RawWatchEvent(kind, obj)
