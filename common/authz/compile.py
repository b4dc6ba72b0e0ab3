"""AuthorizationPolicy objects -> compiled policies for ztunnel and the waypoint, per object.

Where each policy is enforced (Istio ambient): a policy with ``targetRefs`` (a
waypoint's Gateway, or a Service) is enforced by the waypoint at L7; any other policy
is enforced by ztunnel at L4, for the workloads of its namespace (all namespaces
when it is in the root namespace), narrowed by ``selector``.

ztunnel sees connections, not requests, so HTTP attributes (hosts, methods, paths,
remoteIpBlocks, header and SNI conditions; see :mod:`common.authz.attributes`) cannot
be evaluated there.  They fail safe
and produce a warning on the object:

* in an ALLOW (or AUDIT) policy, a rule that uses one never matches, so it can never
  admit traffic it was not meant to;
* in a DENY policy, the rule is enforced without those attributes ("missing
  attributes are treated as matches", Istio's documented semantics), so it denies
  more, never less.  A ``source``/``operation``/condition made only of such
  attributes then matches everything.  (Istio's ztunnel instead gets an empty match
  there, which never matches, so such a DENY rule denies nothing -- istio/istio#61126;
  we follow the documented, fail-safe behaviour.)

Request authentication (JWT: ``requestPrincipals``, ``request.auth.*``) is not
supported at either layer and is handled the same way.

An object that is invalid is an ERROR issue.  When its scope and action can still be
read, a fail-safe stand-in is enforced in that scope: an ALLOW that allows nothing, a
DENY that denies everything (Istio's sidecars likewise deny all for a DENY rule they
cannot build).  The caller may prefer the object's previous good version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from common.api.base import field_errors
from common.api.istio_security import AuthorizationPolicySpec, Operation, Rule, Source
from common.authz.attributes import (
    OPERATION_FIELDS,
    SOURCE_FIELDS,
    FieldSpec,
    Support,
    condition,
    evaluable,
)
from common.authz.index import WaypointPolicies, ZtunnelPolicies
from common.authz.model import (
    Action,
    Alternative,
    Clause,
    CompiledPolicy,
    CompiledRule,
    FieldMatch,
    GatewayRef,
    Layer,
    PolicyIssue,
    ServiceRef,
    Severity,
)
from common.errors import InvalidObjectError
from common.kube.objects import KubeObject

DEFAULT_ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
KIND = "AuthorizationPolicy"
GATEWAY_GROUP = "gateway.networking.k8s.io"

# Go's strconv.ParseBool spellings, which Istio uses for boolean annotations.
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})


@dataclass(frozen=True, slots=True)
class PolicyObject:
    """The parts of an API object the compilers read (``spec`` as it came from the API)."""

    namespace: str
    name: str
    spec: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    creation_timestamp: str = ""

    @classmethod
    def from_kube(cls, obj: KubeObject) -> PolicyObject:
        """From an AuthorizationPolicy or PeerAuthentication read by the watch client."""
        meta = obj.metadata
        return cls(meta.namespace or "", meta.name, obj.spec, dict(meta.annotations),
                   meta.creation_timestamp or "")


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """Everything compiled from one set of AuthorizationPolicy objects."""

    root_namespace: str
    ztunnel: ZtunnelPolicies
    waypoint: WaypointPolicies
    policies: tuple[CompiledPolicy, ...]
    issues: tuple[PolicyIssue, ...]


# --- rules -------------------------------------------------------------------------------


@dataclass
class _Unsupported:
    """Attributes dropped from a policy at its layer, collected for one warning."""

    http: set[str] = field(default_factory=set)
    jwt: set[str] = field(default_factory=set)
    unconditional_rules: list[int] = field(default_factory=list)

    def note(self, support: Support, wire: str) -> None:
        (self.jwt if support is Support.NONE else self.http).add(wire)


def _fields(model: Source | Operation, specs: tuple[FieldSpec, ...], where: str, ns: str,
            layer: Layer, dropped: _Unsupported) -> tuple[Alternative, bool]:
    """One source/operation; the flag says whether any field was dropped at this layer."""
    kept: list[FieldMatch] = []
    lost = False
    for spec in specs:
        values: list[str] = getattr(model, spec.attr)
        not_values: list[str] = getattr(model, "not_" + spec.attr)
        if not values and not not_values:
            continue
        built = spec.build(values, not_values, where, ns)  # validates even what is dropped
        if evaluable(spec.support, layer):
            kept.append(built)
            continue
        lost = True
        for wire, present in ((spec.wire, values),
                              ("not" + spec.wire[0].upper() + spec.wire[1:], not_values)):
            if present:
                dropped.note(spec.support, wire)
    return Alternative(tuple(kept)), lost


def _compile_rule(rule: Rule, where: str, ns: str, layer: Layer,
                  dropped: _Unsupported) -> tuple[CompiledRule, bool]:
    """The rule with unevaluable attributes removed, and whether any were."""
    clauses: list[Clause] = []
    lost = False
    if rule.from_:
        alts = []
        for i, entry in enumerate(rule.from_):
            alt, lost_here = _fields(entry.source, SOURCE_FIELDS, f"{where}.from[{i}].source",
                                     ns, layer, dropped)
            alts.append(alt)
            lost = lost or lost_here
        clauses.append(Clause(tuple(alts)))
    if rule.to:
        alts = []
        for i, op in enumerate(rule.to):
            alt, lost_here = _fields(op.operation, OPERATION_FIELDS,
                                     f"{where}.to[{i}].operation", ns, layer, dropped)
            alts.append(alt)
            lost = lost or lost_here
        clauses.append(Clause(tuple(alts)))
    for i, cond in enumerate(rule.when):
        cwhere = f"{where}.when[{i}]"
        support, build = condition(cond, cwhere)
        built = build(cond.values, cond.not_values, cwhere, ns)
        if evaluable(support, layer):
            clauses.append(Clause((Alternative((built,)),)))
        else:
            lost = True
            dropped.note(support, cond.key)
    return CompiledRule(tuple(clauses)), lost


def _matches_everything(rule: CompiledRule) -> bool:
    return all(any(not alt.fields for alt in clause.alternatives) for clause in rule.clauses)


def _compile_rules(spec: AuthorizationPolicySpec, action: Action, layer: Layer, ns: str
                   ) -> tuple[tuple[CompiledRule, ...], list[str]]:
    dropped = _Unsupported()
    rules: list[CompiledRule] = []
    for index, rule in enumerate(spec.rules):
        compiled, lost = _compile_rule(rule, f"spec.rules[{index}]", ns, layer, dropped)
        if not lost:
            rules.append(compiled)
        elif action is Action.DENY:
            rules.append(compiled)
            if _matches_everything(compiled):
                dropped.unconditional_rules.append(index)
        # ALLOW / AUDIT: a rule that cannot be evaluated is omitted, so it never matches.
    return tuple(rules), _warnings(dropped, action, layer)


def _warnings(dropped: _Unsupported, action: Action, layer: Layer) -> list[str]:
    if action is Action.DENY:
        effect = ("the DENY rules using them are enforced without them, which denies more "
                  "than written")
        if dropped.unconditional_rules:
            target = "connection to" if layer is Layer.L4 else "request to"
            rules = ", ".join(str(i) for i in dropped.unconditional_rules)
            effect += f"; rules [{rules}] now deny every {target} the policy's targets"
    else:
        effect = (f"the {action.value} rules using them are omitted and never match, which "
                  f"{'allows' if action is Action.ALLOW else 'audits'} less than written")
    out = []
    if dropped.http:
        out.append(f"ztunnel does not evaluate HTTP attributes (found: "
                   f"{', '.join(sorted(dropped.http))}); {effect}. Enforce HTTP rules with a "
                   f"waypoint: target it with targetRefs.")
    if dropped.jwt:
        out.append(f"request authentication (JWT) is not supported (found: "
                   f"{', '.join(sorted(dropped.jwt))}); {effect}.")
    return out


# --- objects -----------------------------------------------------------------------------

_Scope = Mapping[str, str] | list[GatewayRef | ServiceRef]


def _targets(spec: AuthorizationPolicySpec, ns: str) -> list[GatewayRef | ServiceRef]:
    out: list[GatewayRef | ServiceRef] = []
    for i, ref in enumerate(spec.all_target_refs):
        where = f"spec.targetRefs[{i}]"
        if ref.namespace and ref.namespace != ns:
            raise InvalidObjectError(
                f"{where}: namespace {ref.namespace!r} differs from the policy's ({ns!r}); "
                f"a policy can only target objects in its own namespace")
        if ref.kind == "Gateway" and ref.group == GATEWAY_GROUP:
            out.append(GatewayRef(ns, ref.name))
        elif ref.kind == "Service" and ref.group in ("", "core"):
            out.append(ServiceRef(ns, ref.name))
        else:
            raise InvalidObjectError(
                f"{where}: group {ref.group!r} kind {ref.kind!r} is not supported; target a "
                f"waypoint (group {GATEWAY_GROUP}, kind Gateway) or a Service (group '', "
                f"kind Service)")
    return out


def _scope(spec: AuthorizationPolicySpec, ns: str) -> tuple[Layer, _Scope]:
    if spec.all_target_refs:
        return Layer.L7, _targets(spec, ns)
    labels = spec.selector.match_labels if spec.selector is not None else {}
    return Layer.L4, labels


def _dry_run(obj: PolicyObject, issues: list[PolicyIssue]) -> bool:
    value = obj.annotations.get(DRY_RUN_ANNOTATION)
    if value is None or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    issues.append(_issue(obj, Severity.WARNING, "InvalidAnnotation",
                         f"annotation {DRY_RUN_ANNOTATION}={value!r} is not a boolean; "
                         f"the policy is enforced (use \"true\" for a dry run)"))
    return False


def _issue(obj: PolicyObject, severity: Severity, reason: str, message: str) -> PolicyIssue:
    return PolicyIssue(KIND, obj.namespace, obj.name, severity, reason, message)


@dataclass(frozen=True, slots=True)
class _Compiled:
    policy: CompiledPolicy
    scope: _Scope


def _compile_object(obj: PolicyObject, issues: list[PolicyIssue]) -> _Compiled | None:
    dry_run = _dry_run(obj, issues)
    try:
        spec = AuthorizationPolicySpec.model_validate(obj.spec)
    except ValidationError as exc:
        detail = "; ".join(f"{path}: {msg}" for path, msg in field_errors(exc))
        return _reject(obj, dry_run, detail, issues)
    if spec.action == "CUSTOM":
        issues.append(_issue(obj, Severity.ERROR, "UnsupportedValue",
                             "action CUSTOM (external authorization) is not supported; "
                             "the policy is not enforced"))
        return None
    action = Action(spec.action)
    try:
        layer, scope = _scope(spec, obj.namespace)
        rules, warnings = _compile_rules(spec, action, layer, obj.namespace)
    except InvalidObjectError as exc:
        return _reject(obj, dry_run, str(exc), issues)
    for text in warnings:
        issues.append(_issue(obj, Severity.WARNING, "UnsupportedValue", text))
    policy = CompiledPolicy(obj.namespace, obj.name, action, layer, dry_run, rules,
                            tuple(warnings))
    return _Compiled(policy, scope)


_SCOPE_KEYS = ("selector", "targetRef", "targetRefs", "action", "provider")


def _readable_scope(obj: PolicyObject) -> tuple[Action, Layer, _Scope] | None:
    """Action and scope of an invalid object, when those parts alone are valid."""
    try:
        scope_only = {k: v for k, v in obj.spec.items() if k in _SCOPE_KEYS}
        spec = AuthorizationPolicySpec.model_validate(scope_only)
        layer, scope = _scope(spec, obj.namespace)
    except (ValidationError, InvalidObjectError, AttributeError):
        return None
    if spec.action not in ("ALLOW", "DENY"):
        return None
    return Action(spec.action), layer, scope


def _reject(obj: PolicyObject, dry_run: bool, detail: str,
            issues: list[PolicyIssue]) -> _Compiled | None:
    """Report an invalid object; enforce the fail-safe stand-in when its scope is readable."""
    readable = _readable_scope(obj)
    if readable is None:
        issues.append(_issue(obj, Severity.ERROR, "InvalidSpec",
                             f"{detail}. The policy is not enforced."))
        return None
    action, layer, scope = readable
    # ALLOW: present but matching nothing; DENY: one empty rule, which matches everything.
    if action is Action.ALLOW:
        rules: tuple[CompiledRule, ...] = ()
        outcome = "an ALLOW policy that allows nothing"
    else:
        rules = (CompiledRule(()),)
        outcome = "a DENY policy that denies everything"
    issues.append(_issue(obj, Severity.ERROR, "InvalidSpec",
                         f"{detail}. Enforced instead, fail-safe: {outcome} in the policy's "
                         f"scope."))
    policy = CompiledPolicy(obj.namespace, obj.name, action, layer, dry_run, rules)
    return _Compiled(policy, scope)


def compile_authorization_policies(objects: Iterable[PolicyObject], *,
                                   root_namespace: str = DEFAULT_ROOT_NAMESPACE
                                   ) -> AuthorizationConfig:
    """Compile every object; problems become issues, never exceptions."""
    issues: list[PolicyIssue] = []
    l4: list[tuple[CompiledPolicy, Mapping[str, str]]] = []
    l7: list[tuple[CompiledPolicy, GatewayRef | ServiceRef]] = []
    policies: list[CompiledPolicy] = []
    for obj in objects:
        compiled = _compile_object(obj, issues)
        if compiled is None:
            continue
        policies.append(compiled.policy)
        if isinstance(compiled.scope, list):
            l7.extend((compiled.policy, target) for target in compiled.scope)
        else:
            l4.append((compiled.policy, compiled.scope))
    return AuthorizationConfig(
        root_namespace=root_namespace,
        ztunnel=ZtunnelPolicies(root_namespace, l4),
        waypoint=WaypointPolicies(l7),
        policies=tuple(policies),
        issues=tuple(issues),
    )
