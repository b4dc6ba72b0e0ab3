"""Kubernetes ``Status`` objects for every failure the API server reports.

Each helper returns a :class:`~common.errors.KubeApiError` carrying the Status body
in the shape kube-apiserver writes (kind Status, apiVersion v1, status Failure,
message, reason, details, code), so the handlers raise and the HTTP layer serialises.
"""

from __future__ import annotations

from typing import Any

from common.errors import KubeApiError, ResourceExpiredError
from common.kube.resources import ResourceType


def status_body(code: int, reason: str, message: str,
                details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message, "reason": reason,
                            "code": code}
    if details:
        body["details"] = details
    return body


def _error(code: int, reason: str, message: str,
           details: dict[str, Any] | None = None) -> KubeApiError:
    return KubeApiError(code, reason, message, status_body(code, reason, message, details))


def _details(rt: ResourceType, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return details


def _qualified(rt: ResourceType) -> str:
    return f"{rt.plural}.{rt.group}" if rt.group else rt.plural


def not_found(rt: ResourceType, name: str) -> KubeApiError:
    return _error(404, "NotFound", f'{_qualified(rt)} "{name}" not found', _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> KubeApiError:
    return _error(409, "AlreadyExists", f'{_qualified(rt)} "{name}" already exists',
                  _details(rt, name))


def conflict(rt: ResourceType, name: str) -> KubeApiError:
    return _error(409, "Conflict",
                  f'Operation cannot be fulfilled on {_qualified(rt)} "{name}": the object has '
                  "been modified; please apply your changes to the latest version and try again",
                  _details(rt, name))


def invalid(rt: ResourceType, name: str, causes: list[tuple[str, str]]) -> KubeApiError:
    """422 Invalid; ``causes`` are (field, message) pairs, as in ``details.causes``."""
    summary = ", ".join(f"{field}: {message}" for field, message in causes)
    details: dict[str, Any] = {"name": name, "kind": rt.kind,
                               "causes": [{"reason": "FieldValueInvalid", "message": message,
                                           "field": field} for field, message in causes]}
    if rt.group:
        details["group"] = rt.group
    return _error(422, "Invalid", f'{rt.kind} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> KubeApiError:
    return _error(400, "BadRequest", message)


def unknown_path(path: str) -> KubeApiError:
    cause = {"reason": "UnexpectedServerResponse", "message": "404 page not found"}
    return _error(404, "NotFound", f"the server could not find the requested resource ({path})",
                  {"causes": [cause]})


def method_not_allowed(method: str, path: str) -> KubeApiError:
    return _error(405, "MethodNotAllowed",
                  f"the server does not allow this method on the requested resource "
                  f"({method} {path})")


def unsupported_media_type(content_type: str, hint: str | None = None) -> KubeApiError:
    return _error(415, "UnsupportedMediaType",
                  f"the body of the request was in an unknown format ({content_type}): "
                  + (hint or "use application/json, application/merge-patch+json, "
                     "application/strategic-merge-patch+json or application/json-patch+json"))


def too_large(limit: int) -> KubeApiError:
    return _error(413, "RequestEntityTooLarge", f"request body larger than {limit} bytes")


def expired(requested: int, oldest: int) -> ResourceExpiredError:
    """410 Expired, worded as kube-apiserver's watch cache words it."""
    message = f"too old resource version: {requested} ({oldest})"
    return ResourceExpiredError(410, "Expired", message, status_body(410, "Expired", message))


def from_the_future(requested: int, newest: int) -> ResourceExpiredError:
    """410 for a version newer than the store: it was reset, so the client must list again.

    kube-apiserver answers 504 "Too large resource version" here because its cache may
    just be behind; a single SQLite store is never behind, so the version can only come
    from an earlier database.
    """
    message = (f"resource version {requested} is newer than this server's newest ({newest}): "
               "the store was reset; list again")
    return ResourceExpiredError(410, "Expired", message, status_body(410, "Expired", message))
