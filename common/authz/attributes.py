"""What each AuthorizationPolicy field and condition key means: parser, reader, and layer.

Every value is parsed and checked once here (ports, CIDRs, Istio's ``*`` forms, path
templates, service accounts); a bad one raises :class:`InvalidObjectError` naming
where it is (``spec.rules[0].from[1].source``).  :class:`Support` says where an
attribute can be evaluated: connection facts anywhere, HTTP attributes only at the
waypoint, request authentication (JWT) nowhere (not supported).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_network

from common.api.istio_security import Condition
from common.authz.model import (
    FieldMatch,
    IPAddress,
    IpField,
    IPNetwork,
    Layer,
    MatchKind,
    NetworkSet,
    PathTemplate,
    PortField,
    RequestContext,
    ServiceAccountField,
    StringMatch,
    StringSet,
    TextField,
    TextMatcher,
    header_reader,
    read_destination_ip,
    read_host,
    read_method,
    read_namespace,
    read_path,
    read_principal,
    read_remote_ip,
    read_sni,
    read_source_ip,
)
from common.errors import InvalidObjectError


class Support(enum.Enum):
    """Where an attribute can be evaluated."""

    ANY = "any"          # connection facts: both layers
    HTTP = "http"        # needs the request: waypoint only
    NONE = "none"        # needs request authentication (JWT), which is not supported


# --- value parsers (each raises InvalidObjectError naming the field) ---------------------


def _string_match(value: str, where: str, *, lower: bool = False) -> StringMatch:
    if not value:
        raise InvalidObjectError(f"{where}: empty value")
    if lower:
        value = value.lower()
    if value == "*":
        return StringMatch(MatchKind.PRESENCE, "")
    if "*" in value[1:-1] or (value.startswith("*") and value.endswith("*")):
        raise InvalidObjectError(
            f"{where}: {value!r} has '*' in the middle or at both ends; a value may be exact "
            f"('abc'), a prefix ('abc*'), a suffix ('*abc') or '*' alone")
    if value.startswith("*"):
        return StringMatch(MatchKind.SUFFIX, value[1:])
    if value.endswith("*"):
        return StringMatch(MatchKind.PREFIX, value[:-1])
    return StringMatch(MatchKind.EXACT, value)


def _principal_match(value: str, where: str) -> StringMatch:
    if value.startswith("spiffe://"):
        raise InvalidObjectError(
            f"{where}: {value!r}: write principals without 'spiffe://', e.g. "
            f"'cluster.local/ns/default/sa/sleep'")
    return _string_match(value, where)


_TEMPLATE_OPERATOR = re.compile(r"\{\*\*\}|\{\*\}")


def _path_match(value: str, where: str) -> TextMatcher:
    if "{*}" not in value and "{**}" not in value:
        return _string_match(value, where)
    if not value.startswith("/"):
        raise InvalidObjectError(f"{where}: path template {value!r} must start with '/'")
    pattern = ""
    last = 0
    seen_any_rest = False
    for op in _TEMPLATE_OPERATOR.finditer(value):
        literal = value[last:op.start()]
        if seen_any_rest:
            raise InvalidObjectError(
                f"{where}: in {value!r}, '{{**}}' must be the last operator")
        pattern += _template_literal(literal, value, where)
        if op.group() == "{**}":
            seen_any_rest = True
            pattern += ".*"
        else:
            pattern += "[^/]+"
        last = op.end()
    pattern += _template_literal(value[last:], value, where)
    return PathTemplate(value, re.compile(pattern))


def _template_literal(literal: str, template: str, where: str) -> str:
    if any(c in literal for c in "*{}"):
        raise InvalidObjectError(
            f"{where}: path template {template!r} may use only the operators '{{*}}' and "
            f"'{{**}}' (no other '*', '{{' or '}}')")
    return re.escape(literal)


def _port(value: str, where: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise InvalidObjectError(f"{where}: {value!r} is not a port number (1-65535)")
    return int(value)


def _network(value: str, where: str) -> IPNetwork:
    try:
        return ip_network(value, strict=False)
    except ValueError:
        raise InvalidObjectError(
            f"{where}: {value!r} is not an IP address or CIDR block") from None


def _service_account(value: str, where: str, policy_ns: str) -> tuple[str, str]:
    ns, slash, sa = value.rpartition("/")
    if not slash:
        ns = policy_ns
    if not sa or not ns or "/" in ns or "*" in value:
        raise InvalidObjectError(
            f"{where}: {value!r} is not a service account ('name' in the policy's namespace, "
            f"or 'namespace/name'; no wildcards)")
    return ns, sa


# --- field builders ----------------------------------------------------------------------

Builder = Callable[[list[str], list[str], str, str], FieldMatch]
_Reader = Callable[[RequestContext], str | None]


def _unauthenticated(_ctx: RequestContext) -> str | None:
    """Request-authentication attributes: no request carries a validated JWT here."""
    return None


def _text(attribute: str, read: _Reader,
          parse: Callable[[str, str], TextMatcher]) -> Builder:
    def build(values: list[str], not_values: list[str], where: str, _ns: str) -> FieldMatch:
        return TextField(attribute, read, StringSet.of(parse(v, where) for v in values),
                         StringSet.of(parse(v, where) for v in not_values))
    return build


def _ips(attribute: str, read: Callable[[RequestContext], IPAddress | None]) -> Builder:
    def build(values: list[str], not_values: list[str], where: str, _ns: str) -> FieldMatch:
        return IpField(attribute, read, NetworkSet.of(_network(v, where) for v in values),
                       NetworkSet.of(_network(v, where) for v in not_values))
    return build


def _ports(attribute: str) -> Builder:
    def build(values: list[str], not_values: list[str], where: str, _ns: str) -> FieldMatch:
        return PortField(attribute, frozenset(_port(v, where) for v in values),
                         frozenset(_port(v, where) for v in not_values))
    return build


def _accounts(values: list[str], not_values: list[str], where: str, ns: str) -> FieldMatch:
    return ServiceAccountField("source.serviceAccount",
                               frozenset(_service_account(v, where, ns) for v in values),
                               frozenset(_service_account(v, where, ns) for v in not_values))


def _lower_match(value: str, where: str) -> TextMatcher:
    return _string_match(value, where, lower=True)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    attr: str          # attribute of the pydantic model
    wire: str          # spelling in YAML, for messages
    support: Support
    build: Builder


SOURCE_FIELDS = (
    FieldSpec("principals", "principals", Support.ANY,
              _text("source.principal", read_principal, _principal_match)),
    FieldSpec("request_principals", "requestPrincipals", Support.NONE,
              _text("request.auth.principal", _unauthenticated, _string_match)),
    FieldSpec("namespaces", "namespaces", Support.ANY,
              _text("source.namespace", read_namespace, _string_match)),
    FieldSpec("service_accounts", "serviceAccounts", Support.ANY, _accounts),
    FieldSpec("ip_blocks", "ipBlocks", Support.ANY, _ips("source.ip", read_source_ip)),
    FieldSpec("remote_ip_blocks", "remoteIpBlocks", Support.HTTP,
              _ips("remote.ip", read_remote_ip)),
)

OPERATION_FIELDS = (
    FieldSpec("hosts", "hosts", Support.HTTP, _text("request.host", read_host, _lower_match)),
    FieldSpec("ports", "ports", Support.ANY, _ports("destination.port")),
    FieldSpec("methods", "methods", Support.HTTP,
              _text("request.method", read_method, _string_match)),
    FieldSpec("paths", "paths", Support.HTTP, _text("request.path", read_path, _path_match)),
)

_CONDITIONS: dict[str, tuple[Support, Builder]] = {
    "source.ip": (Support.ANY, _ips("source.ip", read_source_ip)),
    "source.namespace": (Support.ANY, _text("source.namespace", read_namespace, _string_match)),
    "source.principal": (Support.ANY,
                         _text("source.principal", read_principal, _principal_match)),
    "destination.ip": (Support.ANY, _ips("destination.ip", read_destination_ip)),
    "destination.port": (Support.ANY, _ports("destination.port")),
    "remote.ip": (Support.HTTP, _ips("remote.ip", read_remote_ip)),
    "connection.sni": (Support.HTTP, _text("connection.sni", read_sni, _string_match)),
}

_HEADER_KEY = re.compile(r"request\.headers\[([^\]]+)\]")


def condition(cond: Condition, where: str) -> tuple[Support, Builder]:
    known = _CONDITIONS.get(cond.key)
    if known is not None:
        return known
    header = _HEADER_KEY.fullmatch(cond.key)
    if header is not None:
        name = header.group(1)
        return Support.HTTP, _text(cond.key, header_reader(name), _string_match)
    if cond.key.startswith(("request.auth.", "experimental.envoy.filters.")):
        return Support.NONE, _text(cond.key, _unauthenticated, _string_match)
    raise InvalidObjectError(
        f"{where}: unknown condition key {cond.key!r} (see Istio's authorization conditions: "
        f"source.ip, source.namespace, source.principal, destination.ip, destination.port, "
        f"remote.ip, connection.sni, request.headers[<name>], request.auth.*)")


def evaluable(support: Support, layer: Layer) -> bool:
    return support is Support.ANY or (support is Support.HTTP and layer is Layer.L7)
