"""Request and response transformations of a route decision: headers, rewrites, redirects, mirrors.

Pure functions over strings and header containers; the HTTP shell calls them
with the decision of :func:`waypoint.routing.match.route`.

Semantics (Gateway API reference and conformance suite, Envoy/Istio docs):

* Header operations apply remove, then set, then add (Envoy applies removals
  before additions).  ``add`` appends: on a name -> value map the new value is
  joined with ``,`` (conformance expects ``some-other-value,add-appends-values``);
  on a list of pairs it adds another line.  Names are case-insensitive.
* ``ReplacePrefixMatch`` (Gateway API): the matched prefix, trailing ``/``
  ignored, is replaced on a segment boundary; ``/foo`` + ``/xyz`` turns
  ``/foo/bar`` into ``/xyz/bar`` and an empty result into ``/``.  Istio
  ``rewrite.uri`` after a prefix match replaces the matched characters as they
  are (Envoy ``prefix_rewrite``).
* Redirect ``Location`` (Gateway API): scheme defaults to the request's; port
  is the explicit one, else the well-known port of an explicit scheme, else the
  port the request came in on; the port is omitted for http/80 and https/443.
  The query string is kept (Envoy's default).
* A mirrored request's Host gets ``-shadow`` appended to the host part
  (``echo:8080`` -> ``echo-shadow:8080``), as Envoy does for Istio mirrors.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from waypoint.routing.model import (
    HeaderOps,
    PathKind,
    PathRewrite,
    PathRewriteKind,
    Redirect,
    RequestMatch,
)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_target(target: str) -> tuple[str, str]:
    """``/a/b?x=1`` -> (``/a/b``, ``x=1``); the query is ``""`` when absent."""
    path, _, query = target.partition("?")
    return path, query


def join_target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port or None)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return authority, None
        host, rest = authority[:end + 1], authority[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            return host, int(rest[1:])
        return host, None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None


def shadow_authority(authority: str) -> str:
    """The Host of a mirrored request: ``-shadow`` after the host, before any port."""
    host, port = split_authority(authority)
    return f"{host}-shadow" if port is None else f"{host}-shadow:{port}"


def replace_prefix(path: str, match: RequestMatch, replacement: str, gateway: bool) -> str:
    """Replace the prefix ``match`` matched in ``path`` by ``replacement``."""
    if gateway:
        prefix = match.path.rstrip("/")
        rest = path[len(prefix):]
        new = replacement.rstrip("/") + rest
        if not new.startswith("/"):
            new = "/" + new
        return new
    return replacement + path[len(match.path):]


def rewrite_path(path: str, match: RequestMatch, rewrite: PathRewrite) -> str:
    """The new path (no query) after ``rewrite`` for a request that hit ``match``."""
    if rewrite.kind is PathRewriteKind.FULL:
        return rewrite.value
    if rewrite.kind is PathRewriteKind.REGEX:
        assert rewrite.pattern is not None
        return rewrite.pattern.sub(rewrite.value, path)
    if match.path_kind is PathKind.PREFIX:
        return replace_prefix(path, match, rewrite.value, rewrite.gateway_semantics)
    # Istio: after an exact/regex/no uri match, rewrite.uri replaces the whole path.
    return rewrite.value


def redirect_location(redirect: Redirect, *, scheme: str, authority: str, port: int,
                      path: str, query: str, match: RequestMatch) -> str:
    """The ``Location`` of a redirect for a request on service ``port``."""
    req_host, host_port = split_authority(authority)
    new_scheme = redirect.scheme or scheme
    host = redirect.host or req_host
    if redirect.port is not None:
        new_port: int | None = redirect.port
    elif redirect.gateway_semantics:
        new_port = _DEFAULT_PORTS.get(redirect.scheme, port) if redirect.scheme else port
    elif redirect.derive_port_from_request:
        new_port = host_port if host_port is not None else port
    elif redirect.protocol_default_port or (redirect.scheme and redirect.scheme != scheme):
        new_port = None  # the new scheme's default port, which a Location leaves out
    else:
        new_port = host_port
    if new_port is not None and _DEFAULT_PORTS.get(new_scheme) == new_port:
        new_port = None
    new_path = rewrite_path(path, match, redirect.path) if redirect.path else path
    if "?" not in new_path:
        new_path = join_target(new_path, query)
    netloc = host if new_port is None else f"{host}:{new_port}"
    return f"{new_scheme}://{netloc}{new_path}"


def apply_header_ops(headers: MutableMapping[str, str], ops: HeaderOps) -> None:
    """Apply ``ops`` to a lower-case-name -> value map (repeated values comma-joined)."""
    for name in ops.remove:
        headers.pop(name, None)
    for name, value in ops.set:
        headers[name] = value
    for name, value in ops.add:
        old = headers.get(name)
        headers[name] = value if old is None else f"{old},{value}"


def apply_header_ops_pairs(pairs: list[tuple[bytes, bytes]],
                           ops: HeaderOps) -> list[tuple[bytes, bytes]]:
    """Apply ``ops`` to header lines (lower-case names), keeping order and repeated lines."""
    if not ops:
        return pairs
    drop = {n.encode("latin-1") for n in ops.remove}
    drop.update(n.encode("latin-1") for n, _ in ops.set)
    out = [(n, v) for n, v in pairs if n not in drop] if drop else list(pairs)
    out.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set)
    out.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add)
    return out
