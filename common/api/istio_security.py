"""Spec models of ``security.istio.io/v1`` ``AuthorizationPolicy`` and ``PeerAuthentication``.

Field names and enums follow Istio's API reference.  These models check shape and
the cross-field rules Istio's validation enforces (``selector`` xor ``targetRef``,
``provider`` only with ``CUSTOM``, ``portLevelMtls`` only with a ``selector``, no
empty ``source``/``operation``, a ``when`` needs values).  What the values mean
(ports, CIDRs, wildcards, condition keys, L4 versus L7) is checked by
:mod:`common.authz.compile`, which reports per object.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.api.base import ApiModel

AuthorizationAction = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]
MtlsModeName = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class WorkloadSelector(ApiModel):
    """Workloads by labels; an empty ``matchLabels`` selects every workload of the namespace."""

    match_labels: dict[str, str] = Field(default_factory=dict)


class PolicyTargetReference(ApiModel):
    """A Gateway (the waypoint) or a Service whose waypoint enforces the policy."""

    group: str = ""
    kind: str
    name: str = Field(min_length=1)
    namespace: str = ""


class Source(ApiModel):
    """Who sends the request; fields are ANDed, values within one field ORed."""

    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Source:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("a source must set at least one field (an empty source is rejected "
                             "by Istio's validation; omit `from` to match any source)")
        return self


class Operation(ApiModel):
    """What the request does; fields are ANDed, values within one field ORed."""

    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Operation:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("an operation must set at least one field (an empty operation is "
                             "rejected by Istio's validation; omit `to` to match any operation)")
        return self


class RuleFrom(ApiModel):
    source: Source


class RuleTo(ApiModel):
    operation: Operation


class Condition(ApiModel):
    """An extra attribute check (``when``): ``key`` against ``values`` / ``notValues``."""

    key: str = Field(min_length=1)
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_values(self) -> Condition:
        if not self.values and not self.not_values:
            raise ValueError(f"condition {self.key!r} needs `values` or `notValues`")
        return self


class Rule(ApiModel):
    """``from`` AND ``to`` AND every ``when``; an empty rule matches everything."""

    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class ExtensionProvider(ApiModel):
    name: str = Field(min_length=1)


class AuthorizationPolicySpec(ApiModel):
    """``AuthorizationPolicy.spec``.  ``rules`` absent or empty means the policy matches nothing."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    action: AuthorizationAction = "ALLOW"
    rules: list[Rule] = Field(default_factory=list)
    provider: ExtensionProvider | None = None

    @model_validator(mode="after")
    def _cross_field(self) -> AuthorizationPolicySpec:
        if self.target_ref is not None and self.target_refs:
            raise ValueError("set only one of `targetRef` and `targetRefs`")
        if self.selector is not None and (self.target_ref is not None or self.target_refs):
            raise ValueError("set only one of `selector` and `targetRefs`")
        if self.provider is not None and self.action != "CUSTOM":
            raise ValueError("`provider` is only allowed with action CUSTOM")
        if self.action == "CUSTOM" and self.provider is None:
            raise ValueError("action CUSTOM needs a `provider`")
        return self

    @property
    def all_target_refs(self) -> list[PolicyTargetReference]:
        """``targetRefs``, or the deprecated single ``targetRef`` as a one-element list."""
        return [self.target_ref] if self.target_ref is not None else list(self.target_refs)


class MutualTls(ApiModel):
    mode: MtlsModeName = "UNSET"


class PeerAuthenticationSpec(ApiModel):
    """``PeerAuthentication.spec``; ``portLevelMtls`` keys are the workload's (target) ports."""

    selector: WorkloadSelector | None = None
    mtls: MutualTls | None = None
    port_level_mtls: dict[int, MutualTls] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_field(self) -> PeerAuthenticationSpec:
        for port in self.port_level_mtls:
            if not 1 <= port <= 65535:
                raise ValueError(f"portLevelMtls port {port} is not in 1-65535")
        if self.port_level_mtls and (self.selector is None or not self.selector.match_labels):
            raise ValueError("portLevelMtls needs a workload `selector` with matchLabels "
                             "(Istio only applies port-level mTLS to selected workloads)")
        return self
