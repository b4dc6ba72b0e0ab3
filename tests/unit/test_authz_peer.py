"""PeerAuthentication: effective mTLS mode per workload and port."""

from __future__ import annotations

from typing import Any

import pytest

from common.authz.compile import PolicyObject
from common.authz.model import Severity, WorkloadRef
from common.authz.peer import MtlsMode, compile_peer_authentications

HTTPBIN = WorkloadRef("foo", {"app": "httpbin"})
OTHER = WorkloadRef("foo", {"app": "other"})


def pa(ns: str, name: str, spec: dict[str, Any], created: str = "2026-01-01T00:00:00Z"
       ) -> PolicyObject:
    return PolicyObject(ns, name, spec, creation_timestamp=created)


def mode(*objects: PolicyObject, workload: WorkloadRef = HTTPBIN, port: int = 8080,
         root: str = "istio-system") -> MtlsMode:
    return compile_peer_authentications(objects, root_namespace=root).mode_for(workload, port)


STRICT = {"mtls": {"mode": "STRICT"}}
PERMISSIVE = {"mtls": {"mode": "PERMISSIVE"}}
SELECT_HTTPBIN = {"selector": {"matchLabels": {"app": "httpbin"}}}


def test_default_is_permissive() -> None:
    assert mode() is MtlsMode.PERMISSIVE
    assert mode().accepts_plaintext


def test_mesh_wide_strict() -> None:
    assert mode(pa("istio-system", "default", STRICT)) is MtlsMode.STRICT
    assert not MtlsMode.STRICT.accepts_plaintext


def test_namespace_overrides_mesh() -> None:
    assert mode(pa("istio-system", "default", STRICT),
                pa("foo", "ns", PERMISSIVE)) is MtlsMode.PERMISSIVE


def test_namespace_in_other_namespace_does_not_apply() -> None:
    assert mode(pa("bar", "ns", STRICT)) is MtlsMode.PERMISSIVE


def test_unset_namespace_inherits_mesh() -> None:
    assert mode(pa("istio-system", "default", STRICT),
                pa("foo", "ns", {"mtls": {"mode": "UNSET"}})) is MtlsMode.STRICT
    assert mode(pa("istio-system", "default", STRICT), pa("foo", "ns", {})) is MtlsMode.STRICT


def test_workload_overrides_namespace() -> None:
    objs = (pa("foo", "ns", STRICT), pa("foo", "httpbin", {**SELECT_HTTPBIN, **PERMISSIVE}))
    assert mode(*objs) is MtlsMode.PERMISSIVE
    assert mode(*objs, workload=OTHER) is MtlsMode.STRICT


def test_port_level_overrides_workload_mode() -> None:
    spec = {**SELECT_HTTPBIN, **STRICT, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}
    objs = (pa("foo", "httpbin", spec),)
    assert mode(*objs, port=8080) is MtlsMode.DISABLE
    assert mode(*objs, port=8080).accepts_plaintext
    assert mode(*objs, port=9090) is MtlsMode.STRICT


def test_port_level_strict_under_permissive_parent() -> None:
    spec = {**SELECT_HTTPBIN, "portLevelMtls": {"9090": {"mode": "STRICT"},
                                                "8080": {"mode": "UNSET"}}}
    objs = (pa("foo", "ns", PERMISSIVE), pa("foo", "httpbin", spec))
    assert mode(*objs, port=9090) is MtlsMode.STRICT
    assert mode(*objs, port=8080) is MtlsMode.PERMISSIVE


def test_oldest_policy_wins_at_one_level() -> None:
    objs = (pa("foo", "newer", STRICT, "2026-06-01T00:00:00Z"),
            pa("foo", "older", PERMISSIVE, "2026-01-01T00:00:00Z"))
    assert mode(*objs) is MtlsMode.PERMISSIVE


def test_root_namespace_selector_policy_is_ignored_with_warning() -> None:
    cfg = compile_peer_authentications([pa("istio-system", "sel", {**SELECT_HTTPBIN, **STRICT})])
    assert cfg.mode_for(HTTPBIN, 80) is MtlsMode.PERMISSIVE
    (issue,) = cfg.issues
    assert issue.severity is Severity.WARNING and "root namespace" in issue.message


def test_root_namespace_configurable() -> None:
    assert mode(pa("mesh", "default", STRICT), root="mesh") is MtlsMode.STRICT


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"mtls": {"mode": "STRICTEST"}}, "spec.mtls.mode"),
    ({"portLevelMtls": {"8080": {"mode": "STRICT"}}}, "portLevelMtls needs a workload"),
    ({**SELECT_HTTPBIN, "portLevelMtls": {"0": {"mode": "STRICT"}}}, "not in 1-65535"),
    ({"mtls": {"mode": "PERMISSIVE"}, "extra": True}, "spec.extra: unknown field"),
])
def test_invalid_object_is_reported_and_strict(spec: dict[str, Any], fragment: str) -> None:
    cfg = compile_peer_authentications([pa("foo", "bad", spec)])
    (issue,) = cfg.issues
    assert issue.severity is Severity.ERROR and fragment in issue.message
    assert "fail-safe: mode STRICT" in issue.message
    assert cfg.mode_for(HTTPBIN, 8080) is MtlsMode.STRICT


def test_invalid_selector_is_not_enforced() -> None:
    cfg = compile_peer_authentications([pa("foo", "bad", {"selector": "app=x", **STRICT})])
    (issue,) = cfg.issues
    assert "not enforced" in issue.message
    assert cfg.mode_for(HTTPBIN, 8080) is MtlsMode.PERMISSIVE
