"""PeerAuthentication: the effective mTLS mode of a workload port, for ztunnel's plaintext inbound.

Resolution (Istio ambient):

* candidates: the root namespace's policy without a selector (mesh-wide), the
  workload namespace's policy without a selector, and the workload namespace's
  policies whose selector matches the workload; of several at one level the oldest
  (``creationTimestamp``, then name) wins;
* each level that sets a mode other than ``UNSET`` overrides the one above it;
  default ``PERMISSIVE``;
* ``portLevelMtls`` of the workload policy overrides per port (``UNSET`` inherits).

Selector policies in the root namespace are ignored, as istiod does for ambient.
ztunnel refuses plaintext (port 15006) when the result is ``STRICT``; ``PERMISSIVE`` and
``DISABLE`` both accept it (ztunnel always speaks mTLS itself).

An invalid object is reported; where its selector is readable it is enforced as
``STRICT`` in its scope, the fail-safe reading.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from common.api.base import field_errors
from common.api.istio_security import PeerAuthenticationSpec, WorkloadSelector
from common.authz.compile import DEFAULT_ROOT_NAMESPACE, PolicyObject
from common.authz.model import PolicyIssue, Severity, WorkloadRef

KIND = "PeerAuthentication"
_MEMO_LIMIT = 65536


class MtlsMode(enum.Enum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"

    @property
    def accepts_plaintext(self) -> bool:
        return self is not MtlsMode.STRICT


def _mode(name: str) -> MtlsMode | None:
    return None if name == "UNSET" else MtlsMode(name)


@dataclass(frozen=True, slots=True)
class _Policy:
    age: tuple[str, str]           # (creationTimestamp, name): oldest first
    match_labels: tuple[tuple[str, str], ...]
    mode: MtlsMode | None          # None: UNSET, inherit
    ports: Mapping[int, MtlsMode] = field(default_factory=dict)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels)


@dataclass(frozen=True, slots=True)
class _Resolved:
    mode: MtlsMode
    ports: Mapping[int, MtlsMode]


class PeerAuthenticationConfig:
    """Compiled PeerAuthentication objects; :meth:`mode_for` is the per-connection lookup."""

    def __init__(self, root_namespace: str, policies: Iterable[tuple[str, _Policy]],
                 issues: Iterable[PolicyIssue]) -> None:
        self.root_namespace = root_namespace
        self.issues = tuple(issues)
        self._mesh: _Policy | None = None
        self._namespace: dict[str, _Policy] = {}
        self._selectors: dict[str, list[_Policy]] = {}
        self._memo: dict[tuple[str, frozenset[tuple[str, str]]], _Resolved] = {}
        for ns, policy in sorted(policies, key=lambda item: item[1].age):
            if policy.match_labels:
                self._selectors.setdefault(ns, []).append(policy)
            elif ns == root_namespace:
                self._mesh = self._mesh or policy
            else:
                self._namespace.setdefault(ns, policy)

    def mode_for(self, workload: WorkloadRef, port: int) -> MtlsMode:
        """The effective mode for inbound connections to ``workload`` on ``port``."""
        resolved = self._memo.get(workload.key)
        if resolved is None:
            resolved = self._resolve(workload)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[workload.key] = resolved
        return resolved.ports.get(port, resolved.mode)

    def _resolve(self, workload: WorkloadRef) -> _Resolved:
        mode = MtlsMode.PERMISSIVE
        levels = [self._mesh, self._namespace.get(workload.namespace)]
        if workload.namespace != self.root_namespace:
            levels.append(next((p for p in self._selectors.get(workload.namespace, ())
                                if p.selects(workload.labels)), None))
        ports: Mapping[int, MtlsMode] = {}
        for policy in levels:
            if policy is None:
                continue
            if policy.mode is not None:
                mode = policy.mode
            ports = policy.ports
        return _Resolved(mode, ports)


def _issue(obj: PolicyObject, severity: Severity, reason: str, message: str) -> PolicyIssue:
    return PolicyIssue(KIND, obj.namespace, obj.name, severity, reason, message)


def _compile(obj: PolicyObject, root_namespace: str, issues: list[PolicyIssue]
             ) -> _Policy | None:
    age = (obj.creation_timestamp, obj.name)
    try:
        spec = PeerAuthenticationSpec.model_validate(obj.spec)
    except ValidationError as exc:
        detail = "; ".join(f"{path}: {msg}" for path, msg in field_errors(exc))
        try:
            selector = WorkloadSelector.model_validate(obj.spec.get("selector") or {})
        except (ValidationError, AttributeError):
            issues.append(_issue(obj, Severity.ERROR, "InvalidSpec",
                                 f"{detail}. The policy is not enforced."))
            return None
        issues.append(_issue(obj, Severity.ERROR, "InvalidSpec",
                             f"{detail}. Enforced instead, fail-safe: mode STRICT in the "
                             f"policy's scope."))
        return _Policy(age, tuple(sorted(selector.match_labels.items())), MtlsMode.STRICT)
    labels = tuple(sorted(spec.selector.match_labels.items())) if spec.selector else ()
    if labels and obj.namespace == root_namespace:
        issues.append(_issue(obj, Severity.WARNING, "UnsupportedValue",
                             "a PeerAuthentication with a selector in the root namespace is "
                             "ignored (as in Istio ambient); remove the selector for a "
                             "mesh-wide policy"))
        return None
    ports = {port: m for port, level in spec.port_level_mtls.items()
             if (m := _mode(level.mode)) is not None}
    return _Policy(age, labels, _mode(spec.mtls.mode) if spec.mtls else None, ports)


def compile_peer_authentications(objects: Iterable[PolicyObject], *,
                                 root_namespace: str = DEFAULT_ROOT_NAMESPACE
                                 ) -> PeerAuthenticationConfig:
    """Compile every object; problems become issues, never exceptions."""
    issues: list[PolicyIssue] = []
    policies: list[tuple[str, _Policy]] = []
    for obj in objects:
        policy = _compile(obj, root_namespace, issues)
        if policy is not None:
            policies.append((obj.namespace, policy))
    return PeerAuthenticationConfig(root_namespace, policies, issues)
