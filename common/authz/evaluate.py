"""The authorization decision, in Istio's order.

1. CUSTOM: not supported (compile reports such policies; they are not enforced).
2. Any matching DENY policy denies.
3. No ALLOW policy applies: allow.
4. Any matching ALLOW policy allows.
5. Otherwise deny.

AUDIT policies never change the outcome; the first matching one is named in the
decision.  Dry-run policies (annotation ``istio.io/dry-run: "true"``) are evaluated
only when some apply, and only to fill :attr:`Decision.dry_run`: the outcome with
them enforced as well.

The cost of a check depends on the policies that apply to the target, never on the
rest of the mesh (see :mod:`common.authz.index`).
"""

from __future__ import annotations

from common.authz.index import EMPTY_POLICY_SET, PolicySet, WaypointPolicies, ZtunnelPolicies
from common.authz.model import (
    CompiledPolicy,
    Decision,
    DecisionReason,
    DryRunResult,
    GatewayRef,
    RequestContext,
    ServiceRef,
    WorkloadRef,
)

_ALLOW_NO_POLICY = Decision(allowed=True, reason=DecisionReason.NO_ALLOW_POLICY)

# Plain decisions (no dry-run, no audit) are immutable and few -- a handful of reasons times
# the policies that can decide -- so they are built once and shared: building a frozen
# dataclass costs more than the rest of a typical check.
_PLAIN: dict[tuple[bool, DecisionReason, str | None], Decision] = {}
_PLAIN_LIMIT = 65536


def _plain(allowed: bool, reason: DecisionReason, policy: str | None) -> Decision:
    key = (allowed, reason, policy)
    decision = _PLAIN.get(key)
    if decision is None:
        if len(_PLAIN) >= _PLAIN_LIMIT:
            _PLAIN.clear()
        decision = _PLAIN[key] = Decision(allowed=allowed, reason=reason, policy=policy)
    return decision


def _first_match(policies: tuple[CompiledPolicy, ...], ctx: RequestContext) -> str | None:
    for policy in policies:
        if policy.matches(ctx):
            return policy.key
    return None


def decide(policies: PolicySet, ctx: RequestContext) -> Decision:
    """Decide for ``ctx`` given the policies that apply to its target."""
    if policies is EMPTY_POLICY_SET:
        return _ALLOW_NO_POLICY
    denied_by = _first_match(policies.deny, ctx)
    if denied_by is not None:
        allowed, reason, policy = False, DecisionReason.DENY_MATCHED, denied_by
    elif not policies.allow:
        allowed, reason, policy = True, DecisionReason.NO_ALLOW_POLICY, None
    else:
        policy = _first_match(policies.allow, ctx)
        allowed = policy is not None
        reason = DecisionReason.ALLOW_MATCHED if allowed else DecisionReason.NO_ALLOW_MATCHED
    dry_run = None
    if policies.deny_dry_run or policies.allow_dry_run:
        dry_run = _with_dry_run(policies, ctx, allowed, reason, policy)
    audit = _first_match(policies.audit, ctx) if policies.audit else None
    if dry_run is None and audit is None:
        return _plain(allowed, reason, policy)
    return Decision(allowed=allowed, reason=reason, policy=policy, dry_run=dry_run,
                    audit_policy=audit)


def _with_dry_run(policies: PolicySet, ctx: RequestContext, allowed: bool,
                  reason: DecisionReason, policy: str | None) -> DryRunResult:
    """The decision had the dry-run policies been enforced too (reusing the real outcome)."""
    dry_deny = _first_match(policies.deny_dry_run, ctx)
    if dry_deny is not None:
        return DryRunResult(allowed=False, reason=DecisionReason.DENY_MATCHED, policy=dry_deny)
    if reason is DecisionReason.DENY_MATCHED or reason is DecisionReason.ALLOW_MATCHED:
        return DryRunResult(allowed=allowed, reason=reason, policy=None)
    # No DENY matched and no enforced ALLOW matched (or none applies): dry-run ALLOWs decide.
    dry_allow = _first_match(policies.allow_dry_run, ctx)
    if dry_allow is not None:
        return DryRunResult(allowed=True, reason=DecisionReason.ALLOW_MATCHED, policy=dry_allow)
    if policies.allow or policies.allow_dry_run:
        return DryRunResult(allowed=False, reason=DecisionReason.NO_ALLOW_MATCHED, policy=None)
    return DryRunResult(allowed=True, reason=DecisionReason.NO_ALLOW_POLICY, policy=None)


def check_connection(policies: ZtunnelPolicies, workload: WorkloadRef,
                     ctx: RequestContext) -> Decision:
    """ztunnel's check for a new inbound connection to ``workload``."""
    return decide(policies.for_workload(workload), ctx)


def check_request(policies: WaypointPolicies, gateway: GatewayRef, service: ServiceRef | None,
                  ctx: RequestContext) -> Decision:
    """The waypoint's check for one HTTP request (``service`` None when addressed to a pod)."""
    return decide(policies.for_target(gateway, service), ctx)
