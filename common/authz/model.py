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

Matchers are built with everything precomputed (lower-cased hosts, merged string
sets, networks as integers, port sets, compiled path templates), so evaluation does no
parsing.  The loops are written out rather than ``any()``/``all()`` over generators
(``noqa: SIM110``): on this hot path the generator costs about twice as much.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
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
    """The destination workload of a connection: what selects ztunnel-enforced policies.

    Build one per workload when its state changes and reuse it: ``key`` (namespace and
    label set) is computed once here and is what the per-connection lookups hash.
    """

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    key: tuple[str, frozenset[tuple[str, str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.namespace, frozenset(self.labels.items())))


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


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A path with ``{*}`` (one segment) or ``{**}`` (any rest) operators, as a regex."""

    template: str
    regex: re.Pattern[str]


TextMatcher = StringMatch | PathTemplate


@dataclass(frozen=True, slots=True)
class StringSet:
    """Several string matchers merged, so one check is a set lookup and two C-level calls.

    ``str.startswith``/``endswith`` take a tuple, so any number of prefixes costs one call.
    """

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    presence: bool = False
    templates: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def of(cls, matchers: Iterable[TextMatcher]) -> StringSet | None:
        """The merged set, or None when there are no matchers (no constraint)."""
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        templates: list[re.Pattern[str]] = []
        presence = False
        for m in matchers:
            if isinstance(m, PathTemplate):
                templates.append(m.regex)
            elif m.kind is MatchKind.EXACT:
                exact.add(m.value)
            elif m.kind is MatchKind.PREFIX:
                prefixes.append(m.value)
            elif m.kind is MatchKind.SUFFIX:
                suffixes.append(m.value)
            else:
                presence = True
        if not (exact or prefixes or suffixes or presence or templates):
            return None
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence,
                   tuple(templates))

    def matches(self, actual: str) -> bool:
        if actual in self.exact:
            return True
        if self.prefixes and actual.startswith(self.prefixes):
            return True
        if self.suffixes and actual.endswith(self.suffixes):
            return True
        if self.presence and actual:
            return True
        for template in self.templates:  # noqa: SIM110
            if template.fullmatch(actual) is not None:
                return True
        return False


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """CIDR blocks as (network, mask) integers per IP version: no ipaddress calls per check."""

    v4: tuple[tuple[int, int], ...] = ()
    v6: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> NetworkSet | None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in networks:
            entry = (int(net.network_address), int(net.netmask))
            (v4 if net.version == 4 else v6).append(entry)
        return cls(tuple(v4), tuple(v6)) if v4 or v6 else None

    def matches(self, ip: IPAddress) -> bool:
        if isinstance(ip, IPv4Address):
            table = self.v4
        elif ip.ipv4_mapped is not None:
            # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; policies name them
            # as IPv4.
            ip, table = ip.ipv4_mapped, self.v4
        else:
            table = self.v6
        value = int(ip)
        for network, mask in table:  # noqa: SIM110
            if value & mask == network:
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
#
# Each field holds ``values`` (None: no constraint) and ``not_values`` (None: none).  A field
# matches when the attribute matches ``values`` and does not match ``not_values``; an absent
# attribute (no peer identity, no such header) matches no value, so it fails ``values`` and
# passes ``not_values`` -- as ztunnel and Envoy's RBAC do.


@dataclass(frozen=True, slots=True)
class TextField:
    attribute: str
    read: Callable[[RequestContext], str | None]
    values: StringSet | None
    not_values: StringSet | None

    def matches(self, ctx: RequestContext) -> bool:
        actual = self.read(ctx)
        if actual is None:
            return self.values is None
        if self.values is not None and not self.values.matches(actual):
            return False
        return self.not_values is None or not self.not_values.matches(actual)


@dataclass(frozen=True, slots=True)
class IpField:
    attribute: str
    read: Callable[[RequestContext], IPAddress | None]
    values: NetworkSet | None
    not_values: NetworkSet | None

    def matches(self, ctx: RequestContext) -> bool:
        ip = self.read(ctx)
        if ip is None:
            return self.values is None
        if self.values is not None and not self.values.matches(ip):
            return False
        return self.not_values is None or not self.not_values.matches(ip)


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


@dataclass(frozen=True, slots=True)
class Clause:
    """``from``, ``to`` or one ``when`` condition: ANY alternative must match."""

    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """ALL clauses must match; a rule without clauses matches everything."""

    clauses: tuple[Clause, ...]


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
        """ANY rule; ALL its clauses; ANY alternative of each; ALL fields of that alternative.

        One function walks all four levels: a method call per level would cost more than
        the checks themselves.
        """
        for rule in self.rules:
            rule_matches = True
            for clause in rule.clauses:
                clause_matches = False
                for alternative in clause.alternatives:
                    alternative_matches = True
                    for f in alternative.fields:
                        if not f.matches(ctx):
                            alternative_matches = False
                            break
                    if alternative_matches:
                        clause_matches = True
                        break
                if not clause_matches:
                    rule_matches = False
                    break
            if rule_matches:
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
