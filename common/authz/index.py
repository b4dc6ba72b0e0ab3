"""Which compiled policies apply to a target, found by dict lookups, not by scanning the mesh.

ztunnel asks per destination workload: the root namespace's policies without a
selector (mesh-wide), the workload namespace's policies without a selector, and the
selector policies of both namespaces whose labels the workload carries.  Selector
policies are filed under one of their ``(key, value)`` pairs, so a lookup touches only
policies that share at least one label with the workload, then checks the rest of
their labels.  The waypoint asks per (Gateway, Service): two dict hits.

Both indexes are immutable after construction and memoise the per-target answer
(bounded), so a steady flow of connections to known workloads costs one dict hit
before evaluation starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.authz.model import Action, CompiledPolicy, GatewayRef, ServiceRef, WorkloadRef

# Enough for every distinct (namespace, labels) of a large mesh; past it the memo restarts
# rather than growing without bound (a churn of label sets must not grow memory).
_MEMO_LIMIT = 65536


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The policies that apply to one target, split the way evaluation walks them."""

    deny: tuple[CompiledPolicy, ...] = ()
    deny_dry_run: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    allow_dry_run: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[CompiledPolicy]) -> PolicySet:
        """Partition by action and dry-run, each part ordered by ``ns/name``, duplicates dropped."""
        unique = {p.key: p for p in policies}
        if not unique:
            return EMPTY_POLICY_SET
        deny: list[CompiledPolicy] = []
        deny_dry_run: list[CompiledPolicy] = []
        allow: list[CompiledPolicy] = []
        allow_dry_run: list[CompiledPolicy] = []
        audit: list[CompiledPolicy] = []
        for key in sorted(unique):
            p = unique[key]
            if p.action is Action.AUDIT:
                audit.append(p)
            elif p.action is Action.DENY:
                (deny_dry_run if p.dry_run else deny).append(p)
            else:
                (allow_dry_run if p.dry_run else allow).append(p)
        return cls(tuple(deny), tuple(deny_dry_run), tuple(allow), tuple(allow_dry_run),
                   tuple(audit))

    def __len__(self) -> int:
        return (len(self.deny) + len(self.deny_dry_run) + len(self.allow)
                + len(self.allow_dry_run) + len(self.audit))


EMPTY_POLICY_SET = PolicySet()


class ZtunnelPolicies:
    """L4 policies indexed by namespace and selector; :meth:`for_workload` is the lookup."""

    def __init__(self, root_namespace: str,
                 entries: Iterable[tuple[CompiledPolicy, Mapping[str, str]]] = ()) -> None:
        """``entries`` pairs each policy with its selector's matchLabels (empty: no selector)."""
        self.root_namespace = root_namespace
        self._mesh_wide: list[CompiledPolicy] = []
        self._by_namespace: dict[str, list[CompiledPolicy]] = {}
        # (namespace or None for the root namespace's selectors, label key, label value)
        #   -> [(all labels the selector needs, policy)]
        self._by_label: dict[tuple[str | None, str, str],
                             list[tuple[tuple[tuple[str, str], ...], CompiledPolicy]]] = {}
        self._memo: dict[tuple[str, frozenset[tuple[str, str]]], PolicySet] = {}
        self._count = 0
        for policy, match_labels in entries:
            self._add(policy, match_labels)

    def _add(self, policy: CompiledPolicy, match_labels: Mapping[str, str]) -> None:
        self._count += 1
        in_root = policy.namespace == self.root_namespace
        if not match_labels:
            if in_root:
                self._mesh_wide.append(policy)
            else:
                self._by_namespace.setdefault(policy.namespace, []).append(policy)
            return
        needed = tuple(sorted(match_labels.items()))
        first_key, first_value = needed[0]
        bucket = (None if in_root else policy.namespace, first_key, first_value)
        self._by_label.setdefault(bucket, []).append((needed, policy))

    def __len__(self) -> int:
        return self._count

    def for_workload(self, workload: WorkloadRef) -> PolicySet:
        """The policies ztunnel enforces for connections to ``workload``."""
        found = self._memo.get(workload.key)
        if found is None:
            found = PolicySet.of(self._select(workload))
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[workload.key] = found
        return found

    def _select(self, workload: WorkloadRef) -> list[CompiledPolicy]:
        selected = list(self._mesh_wide)
        selected.extend(self._by_namespace.get(workload.namespace, ()))
        labels = workload.labels
        for key, value in labels.items():
            for scope in (workload.namespace, None):
                for needed, policy in self._by_label.get((scope, key, value), ()):
                    if all(labels.get(k) == v for k, v in needed):
                        selected.append(policy)
        return selected


class WaypointPolicies:
    """L7 policies indexed by their ``targetRefs``: a waypoint's Gateway or a Service."""

    def __init__(self, entries: Iterable[tuple[CompiledPolicy, GatewayRef | ServiceRef]] = ()
                 ) -> None:
        self._by_gateway: dict[GatewayRef, list[CompiledPolicy]] = {}
        self._by_service: dict[ServiceRef, list[CompiledPolicy]] = {}
        self._memo: dict[tuple[GatewayRef, ServiceRef | None], PolicySet] = {}
        keys: set[str] = set()
        for policy, target in entries:
            keys.add(policy.key)
            if isinstance(target, GatewayRef):
                self._by_gateway.setdefault(target, []).append(policy)
            else:
                self._by_service.setdefault(target, []).append(policy)
        self._count = len(keys)

    def __len__(self) -> int:
        return self._count

    def for_target(self, gateway: GatewayRef, service: ServiceRef | None) -> PolicySet:
        """Policies for a request through ``gateway`` to ``service`` (None: addressed to a pod)."""
        memo_key = (gateway, service)
        found = self._memo.get(memo_key)
        if found is None:
            selected = list(self._by_gateway.get(gateway, ()))
            if service is not None:
                selected.extend(self._by_service.get(service, ()))
            found = PolicySet.of(selected)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[memo_key] = found
        return found
