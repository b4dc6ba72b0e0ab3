"""Compiled authorization policy: the types the per-connection and per-request check runs on.

Theory of operation.  :mod:`common.authz.compile` turns each AuthorizationPolicy into a
:class:`CompiledPolicy` once per config change; :mod:`common.authz.evaluate` then runs
on every new connection (ztunnel, L4) or request (waypoint, L7).  The nesting mirrors
Istio's semantics exactly, so each level is one loop:

* a policy matches when ANY of its rules matches (no rules: never);
* a rule matches when ALL of its clauses match (no clauses: always) -- ``from``,
  ``to`` and each ``when`` condition are one clause each;
* a clause matches when ANY of its alternatives matches (the entries of ``from`` or
  ``to``);
* an alternative matches when ALL of its fields match (no fields: always);
* a field matches when its value matches one of ``values`` (if any are given) and
  none of ``not_values``.

Matchers are built with everything precomputed (lower-cased hosts, parsed networks,
port sets, compiled path templates), so evaluation does no parsing.  The loops are
written out rather than ``any()``/``all()`` over generators (``noqa: SIM110``): on
this hot path the generator costs about twice as much.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

from common.identity import SpiffeId

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Layer(enum.Enum):
    """Where a policy is enforced: ztunnel (connections) or the waypoint (HTTP requests)."""

    L4 = "L4"
    L7 = "L7"


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """The destination workload of a connection: what selects ztunnel-enforced policies."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True, slots=True)
class GatewayRef:
    """A waypoint, named by its Gateway object."""

    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A Service a waypoint serves (policies can target it with ``targetRefs``)."""

    namespace: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestContext:
    """The attributes a policy can test.

    ztunnel fills the L4 fields: the peer's identity (``None`` for plaintext on 15006),
    the source IP as the destination sees it (the original client, not a node
    address), and the destination IP and port.  The waypoint adds the HTTP fields:
    ``headers`` keys must be lower case (multiple values joined by ``,``), ``path`` is
    the request target (a query string is ignored when matching), ``remote_ip`` is the
    client from ``X-Forwarded-For`` (``remoteIpBlocks``; defaults to ``source_ip``).
    """

    source_identity: SpiffeId | None
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    method: str | None = None
    host: str | None = None
    path: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _NO_HEADERS)
    remote_ip: IPAddress | None = None
    sni: str | None = None


# --- value matchers ---------------------------------------------------------------------


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's string forms: ``abc`` exact, ``abc*`` prefix, ``*abc`` suffix, ``*`` non-empty."""

    kind: MatchKind
    value: str

    def matches(self, actual: str) -> bool:
        kind = self.kind
        if kind is MatchKind.EXACT:
            return actual == self.value
        if kind is MatchKind.PREFIX:
            return actual.startswith(self.value)
        if kind is MatchKind.SUFFIX:
            return actual.endswith(self.value)
        return actual != ""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A path with ``{*}`` (one segment) or ``{**}`` (any rest) operators, as a regex."""

    template: str
    regex: re.Pattern[str]

    def matches(self, actual: str) -> bool:
        return self.regex.fullmatch(actual) is not None


TextMatcher = StringMatch | PathTemplate


def _any_text(matchers: tuple[TextMatcher, ...], actual: str) -> bool:
    for m in matchers:  # noqa: SIM110
        if m.matches(actual):
            return True
    return False


def _any_network(networks: tuple[IPNetwork, ...], ip: IPAddress) -> bool:
    for net in networks:  # noqa: SIM110
        if ip in net:
            return True
    return False


# --- attribute readers ------------------------------------------------------------------


def read_principal(ctx: RequestContext) -> str | None:
    """``<td>/ns/<ns>/sa/<sa>``: the SPIFFE ID without ``spiffe://``, as Istio writes principals."""
    ident = ctx.source_identity
    if ident is None:
        return None
    return f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"


def read_namespace(ctx: RequestContext) -> str | None:
    ident = ctx.source_identity
    return None if ident is None else ident.namespace


def read_host(ctx: RequestContext) -> str | None:
    return None if ctx.host is None else ctx.host.lower()


def read_method(ctx: RequestContext) -> str | None:
    return ctx.method


def read_path(ctx: RequestContext) -> str | None:
    path = ctx.path
    if path is None:
        return None
    # Istio matches the URL path only (Envoy's url_path matcher): the query is not part of it.
    cut = path.find("?")
    return path if cut < 0 else path[:cut]


def read_sni(ctx: RequestContext) -> str | None:
    return ctx.sni


def header_reader(name: str) -> Callable[[RequestContext], str | None]:
    lowered = name.lower()

    def read(ctx: RequestContext) -> str | None:
        return ctx.headers.get(lowered)

    return read


def read_source_ip(ctx: RequestContext) -> IPAddress | None:
    return ctx.source_ip


def read_remote_ip(ctx: RequestContext) -> IPAddress | None:
    return ctx.remote_ip if ctx.remote_ip is not None else ctx.source_ip


def read_destination_ip(ctx: RequestContext) -> IPAddress | None:
    return ctx.destination_ip


# --- fields -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextField:
    """A string attribute; an absent value matches no ``values`` and no ``not_values``."""

    attribute: str
    read: Callable[[RequestContext], str | None]
    values: tuple[TextMatcher, ...]
    not_values: tuple[TextMatcher, ...]

    def matches(self, ctx: RequestContext) -> bool:
        actual = self.read(ctx)
        if actual is None:
            return not self.values
        if self.values and not _any_text(self.values, actual):
            return False
        return not _any_text(self.not_values, actual)


@dataclass(frozen=True, slots=True)
class IpField:
    attribute: str
    read: Callable[[RequestContext], IPAddress | None]
    values: tuple[IPNetwork, ...]
    not_values: tuple[IPNetwork, ...]

    def matches(self, ctx: RequestContext) -> bool:
        ip = self.read(ctx)
        if ip is None:
            return not self.values
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; policies name them as IPv4.
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.values and not _any_network(self.values, ip):
            return False
        return not _any_network(self.not_values, ip)


@dataclass(frozen=True, slots=True)
class PortField:
    attribute: str
    values: frozenset[int]
    not_values: frozenset[int]

    def matches(self, ctx: RequestContext) -> bool:
        port = ctx.destination_port
        if self.values and port not in self.values:
            return False
        return port not in self.not_values


@dataclass(frozen=True, slots=True)
class ServiceAccountField:
    """``serviceAccounts``: exact ``(namespace, name)`` pairs of the peer's identity."""

    attribute: str
    values: frozenset[tuple[str, str]]
    not_values: frozenset[tuple[str, str]]

    def matches(self, ctx: RequestContext) -> bool:
        ident = ctx.source_identity
        if ident is None:
            return not self.values
        account = (ident.namespace, ident.service_account)
        if self.values and account not in self.values:
            return False
        return account not in self.not_values


FieldMatch = TextField | IpField | PortField | ServiceAccountField


@dataclass(frozen=True, slots=True)
class Alternative:
    """One ``source``, ``operation`` or condition: ALL fields must match (none: always)."""

    fields: tuple[FieldMatch, ...]

    def matches(self, ctx: RequestContext) -> bool:
        for f in self.fields:  # noqa: SIM110
            if not f.matches(ctx):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Clause:
    """``from``, ``to`` or one ``when`` condition: ANY alternative must match."""

    alternatives: tuple[Alternative, ...]

    def matches(self, ctx: RequestContext) -> bool:
        for alt in self.alternatives:  # noqa: SIM110
            if alt.matches(ctx):
                return True
        return False


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """ALL clauses must match; a rule without clauses matches everything."""

    clauses: tuple[Clause, ...]

    def matches(self, ctx: RequestContext) -> bool:
        for clause in self.clauses:  # noqa: SIM110
            if not clause.matches(ctx):
                return False
        return True


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One AuthorizationPolicy, ready to evaluate at its layer.

    ``key`` is ``namespace/name``, the form Istio logs (``policy=ns/name``).
    ``warnings`` are the same texts reported as issues (e.g. HTTP rules seen by ztunnel).
    """

    namespace: str
    name: str
    action: Action
    layer: Layer
    dry_run: bool
    rules: tuple[CompiledRule, ...]
    warnings: tuple[str, ...] = ()
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.namespace}/{self.name}")

    def matches(self, ctx: RequestContext) -> bool:
        for rule in self.rules:  # noqa: SIM110
            if rule.matches(ctx):
                return True
        return False


# --- results ----------------------------------------------------------------------------


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """A problem with one object, for a log line and the object's status.

    ``reason`` follows Istio's status reasons (``InvalidSpec``, ``UnsupportedValue``).
    An ERROR means the object is not enforced as written (see the message for what is
    enforced instead); a WARNING means it is enforced with the stated difference.
    """

    kind: str
    namespace: str
    name: str
    severity: Severity
    reason: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class DecisionReason(enum.Enum):
    NO_ALLOW_POLICY = "no ALLOW policy applies"
    ALLOW_MATCHED = "allowed by policy"
    DENY_MATCHED = "explicitly denied by policy"
    NO_ALLOW_MATCHED = "ALLOW policies apply but none matched"


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What the decision would be if the dry-run policies were enforced too.

    ``policy`` is the dry-run policy that made the difference, when one did.
    """

    allowed: bool
    reason: DecisionReason
    policy: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check.

    ``policy`` is the deciding policy (``ns/name``): the matching DENY, or the
    matching ALLOW; ``None`` when the outcome is the default.  ``dry_run`` is set only
    when dry-run policies apply to the target.  ``audit_policy`` names a matching
    AUDIT policy (it never changes ``allowed``).
    """

    allowed: bool
    reason: DecisionReason
    policy: str | None = None
    dry_run: DryRunResult | None = None
    audit_policy: str | None = None

    @property
    def would_have_denied(self) -> bool:
        """True when enforcing the dry-run policies as well would deny this."""
        return self.dry_run is not None and not self.dry_run.allowed

    def describe(self) -> str:
        """One human line for logs and error messages."""
        verdict = "allowed" if self.allowed else "denied"
        text = f"{verdict}: {self.reason.value}"
        if self.policy is not None:
            text += f" {self.policy}"
        if self.dry_run is not None and self.dry_run.allowed != self.allowed:
            shadow = "allowed" if self.dry_run.allowed else "denied"
            text += f"; dry-run policies would have {shadow} it"
            if self.dry_run.policy is not None:
                text += f" ({self.dry_run.policy})"
        return text

    def log_fields(self) -> dict[str, object]:
        """Key-value pairs for a structlog line (``policy`` as Istio logs it)."""
        fields: dict[str, object] = {"allowed": self.allowed, "reason": self.reason.value}
        if self.policy is not None:
            fields["policy"] = self.policy
        if self.dry_run is not None:
            fields["dry_run_allowed"] = self.dry_run.allowed
            if self.dry_run.policy is not None:
                fields["dry_run_policy"] = self.dry_run.policy
        if self.audit_policy is not None:
            fields["audit_policy"] = self.audit_policy
        return fields
