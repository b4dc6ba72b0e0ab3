"""Spec models of security.istio.io/v1 AuthorizationPolicy and PeerAuthentication."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from common.api.base import field_errors
from common.api.istio_security import AuthorizationPolicySpec, PeerAuthenticationSpec

ISTIO_DOC_EXAMPLE = """
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/sleep"]
  - source:
      namespaces: ["test"]
  to:
  - operation:
      methods: ["GET"]
      paths: ["/info*"]
  - operation:
      methods: ["POST"]
      paths: ["/data"]
  when:
  - key: request.auth.claims[iss]
    values: ["https://accounts.google.com"]
"""


def _errors(model: Any, data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return field_errors(info.value)


def test_istio_doc_example_parses_with_wire_names() -> None:
    spec = AuthorizationPolicySpec.model_validate(yaml.safe_load(ISTIO_DOC_EXAMPLE))
    rule = spec.rules[0]
    assert rule.from_[0].source.principals == ["cluster.local/ns/default/sa/sleep"]
    assert rule.to[1].operation.paths == ["/data"]
    assert rule.when[0].key == "request.auth.claims[iss]"
    dumped = spec.model_dump(by_alias=True, exclude_defaults=True)
    assert dumped["rules"][0]["from"][1] == {"source": {"namespaces": ["test"]}}
    assert AuthorizationPolicySpec.model_validate(dumped) == spec


def test_empty_spec_is_allow_with_no_rules() -> None:
    spec = AuthorizationPolicySpec.model_validate({})
    assert spec.action == "ALLOW" and spec.rules == [] and spec.all_target_refs == []


def test_unknown_fields_are_errors_with_their_path() -> None:
    errors = _errors(AuthorizationPolicySpec,
                     {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]})
    assert ("spec.rules[0].from[0].source.principal",
            "unknown field (check the spelling and the API version)") in errors


@pytest.mark.parametrize(("data", "fragment"), [
    ({"action": "REJECT"}, "action"),
    ({"targetRef": {"kind": "Gateway", "name": "a"},
      "targetRefs": [{"kind": "Gateway", "name": "b"}]}, "only one of `targetRef`"),
    ({"provider": {"name": "x"}}, "only allowed with action CUSTOM"),
    ({"action": "CUSTOM"}, "needs a `provider`"),
    ({"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}, "string"),
    ({"targetRefs": [{"kind": "Gateway", "name": ""}]}, "at least 1 character"),
])
def test_authorization_policy_shape_errors(data: dict[str, Any], fragment: str) -> None:
    assert any(fragment in f"{path}: {msg}" for path, msg in _errors(AuthorizationPolicySpec,
                                                                     data))


def test_single_target_ref_reads_as_a_list() -> None:
    spec = AuthorizationPolicySpec.model_validate(
        {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp"}})
    assert [r.name for r in spec.all_target_refs] == ["wp"]


def test_peer_authentication_port_keys_from_yaml_strings() -> None:
    spec = PeerAuthenticationSpec.model_validate(yaml.safe_load("""
selector:
  matchLabels: {app: httpbin}
mtls: {mode: STRICT}
portLevelMtls:
  "8080": {mode: DISABLE}
"""))
    assert spec.port_level_mtls[8080].mode == "DISABLE"
    assert spec.mtls is not None and spec.mtls.mode == "STRICT"


def test_peer_authentication_unknown_mode() -> None:
    assert any(path == "spec.mtls.mode" for path, _ in _errors(
        PeerAuthenticationSpec, {"mtls": {"mode": "ON"}}))
