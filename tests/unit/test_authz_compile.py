"""Compiling AuthorizationPolicy objects: per-object errors, warnings and fail-safe stand-ins."""

from __future__ import annotations

from typing import Any

import pytest

from common.authz.compile import PolicyObject, compile_authorization_policies
from common.authz.model import Action, Layer, Severity, WorkloadRef
from common.kube.objects import KubeObject
from tests.unit.authz_helpers import compile_all, ctx, l4, l7, policy, targeting_waypoint

GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def _only_issue(spec: dict[str, Any], **kw: Any) -> Any:
    cfg = compile_all(policy("p", spec, **kw))
    assert len(cfg.issues) == 1, cfg.issues
    return cfg, cfg.issues[0]


def test_http_attributes_in_l4_allow_warn_and_rule_is_dropped() -> None:
    cfg, issue = _only_issue({"rules": [{"to": [{"operation": {"methods": ["GET"],
                                                                "paths": ["/x"]}}]}]})
    assert issue.severity is Severity.WARNING and issue.reason == "UnsupportedValue"
    assert "found: methods, paths" in issue.message
    assert "never match" in issue.message and "waypoint" in issue.message
    (compiled,) = cfg.policies
    assert compiled.layer is Layer.L4 and compiled.rules == ()
    assert compiled.warnings == (issue.message,)


def test_http_attributes_in_l4_deny_warn_that_it_denies_more() -> None:
    cfg, issue = _only_issue({"action": "DENY", "rules": [{
        "from": [{"source": {"namespaces": ["dev"]}}],
        "to": [{"operation": {"notPaths": ["/healthz"]}}]}]})
    assert issue.severity is Severity.WARNING
    assert "found: notPaths" in issue.message and "denies more" in issue.message
    assert "now deny every" not in issue.message
    assert not l4(cfg, ctx("dev", path="/healthz")).allowed
    assert l4(cfg, ctx("default")).allowed


def test_deny_made_unconditional_is_called_out() -> None:
    _, issue = _only_issue({"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["dev"]}}]},
        {"to": [{"operation": {"hosts": ["admin.local"]}}]}]})
    assert "rules [1] now deny every connection to the policy's targets" in issue.message


def test_jwt_attributes_are_reported_at_both_layers() -> None:
    spec = {"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}
    for s in (spec, targeting_waypoint(spec)):
        cfg, issue = _only_issue(s)
        assert "request authentication (JWT) is not supported" in issue.message
        assert "request.auth.claims[iss]" in issue.message
        assert cfg.policies[0].rules == ()


def test_http_attributes_at_waypoint_are_fine() -> None:
    cfg = compile_all(policy("p", targeting_waypoint(
        {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})))
    assert cfg.issues == ()
    assert cfg.policies[0].layer is Layer.L7


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]},
     "spec.rules[0].from[0].source: '10.0.0.300' is not an IP address or CIDR block"),
    ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
     "'http' is not a port number"),
    ({"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]},
     "'70000' is not a port number"),
    ({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]},
     "without 'spiffe://'"),
    ({"rules": [{"from": [{"source": {"namespaces": ["a*b"]}}]}]},
     "'*' in the middle"),
    ({"rules": [{"from": [{"source": {"namespaces": [""]}}]}]}, "empty value"),
    ({"rules": [{"from": [{"source": {"serviceAccounts": ["ns/*"]}}]}]},
     "is not a service account"),
    ({"rules": [{"when": [{"key": "source.color", "values": ["red"]}]}]},
     "unknown condition key 'source.color'"),
    ({"rules": [{"to": [{"operation": {"paths": ["/a/{**}/{*}"]}}]}]},
     "'{**}' must be the last operator"),
    ({"rules": [{"to": [{"operation": {"paths": ["/a/{name}/{*}"]}}]}]},
     "may use only the operators"),
    ({"rules": [{"from": [{"source": {}}]}]}, "a source must set at least one field"),
    ({"rules": [{"to": [{"operation": {}}]}]}, "an operation must set at least one field"),
    ({"rules": [{"when": [{"key": "source.ip"}]}]}, "needs `values` or `notValues`"),
    ({"rules": [{"form": []}]}, "spec.rules[0].form: unknown field"),
    ({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
      "bogus": 1}, "spec.bogus: unknown field"),
])
def test_invalid_values_are_errors_naming_the_field(spec: dict[str, Any], fragment: str) -> None:
    _, issue = _only_issue(spec)
    assert issue.severity is Severity.ERROR and issue.reason == "InvalidSpec"
    assert fragment in issue.message
    assert issue.key == "foo/p"


def test_invalid_deny_is_enforced_as_deny_all_in_its_scope() -> None:
    spec = {"action": "DENY", "selector": {"matchLabels": {"app": "httpbin"}},
            "rules": [{"from": [{"source": {"ipBlocks": ["bogus"]}}]}]}
    cfg, issue = _only_issue(spec)
    assert "fail-safe: a DENY policy that denies everything" in issue.message
    assert not l4(cfg, ctx()).allowed
    assert l4(cfg, ctx(), WorkloadRef("foo", {"app": "other"})).allowed


def test_invalid_allow_is_enforced_as_allow_nothing() -> None:
    cfg, issue = _only_issue({"rules": [{"from": [{"source": {"ipBlocks": ["bogus"]}}]}]})
    assert "an ALLOW policy that allows nothing" in issue.message
    (compiled,) = cfg.policies
    assert compiled.action is Action.ALLOW and compiled.rules == ()
    assert not l4(cfg, ctx()).allowed


def test_invalid_waypoint_policy_stand_in_stays_at_l7() -> None:
    cfg, _ = _only_issue(targeting_waypoint(
        {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]}))
    assert l4(cfg, ctx()).allowed
    assert not l7(cfg, ctx(method="GET", path="/")).allowed


def test_invalid_dry_run_stand_in_stays_dry_run() -> None:
    cfg, _ = _only_issue({"action": "DENY", "rules": [{"to": [{"operation": {
        "ports": ["x"]}}]}]}, dry_run=True)
    decision = l4(cfg, ctx())
    assert decision.allowed and decision.would_have_denied


def test_unreadable_scope_is_not_enforced() -> None:
    cfg, issue = _only_issue({"action": "DENY", "selector": {"matchLabels": "app=x"}})
    assert "The policy is not enforced." in issue.message
    assert cfg.policies == ()


def test_custom_action_is_unsupported_and_ignored() -> None:
    cfg, issue = _only_issue({"action": "CUSTOM", "provider": {"name": "ext-authz"},
                              "rules": [{}]})
    assert issue.severity is Severity.ERROR and issue.reason == "UnsupportedValue"
    assert "CUSTOM" in issue.message
    assert cfg.policies == ()
    assert l4(cfg, ctx()).allowed


@pytest.mark.parametrize(("refs", "fragment"), [
    ([{"kind": "Pod", "name": "x"}], "kind 'Pod' is not supported"),
    ([{"kind": "Gateway", "name": "x"}], "group '' kind 'Gateway' is not supported"),
    ([{**GATEWAY_REF, "namespace": "bar"}], "differs from the policy's"),
])
def test_bad_target_refs(refs: list[dict[str, str]], fragment: str) -> None:
    _, issue = _only_issue({"targetRefs": refs, "rules": [{}]})
    assert issue.severity is Severity.ERROR
    assert fragment in issue.message


def test_selector_and_target_refs_are_exclusive() -> None:
    _, issue = _only_issue({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [GATEWAY_REF]})
    assert "only one of `selector` and `targetRefs`" in issue.message


def test_deprecated_single_target_ref_is_accepted() -> None:
    cfg = compile_all(policy("p", {"targetRef": GATEWAY_REF, "action": "DENY", "rules": [{}]}))
    assert cfg.issues == ()
    assert not l7(cfg, ctx(method="GET", path="/")).allowed


def test_bad_dry_run_annotation_warns_and_enforces() -> None:
    obj = PolicyObject("foo", "p", {"action": "DENY", "rules": [{}]},
                       {"istio.io/dry-run": "maybe"})
    cfg = compile_authorization_policies([obj])
    (issue,) = cfg.issues
    assert issue.severity is Severity.WARNING and "not a boolean" in issue.message
    assert not l4(cfg, ctx()).allowed


def test_one_bad_object_does_not_affect_others() -> None:
    cfg = compile_all(policy("bad", {"rules": [{"unknown": 1}]}, "bar"),
                      policy("good", {"rules": [{"from": [{"source": {
                          "namespaces": ["default"]}}]}]}))
    assert [i.key for i in cfg.issues] == ["bar/bad"]
    decision = l4(cfg, ctx())
    assert decision.allowed and decision.policy == "foo/good"


def test_root_namespace_is_configurable() -> None:
    cfg = compile_all(policy("allow-nothing", {}, "mesh-root"), root="mesh-root")
    assert cfg.root_namespace == "mesh-root"
    assert not l4(cfg, ctx()).allowed
    default_root = compile_all(policy("allow-nothing", {}, "mesh-root"))
    assert l4(default_root, ctx()).allowed


def test_policy_object_from_a_kube_object() -> None:
    obj = KubeObject.model_validate({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "foo",
                     "annotations": {"istio.io/dry-run": "true"},
                     "creationTimestamp": "2026-11-25T18:00:00Z"},
        "spec": {"action": "DENY", "rules": [{}]}})
    source = PolicyObject.from_kube(obj)
    assert (source.namespace, source.name, source.creation_timestamp) == (
        "foo", "deny-all", "2026-11-25T18:00:00Z")
    cfg = compile_authorization_policies([source])
    decision = l4(cfg, ctx())
    assert decision.allowed and decision.would_have_denied
