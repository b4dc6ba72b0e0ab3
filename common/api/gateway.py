"""Spec models of ``gateway.networking.k8s.io/v1`` ``Gateway`` and ``HTTPRoute``.

Field names, defaults and enums follow the Gateway API reference (``apis/v1``),
including the experimental ``HTTPRouteRule.retry`` (``HTTPRouteRetry``).  These
models check shape only (types, enums, required fields, CRD bounds); meaning
(regexes, references, precedence) is the route translator's job.  Defaults the
CRD applies on the server (``PathPrefix /``, ``Exact``, weight 1, status 302)
are applied here too, so objects from a server that did not default them read
the same.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from common.api.base import ApiModel, GatewayDuration

HTTPMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH"]


class ParentReference(ApiModel):
    """Where a route attaches: a Gateway (north-south) or a Service (GAMMA, mesh)."""

    group: str = "gateway.networking.k8s.io"
    kind: str = "Gateway"
    namespace: str | None = None
    name: str
    section_name: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def is_service(self) -> bool:
        """True for a GAMMA parent: core group ``""``, kind ``Service``."""
        return self.group in ("", "core") and self.kind == "Service"


class BackendObjectReference(ApiModel):
    """A backend: by default a Kubernetes Service in the route's namespace."""

    group: str = ""
    kind: str = "Service"
    name: str
    namespace: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)


class HTTPPathMatch(ApiModel):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", max_length=1024)


class HTTPHeaderMatch(ApiModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=4096)


class HTTPQueryParamMatch(ApiModel):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=1024)


class HTTPRouteMatch(ApiModel):
    """One match: every condition given must hold (AND)."""

    path: HTTPPathMatch = Field(default_factory=HTTPPathMatch)
    headers: tuple[HTTPHeaderMatch, ...] = Field(default=(), max_length=16)
    query_params: tuple[HTTPQueryParamMatch, ...] = Field(default=(), max_length=16)
    method: HTTPMethod | None = None


class HTTPHeader(ApiModel):
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=4096)


class HTTPHeaderFilter(ApiModel):
    """``RequestHeaderModifier`` / ``ResponseHeaderModifier``: set, add (append), remove."""

    set: tuple[HTTPHeader, ...] = Field(default=(), max_length=16)
    add: tuple[HTTPHeader, ...] = Field(default=(), max_length=16)
    remove: tuple[str, ...] = Field(default=(), max_length=16)


class HTTPPathModifier(ApiModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(default=None, max_length=1024)
    replace_prefix_match: str | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _value_matches_type(self) -> HTTPPathModifier:
        if self.type == "ReplaceFullPath" and (self.replace_full_path is None
                                               or self.replace_prefix_match is not None):
            raise ValueError("type ReplaceFullPath needs replaceFullPath (and only it)")
        if self.type == "ReplacePrefixMatch" and (self.replace_prefix_match is None
                                                  or self.replace_full_path is not None):
            raise ValueError("type ReplacePrefixMatch needs replacePrefixMatch (and only it)")
        return self


class HTTPRequestRedirectFilter(ApiModel):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    status_code: Literal[301, 302, 303, 307, 308] = 302


class HTTPURLRewriteFilter(ApiModel):
    hostname: str | None = None
    path: HTTPPathModifier | None = None


class Fraction(ApiModel):
    numerator: int = Field(ge=0)
    denominator: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _at_most_one(self) -> Fraction:
        if self.numerator > self.denominator:
            raise ValueError("numerator must be <= denominator")
        return self


class HTTPRequestMirrorFilter(ApiModel):
    backend_ref: BackendObjectReference
    percent: int | None = Field(default=None, ge=0, le=100)
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _one_share(self) -> HTTPRequestMirrorFilter:
        if self.percent is not None and self.fraction is not None:
            raise ValueError("set percent or fraction, not both")
        return self


class LocalObjectReference(ApiModel):
    group: str
    kind: str
    name: str


FilterType = Literal["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
                     "RequestRedirect", "URLRewrite", "CORS", "ExternalAuth", "ExtensionRef"]


class HTTPRouteFilter(ApiModel):
    """One filter; exactly the member named by ``type`` is set."""

    type: FilterType
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = None
    cors: dict[str, Any] | None = None
    external_auth: dict[str, Any] | None = None
    extension_ref: LocalObjectReference | None = None

    @model_validator(mode="after")
    def _member_matches_type(self) -> HTTPRouteFilter:
        members = {"RequestHeaderModifier": "request_header_modifier",
                   "ResponseHeaderModifier": "response_header_modifier",
                   "RequestMirror": "request_mirror", "RequestRedirect": "request_redirect",
                   "URLRewrite": "url_rewrite", "CORS": "cors", "ExternalAuth": "external_auth",
                   "ExtensionRef": "extension_ref"}
        wanted = members[self.type]
        for member in members.values():
            present = getattr(self, member) is not None
            wire = type(self).model_fields[member].alias
            if member == wanted and not present:
                raise ValueError(f"filter type {self.type} needs its {wire} member set")
            if member != wanted and present:
                raise ValueError(f"filter type {self.type} must not set {wire}")
        return self


class HTTPBackendRef(BackendObjectReference):
    """A weighted backend of a rule, with optional per-backend filters."""

    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: tuple[HTTPRouteFilter, ...] = Field(default=(), max_length=16)


class HTTPRouteTimeouts(ApiModel):
    request: GatewayDuration | None = None
    backend_request: GatewayDuration | None = None


class HTTPRouteRetry(ApiModel):
    """Experimental ``HTTPRouteRetry``: ``attempts`` retries after the first try."""

    codes: tuple[int, ...] = ()
    attempts: int | None = Field(default=None, ge=0)
    backoff: GatewayDuration | None = None

    @model_validator(mode="after")
    def _codes_in_range(self) -> HTTPRouteRetry:
        bad = [c for c in self.codes if not 400 <= c <= 599]
        if bad:
            raise ValueError(f"retry codes must be 400-599, got {bad}")
        return self


class HTTPRouteRule(ApiModel):
    name: str | None = None
    matches: tuple[HTTPRouteMatch, ...] = Field(
        default_factory=lambda: (HTTPRouteMatch(),), max_length=64)
    filters: tuple[HTTPRouteFilter, ...] = Field(default=(), max_length=16)
    backend_refs: tuple[HTTPBackendRef, ...] = ()
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None
    session_persistence: dict[str, Any] | None = None


class HTTPRouteSpec(ApiModel):
    """``HTTPRoute.spec``.  GAMMA: ``hostnames`` are ignored for Service parents (GEP-1294)."""

    parent_refs: tuple[ParentReference, ...] = Field(default=(), max_length=32)
    hostnames: tuple[str, ...] = Field(default=(), max_length=16)
    rules: tuple[HTTPRouteRule, ...] = Field(
        default_factory=lambda: (HTTPRouteRule(),), max_length=16)


class RouteNamespaces(ApiModel):
    from_: Literal["All", "Same", "Selector"] = Field(default="Same", alias="from")
    selector: dict[str, Any] | None = None


class RouteGroupKind(ApiModel):
    group: str = "gateway.networking.k8s.io"
    kind: str


class AllowedRoutes(ApiModel):
    namespaces: RouteNamespaces = Field(default_factory=RouteNamespaces)
    kinds: tuple[RouteGroupKind, ...] = ()


class Listener(ApiModel):
    name: str
    hostname: str | None = None
    port: int = Field(ge=1, le=65535)
    protocol: str
    tls: dict[str, Any] | None = None
    allowed_routes: AllowedRoutes = Field(default_factory=AllowedRoutes)


class GatewayAddress(ApiModel):
    type: str = "IPAddress"
    value: str


class GatewayInfrastructure(ApiModel):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    parameters_ref: dict[str, Any] | None = None


class GatewaySpec(ApiModel):
    """``Gateway.spec``; a waypoint: ``gatewayClassName: istio-waypoint``, an HBONE listener."""

    gateway_class_name: str
    listeners: tuple[Listener, ...] = Field(min_length=1, max_length=64)
    addresses: tuple[GatewayAddress, ...] = ()
    infrastructure: GatewayInfrastructure | None = None
