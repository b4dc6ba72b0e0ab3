"""Policy lookup by workload and by waypoint target."""

from __future__ import annotations

import pytest

from common.authz.index import EMPTY_POLICY_SET, PolicySet
from common.authz.model import (
    CompiledPolicy,
    GatewayRef,
    RequestContext,
    ServiceRef,
    WorkloadRef,
)
from tests.unit.authz_helpers import compile_all, ctx, l4, policy

GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def _keys(policies: PolicySet) -> list[str]:
    return [p.key for p in (*policies.deny, *policies.deny_dry_run, *policies.allow,
                            *policies.allow_dry_run, *policies.audit)]


def test_lookup_selects_exactly_the_applicable_policies_among_many() -> None:
    objects = [policy(f"p{i}", {"selector": {"matchLabels": {"app": "httpbin"}}}, f"ns{i}")
               for i in range(500)]
    objects += [policy(f"q{i}", {}, f"ns{i}") for i in range(500)]
    objects += [
        policy("mesh", {"action": "DENY"}, "istio-system"),
        policy("mesh-v1", {"selector": {"matchLabels": {"version": "v1"}}}, "istio-system"),
        policy("mesh-v2", {"selector": {"matchLabels": {"version": "v2"}}}, "istio-system"),
        policy("ns-wide", {}, "foo"),
        policy("httpbin", {"selector": {"matchLabels": {"app": "httpbin"}}}, "foo"),
        policy("httpbin-v1", {"selector": {"matchLabels": {"app": "httpbin", "version": "v1"}}},
               "foo"),
        policy("httpbin-v2", {"selector": {"matchLabels": {"app": "httpbin", "version": "v2"}}},
               "foo"),
        policy("wp", {"targetRefs": [GATEWAY_REF]}, "foo"),
    ]
    cfg = compile_all(*objects)
    found = cfg.ztunnel.for_workload(WorkloadRef("foo", {"app": "httpbin", "version": "v1"}))
    assert _keys(found) == ["istio-system/mesh", "foo/httpbin", "foo/httpbin-v1",
                            "foo/ns-wide", "istio-system/mesh-v1"]
    assert len(cfg.ztunnel) == 1007 and len(cfg.waypoint) == 1


def test_lookup_is_memoised_per_label_set() -> None:
    cfg = compile_all(policy("p", {"selector": {"matchLabels": {"app": "a"}}}))
    first = cfg.ztunnel.for_workload(WorkloadRef("foo", {"app": "a", "pod": "1"}))
    again = cfg.ztunnel.for_workload(WorkloadRef("foo", {"pod": "1", "app": "a"}))
    assert first is again
    assert cfg.ztunnel.for_workload(WorkloadRef("foo", {"app": "b"})) is EMPTY_POLICY_SET


def test_waypoint_lookup_by_gateway_and_service() -> None:
    cfg = compile_all(
        policy("gw", {"targetRefs": [GATEWAY_REF]}),
        policy("svc", {"targetRefs": [{"kind": "Service", "name": "httpbin"}]}),
        policy("other-ns", {"targetRefs": [GATEWAY_REF]}, "bar"))
    gateway = GatewayRef("foo", "waypoint")
    assert _keys(cfg.waypoint.for_target(gateway, ServiceRef("foo", "httpbin"))) == [
        "foo/gw", "foo/svc"]
    assert _keys(cfg.waypoint.for_target(gateway, None)) == ["foo/gw"]
    assert _keys(cfg.waypoint.for_target(GatewayRef("bar", "waypoint"), None)) == [
        "bar/other-ns"]


def test_policy_set_partitions_by_action_and_dry_run() -> None:
    cfg = compile_all(policy("d", {"action": "DENY"}), policy("dd", {"action": "DENY"},
                                                              dry_run=True),
                      policy("a", {}), policy("ad", {}, dry_run=True),
                      policy("au", {"action": "AUDIT"}))
    found = cfg.ztunnel.for_workload(WorkloadRef("foo"))
    assert [p.name for p in found.deny] == ["d"]
    assert [p.name for p in found.deny_dry_run] == ["dd"]
    assert [p.name for p in found.allow] == ["a"]
    assert [p.name for p in found.allow_dry_run] == ["ad"]
    assert [p.name for p in found.audit] == ["au"]
    assert len(found) == 5


def test_ipv6_blocks() -> None:
    cfg = compile_all(policy("v6", {"rules": [{"from": [{"source": {
        "ipBlocks": ["fd00::/64"], "notIpBlocks": ["fd00::bad"]}}]}]}))
    assert l4(cfg, ctx(src="fd00::1", dst="fd00::2")).allowed
    assert not l4(cfg, ctx(src="fd00::bad", dst="fd00::2")).allowed
    assert not l4(cfg, ctx(src="fd01::1", dst="fd00::2")).allowed
    assert not l4(cfg, ctx(src="10.0.0.1")).allowed


def test_check_evaluates_only_the_destinations_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = [policy(f"p{i}", {"action": "DENY", "rules": [{}]}, f"ns{i}")
                 for i in range(2000)]
    elsewhere += [policy(f"s{i}", {"action": "DENY", "selector": {"matchLabels": {
        "app": "httpbin"}}, "rules": [{}]}, f"ns{i}") for i in range(2000)]
    own = [policy("deny-dev", {"action": "DENY", "rules": [{"from": [{"source": {
        "namespaces": ["dev"]}}]}]}), policy("allow-all", {"rules": [{}]})]
    cfg = compile_all(*elsewhere, *own)
    evaluated: list[str] = []
    original = CompiledPolicy.matches

    def counting(self: CompiledPolicy, request: RequestContext) -> bool:
        evaluated.append(self.key)
        return original(self, request)

    monkeypatch.setattr(CompiledPolicy, "matches", counting)
    decision = l4(cfg, ctx(), WorkloadRef("foo", {"app": "httpbin"}))
    assert decision.allowed and decision.policy == "foo/allow-all"
    assert evaluated == ["foo/deny-dev", "foo/allow-all"]
