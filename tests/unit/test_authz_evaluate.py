"""Authorization decisions, table-driven from Istio's documented examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from common.authz.model import DecisionReason, ServiceRef, WorkloadRef
from tests.unit.authz_helpers import (
    HTTPBIN,
    WAYPOINT,
    compile_all,
    ctx,
    l4,
    l7,
    policy,
    targeting_waypoint,
)

SLEEP = ctx("default", "sleep")
BAR = ctx("bar", "client")
DEV = ctx("dev", "client")
PLAINTEXT = ctx(None)


@dataclass(frozen=True)
class Case:
    id: str
    policies: list[tuple[str, dict[str, Any]]]  # (namespace/name, spec)
    request: Any
    allowed: bool
    policy: str | None = None
    workload: WorkloadRef = HTTPBIN
    extra: dict[str, str] = field(default_factory=dict)


def _objects(case: Case) -> list[Any]:
    out = []
    for key, spec in case.policies:
        ns, name = key.split("/")
        out.append(policy(name, spec, ns))
    return out


L4_CASES = [
    Case("no-policy-allows", [], SLEEP, True),
    Case("allow-nothing-denies", [("foo/allow-nothing", {})], SLEEP, False),
    Case("allow-nothing-other-namespace-unaffected", [("bar/allow-nothing", {})], SLEEP, True),
    Case("allow-all-with-empty-rule", [("foo/allow-all", {"rules": [{}]})], PLAINTEXT, True,
         "foo/allow-all"),
    Case("deny-all-with-empty-rule",
         [("foo/deny-all", {"action": "DENY", "rules": [{}]}),
          ("foo/allow-all", {"rules": [{}]})], SLEEP, False, "foo/deny-all"),
    Case("deny-without-rules-has-no-effect", [("foo/deny", {"action": "DENY"})], SLEEP, True),
    Case("allow-from-namespace-matches",
         [("foo/from-bar", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]})],
         BAR, True, "foo/from-bar"),
    Case("allow-from-namespace-other-denied",
         [("foo/from-bar", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]})],
         SLEEP, False),
    Case("allow-from-namespace-plaintext-denied",
         [("foo/from-bar", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]})],
         PLAINTEXT, False),
    Case("deny-by-principal",
         [("foo/deny-sleep", {"action": "DENY", "rules": [{"from": [{"source": {
             "principals": ["cluster.local/ns/default/sa/sleep"]}}]}]})],
         SLEEP, False, "foo/deny-sleep"),
    Case("deny-by-principal-others-pass",
         [("foo/deny-sleep", {"action": "DENY", "rules": [{"from": [{"source": {
             "principals": ["cluster.local/ns/default/sa/sleep"]}}]}]})],
         BAR, True),
    Case("principal-star-needs-identity",
         [("foo/any-peer", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})],
         PLAINTEXT, False),
    Case("principal-star-any-identity",
         [("foo/any-peer", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})],
         DEV, True, "foo/any-peer"),
    Case("principal-prefix",
         [("foo/p", {"rules": [{"from": [{"source": {
             "principals": ["cluster.local/ns/bar/*"]}}]}]})], BAR, True, "foo/p"),
    Case("principal-suffix",
         [("foo/p", {"rules": [{"from": [{"source": {"principals": ["*/sa/sleep"]}}]}]})],
         SLEEP, True, "foo/p"),
    Case("principal-other-trust-domain-no-match",
         [("foo/p", {"rules": [{"from": [{"source": {
             "principals": ["cluster.local/ns/default/sa/sleep"]}}]}]})],
         ctx("default", "sleep", td="other.td"), False),
    Case("not-namespaces-excludes",
         [("foo/not-bar", {"rules": [{"from": [{"source": {"notNamespaces": ["bar"]}}]}]})],
         BAR, False),
    Case("not-namespaces-admits-others",
         [("foo/not-bar", {"rules": [{"from": [{"source": {"notNamespaces": ["bar"]}}]}]})],
         SLEEP, True, "foo/not-bar"),
    Case("not-namespaces-admits-plaintext",
         [("foo/not-bar", {"rules": [{"from": [{"source": {"notNamespaces": ["bar"]}}]}]})],
         PLAINTEXT, True, "foo/not-bar"),
    Case("namespace-wildcard",
         [("foo/p", {"rules": [{"from": [{"source": {"namespaces": ["de*"]}}]}]})],
         DEV, True, "foo/p"),
    Case("service-accounts-short-form-uses-policy-namespace",
         [("foo/p", {"rules": [{"from": [{"source": {"serviceAccounts": ["client"]}}]}]})],
         ctx("foo", "client"), True, "foo/p"),
    Case("service-accounts-qualified",
         [("foo/p", {"rules": [{"from": [{"source": {"serviceAccounts": ["bar/client"]}}]}]})],
         ctx("foo", "client"), False),
    Case("ip-block-cidr",
         [("foo/p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]})],
         ctx(src="10.0.0.77"), True, "foo/p"),
    Case("ip-block-cidr-outside",
         [("foo/p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]})],
         ctx(src="10.0.1.77"), False),
    Case("ip-block-single-ip",
         [("foo/p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.1"]}}]}]})],
         ctx(src="10.0.0.1"), True, "foo/p"),
    Case("ip-block-v4-mapped-v6-source",
         [("foo/p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]})],
         ctx(src="::ffff:10.0.0.9"), True, "foo/p"),
    Case("not-ip-blocks",
         [("foo/p", {"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]})],
         ctx(src="10.1.2.3"), False),
    Case("ports-allow", [("foo/p", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})],
         ctx(port=8080), True, "foo/p"),
    Case("ports-other-denied",
         [("foo/p", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})],
         ctx(port=9090), False),
    Case("not-ports-deny",
         [("foo/p", {"action": "DENY", "rules": [{"to": [{"operation": {
             "notPorts": ["8080"]}}]}]})], ctx(port=9090), False, "foo/p"),
    Case("from-and-to-anded",
         [("foo/p", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}],
                                "to": [{"operation": {"ports": ["8080"]}}]}]})],
         ctx("bar", port=9090), False),
    Case("sources-ored",
         [("foo/p", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}},
                                         {"source": {"ipBlocks": ["10.9.0.0/16"]}}]}]})],
         ctx(None, src="10.9.1.1"), True, "foo/p"),
    Case("fields-in-source-anded",
         [("foo/p", {"rules": [{"from": [{"source": {"namespaces": ["bar"],
                                                     "ipBlocks": ["10.9.0.0/16"]}}]}]})],
         ctx("bar", src="10.0.0.1"), False),
    Case("rules-ored",
         [("foo/p", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]},
                               {"to": [{"operation": {"ports": ["80"]}}]}]})],
         SLEEP, True, "foo/p"),
    Case("when-source-ip",
         [("foo/p", {"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.0/24"]}]}]})],
         ctx(src="10.0.0.3"), True, "foo/p"),
    Case("when-destination-port-not-values",
         [("foo/p", {"rules": [{"when": [{"key": "destination.port",
                                          "notValues": ["80"]}]}]})], ctx(port=80), False),
    Case("when-source-principal",
         [("foo/p", {"rules": [{"when": [{"key": "source.principal",
                                          "values": ["cluster.local/ns/bar/sa/client"]}]}]})],
         BAR, True, "foo/p"),
    Case("when-destination-ip",
         [("foo/p", {"action": "DENY", "rules": [{"when": [{"key": "destination.ip",
                                                             "values": ["10.0.0.2"]}]}]})],
         ctx(dst="10.0.0.2"), False, "foo/p"),
    Case("deny-beats-allow",
         [("foo/allow", {"rules": [{}]}),
          ("foo/deny", {"action": "DENY", "rules": [{"from": [{"source": {
              "namespaces": ["dev"]}}]}]})], DEV, False, "foo/deny"),
    Case("any-allow-policy-suffices",
         [("foo/a", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}),
          ("foo/b", {"rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]})],
         DEV, True, "foo/b"),
    # The root namespace (istio-system) applies mesh-wide.
    Case("root-namespace-allow-nothing-mesh-wide",
         [("istio-system/allow-nothing", {})], SLEEP, False),
    Case("root-namespace-selector-all-namespaces",
         [("istio-system/v1-nothing", {"selector": {"matchLabels": {"version": "v1"}}})],
         SLEEP, False),
    Case("root-namespace-selector-skips-unlabelled",
         [("istio-system/v1-nothing", {"selector": {"matchLabels": {"version": "v2"}}})],
         SLEEP, True),
    Case("selector-scopes-policy",
         [("foo/httpbin-nothing", {"selector": {"matchLabels": {"app": "httpbin"}}})],
         SLEEP, True, workload=WorkloadRef("foo", {"app": "productpage"})),
    Case("selector-applies-to-selected",
         [("foo/httpbin-nothing", {"selector": {"matchLabels": {"app": "httpbin"}}})],
         SLEEP, False),
    Case("selector-needs-every-label",
         [("foo/p", {"selector": {"matchLabels": {"app": "httpbin", "version": "v2"}}})],
         SLEEP, True),
    Case("empty-match-labels-is-namespace-wide",
         [("foo/p", {"selector": {"matchLabels": {}}})], SLEEP, False,
         workload=WorkloadRef("foo", {"app": "productpage"})),
    Case("policy-in-other-namespace-ignored",
         [("bar/p", {"selector": {"matchLabels": {"app": "httpbin"}}})], SLEEP, True),
    # HTTP attributes at L4 fail safe (ANCHORS: "ztunnel must fail safe").
    Case("l4-allow-with-method-never-matches",
         [("foo/get-only", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})],
         SLEEP, False),
    Case("l4-allow-other-rule-still-matches",
         [("foo/p", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]},
                               {"from": [{"source": {"namespaces": ["default"]}}]}]})],
         SLEEP, True, "foo/p"),
    Case("l4-deny-post-on-8080-denies-all-8080",
         [("foo/httpbin", {"action": "DENY", "rules": [{"to": [{"operation": {
             "methods": ["POST"], "ports": ["8080"]}}]}]})], ctx(port=8080), False,
         "foo/httpbin"),
    Case("l4-deny-post-on-8080-spares-other-ports",
         [("foo/httpbin", {"action": "DENY", "rules": [{"to": [{"operation": {
             "methods": ["POST"], "ports": ["8080"]}}]}]})], ctx(port=9090), True),
    Case("l4-deny-from-dev-to-post-denies-dev",
         [("foo/httpbin", {"action": "DENY", "rules": [{
             "from": [{"source": {"namespaces": ["dev"]}}],
             "to": [{"operation": {"methods": ["POST"]}}]}]})], DEV, False, "foo/httpbin"),
    Case("l4-deny-from-dev-to-post-spares-others",
         [("foo/httpbin", {"action": "DENY", "rules": [{
             "from": [{"source": {"namespaces": ["dev"]}}],
             "to": [{"operation": {"methods": ["POST"]}}]}]})], SLEEP, True),
    Case("l4-deny-only-http-denies-everything",
         [("foo/no-admin", {"action": "DENY", "rules": [{"to": [{"operation": {
             "paths": ["/admin*"]}}]}]})], SLEEP, False, "foo/no-admin"),
    Case("l4-deny-header-condition-dropped",
         [("foo/p", {"action": "DENY", "rules": [{
             "from": [{"source": {"namespaces": ["dev"]}}],
             "when": [{"key": "request.headers[x-evil]", "values": ["1"]}]}]})],
         DEV, False, "foo/p"),
    Case("l4-deny-jwt-dropped",
         [("foo/require-jwt", {"action": "DENY", "rules": [{"from": [{"source": {
             "notRequestPrincipals": ["*"]}}]}]})], SLEEP, False, "foo/require-jwt"),
    Case("l4-allow-remote-ip-never-matches",
         [("foo/p", {"rules": [{"from": [{"source": {"remoteIpBlocks": ["0.0.0.0/0"]}}]}]})],
         SLEEP, False),
    # Waypoint-targeted policies are not ztunnel's.
    Case("waypoint-policy-ignored-by-ztunnel",
         [("foo/l7", targeting_waypoint({"action": "DENY", "rules": [{}]}))], SLEEP, True),
]


@pytest.mark.parametrize("case", L4_CASES, ids=lambda c: c.id)
def test_ztunnel_decision(case: Case) -> None:
    cfg = compile_all(*_objects(case))
    assert not [i for i in cfg.issues if i.severity.value == "error"]
    decision = l4(cfg, case.request, case.workload)
    assert decision.allowed is case.allowed, decision.describe()
    assert decision.policy == case.policy


W = targeting_waypoint

L7_CASES = [
    Case("l7-no-policy", [], ctx(method="GET", path="/"), True),
    Case("l7-deny-path",
         [("foo/p", W({"action": "DENY", "rules": [{"to": [{"operation": {
             "paths": ["/admin*"]}}]}]}))], ctx(method="GET", path="/admin/users"), False,
         "foo/p"),
    Case("l7-deny-path-other-path-passes",
         [("foo/p", W({"action": "DENY", "rules": [{"to": [{"operation": {
             "paths": ["/admin*"]}}]}]}))], ctx(method="GET", path="/status"), True),
    Case("l7-path-ignores-query",
         [("foo/p", W({"rules": [{"to": [{"operation": {"paths": ["/info"]}}]}]}))],
         ctx(method="GET", path="/info?x=1"), True, "foo/p"),
    Case("l7-path-suffix",
         [("foo/p", W({"rules": [{"to": [{"operation": {"paths": ["*.png"]}}]}]}))],
         ctx(method="GET", path="/img/a.png"), True, "foo/p"),
    Case("l7-path-template-one-segment",
         [("foo/p", W({"rules": [{"to": [{"operation": {"paths": ["/api/{*}/info"]}}]}]}))],
         ctx(method="GET", path="/api/v1/info"), True, "foo/p"),
    Case("l7-path-template-one-segment-not-two",
         [("foo/p", W({"rules": [{"to": [{"operation": {"paths": ["/api/{*}/info"]}}]}]}))],
         ctx(method="GET", path="/api/v1/x/info"), False),
    Case("l7-path-template-rest",
         [("foo/p", W({"rules": [{"to": [{"operation": {"paths": ["/static/{**}"]}}]}]}))],
         ctx(method="GET", path="/static/a/b/c.css"), True, "foo/p"),
    Case("l7-method-and-path",
         [("foo/p", W({"rules": [{"to": [{"operation": {"methods": ["GET"],
                                                        "paths": ["/data"]}},
                                         {"operation": {"methods": ["POST"],
                                                        "paths": ["/submit"]}}]}]}))],
         ctx(method="POST", path="/data"), False),
    Case("l7-not-methods",
         [("foo/p", W({"action": "DENY", "rules": [{"to": [{"operation": {
             "notMethods": ["GET", "HEAD"]}}]}]}))], ctx(method="DELETE", path="/"), False,
         "foo/p"),
    Case("l7-hosts-case-insensitive",
         [("foo/p", W({"rules": [{"to": [{"operation": {"hosts": ["HttpBin.Foo"]}}]}]}))],
         ctx(method="GET", path="/", host="httpbin.FOO"), True, "foo/p"),
    Case("l7-hosts-wildcard",
         [("foo/p", W({"rules": [{"to": [{"operation": {"hosts": ["*.example.com"]}}]}]}))],
         ctx(method="GET", path="/", host="api.example.com"), True, "foo/p"),
    Case("l7-header-condition",
         [("foo/p", W({"rules": [{"when": [{"key": "request.headers[X-Version]",
                                            "values": ["v1*"]}]}]}))],
         ctx(method="GET", path="/", headers={"x-version": "v1.2"}), True, "foo/p"),
    Case("l7-header-not-values-absent-header-matches",
         [("foo/p", W({"action": "DENY", "rules": [{"when": [{
             "key": "request.headers[x-token]", "notValues": ["secret"]}]}]}))],
         ctx(method="GET", path="/"), False, "foo/p"),
    Case("l7-principal-and-method",
         [("foo/p", W({"rules": [{"from": [{"source": {
             "principals": ["cluster.local/ns/default/sa/sleep"]}}],
             "to": [{"operation": {"methods": ["GET"]}}]}]}))],
         ctx("default", "sleep", method="GET", path="/"), True, "foo/p"),
    Case("l7-remote-ip-from-forwarded-for",
         [("foo/p", W({"rules": [{"from": [{"source": {
             "remoteIpBlocks": ["203.0.113.0/24"]}}]}]}))],
         ctx(method="GET", path="/", remote="203.0.113.9"), True, "foo/p"),
    Case("l7-remote-ip-defaults-to-source",
         [("foo/p", W({"rules": [{"from": [{"source": {
             "remoteIpBlocks": ["203.0.113.0/24"]}}]}]}))],
         ctx(method="GET", path="/", src="10.0.0.1"), False),
    Case("l7-sni-condition",
         [("foo/p", W({"rules": [{"when": [{"key": "connection.sni",
                                            "values": ["*.local"]}]}]}))],
         ctx(method="GET", path="/", sni="x.local"), True, "foo/p"),
    Case("l7-allow-with-jwt-never-matches",
         [("foo/p", W({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}))],
         ctx(method="GET", path="/"), False),
    Case("l7-selector-policy-not-enforced-by-waypoint",
         [("foo/p", {"action": "DENY", "rules": [{}]})], ctx(method="GET", path="/"), True),
]


@pytest.mark.parametrize("case", L7_CASES, ids=lambda c: c.id)
def test_waypoint_decision(case: Case) -> None:
    cfg = compile_all(*_objects(case))
    assert not [i for i in cfg.issues if i.severity.value == "error"]
    decision = l7(cfg, case.request)
    assert decision.allowed is case.allowed, decision.describe()
    assert decision.policy == case.policy


def test_service_targeted_policy_applies_only_to_that_service() -> None:
    spec = {"targetRefs": [{"kind": "Service", "group": "", "name": "httpbin"}],
            "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}
    cfg = compile_all(policy("no-delete", spec))
    request = ctx(method="DELETE", path="/")
    assert not l7(cfg, request, ServiceRef("foo", "httpbin")).allowed
    assert l7(cfg, request, ServiceRef("foo", "reviews")).allowed
    assert l7(cfg, request, None).allowed
    assert l4(cfg, ctx()).allowed


def test_policy_targeting_gateway_and_service_counts_once() -> None:
    spec = targeting_waypoint({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    spec["targetRefs"].append({"kind": "Service", "name": "httpbin"})
    cfg = compile_all(policy("p", spec))
    policies = cfg.waypoint.for_target(WAYPOINT, ServiceRef("foo", "httpbin"))
    assert [p.key for p in policies.allow] == ["foo/p"]
    assert len(cfg.waypoint) == 1


def test_dry_run_deny_is_reported_not_enforced() -> None:
    deny = policy("deny-dev", {"action": "DENY", "rules": [{"from": [{"source": {
        "namespaces": ["dev"]}}]}]}, dry_run=True)
    cfg = compile_all(deny)
    decision = l4(cfg, DEV)
    assert decision.allowed
    assert decision.would_have_denied
    assert decision.dry_run is not None and decision.dry_run.policy == "foo/deny-dev"
    assert "would have denied" in decision.describe()
    other = l4(cfg, SLEEP)
    assert other.allowed and not other.would_have_denied


def test_dry_run_allow_without_match_would_deny() -> None:
    cfg = compile_all(policy("only-bar", {"rules": [{"from": [{"source": {
        "namespaces": ["bar"]}}]}]}, dry_run=True))
    decision = l4(cfg, SLEEP)
    assert decision.allowed and decision.reason is DecisionReason.NO_ALLOW_POLICY
    assert decision.would_have_denied
    assert decision.dry_run is not None
    assert decision.dry_run.reason is DecisionReason.NO_ALLOW_MATCHED
    matched = l4(cfg, BAR)
    assert matched.allowed and not matched.would_have_denied
    assert matched.dry_run is not None and matched.dry_run.policy == "foo/only-bar"


def test_dry_run_allow_would_admit_what_enforced_policies_deny() -> None:
    cfg = compile_all(
        policy("only-bar", {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}),
        policy("also-dev", {"rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]},
               dry_run=True))
    decision = l4(cfg, DEV)
    assert not decision.allowed
    assert decision.dry_run is not None and decision.dry_run.allowed
    assert decision.dry_run.policy == "foo/also-dev"
    assert not decision.would_have_denied


def test_no_dry_run_field_without_dry_run_policies() -> None:
    cfg = compile_all(policy("allow-all", {"rules": [{}]}))
    assert l4(cfg, SLEEP).dry_run is None


def test_audit_policy_does_not_change_decision() -> None:
    audit = policy("audit-dev", {"action": "AUDIT", "rules": [{"from": [{"source": {
        "namespaces": ["dev"]}}]}]})
    cfg = compile_all(audit)
    decision = l4(cfg, DEV)
    assert decision.allowed and decision.reason is DecisionReason.NO_ALLOW_POLICY
    assert decision.audit_policy == "foo/audit-dev"
    assert l4(cfg, SLEEP).audit_policy is None


def test_decision_log_fields_name_policy_as_istio_does() -> None:
    cfg = compile_all(policy("deny-all", {"action": "DENY", "rules": [{}]}))
    fields = l4(cfg, SLEEP).log_fields()
    assert fields["policy"] == "foo/deny-all"
    assert fields["allowed"] is False


def test_deny_reason_when_allow_policies_do_not_match() -> None:
    cfg = compile_all(policy("from-bar", {"rules": [{"from": [{"source": {
        "namespaces": ["bar"]}}]}]}))
    decision = l4(cfg, SLEEP)
    assert decision.reason is DecisionReason.NO_ALLOW_MATCHED
    assert decision.policy is None
    assert decision.describe() == "denied: ALLOW policies apply but none matched"
