"""The consistent-hash key of a request (Istio ``consistentHash`` key sources).

Semantics (Istio "Destination Rule" ``ConsistentHashLB``; Envoy "Route"
``HashPolicy``):

* ``httpHeaderName``: the header's value (names are case-insensitive; the shell
  passes lower-case names).  Missing: no key.
* ``httpCookie``: the cookie's value.  Missing and a ``ttl`` set: the waypoint
  mints a cookie (a hash of the client address), hashes on it and sets it on the
  response, so the client sticks from its next request on.  Missing without
  ``ttl``: no key.
* ``useSourceIp``: the downstream client's IP address.
* ``httpQueryParameterName``: the first value of that query parameter (names
  are case-sensitive).  Missing: no key.

No key means the picker chooses at random (Envoy does the same).  Keys are
hashed with xxHash64 so every replica agrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

import xxhash

from waypoint.resilience.config import ConsistentHashSettings

_hash64 = xxhash.xxh64_intdigest


@dataclass(frozen=True, slots=True)
class HashKey:
    """A request's hash, and a ``Set-Cookie`` value when the waypoint minted the cookie."""

    value: int
    set_cookie: str | None = None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _query_param(path: str, name: str) -> str | None:
    _, sep, query = path.partition("?")
    if not sep:
        return None
    for key, value in parse_qsl(query.partition("#")[0], keep_blank_values=True):
        if key == name:
            return value
    return None


def request_hash(settings: ConsistentHashSettings, headers: Mapping[str, str], *,
                 source_ip: str, path: str = "/") -> HashKey | None:
    """The hash key for one request, or ``None`` if its key source is absent."""
    if settings.http_header_name is not None:
        value = headers.get(settings.http_header_name.lower())
        return None if value is None else HashKey(_hash64(value.encode()))
    if settings.use_source_ip:
        return HashKey(_hash64(source_ip.encode()))
    if settings.http_query_parameter_name is not None:
        param = _query_param(path, settings.http_query_parameter_name)
        return None if param is None else HashKey(_hash64(param.encode()))
    cookie = settings.http_cookie
    assert cookie is not None  # ConsistentHashSettings guarantees exactly one source
    found = _cookie(headers.get("cookie", ""), cookie.name)
    if found is not None:
        return HashKey(_hash64(found.encode()))
    if cookie.ttl is None:
        return None
    minted = format(_hash64(source_ip.encode(), 0x15710), "016x")
    attributes = [f"{cookie.name}={minted}", f"Max-Age={max(1, round(cookie.ttl))}"]
    if cookie.path:
        attributes.append(f"Path={cookie.path}")
    attributes.append("HttpOnly")
    return HashKey(_hash64(minted.encode()), "; ".join(attributes))
