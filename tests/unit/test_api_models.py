"""Spec models: defaults as the CRDs apply them, oneof groups, unknown fields with their path."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from common.api.base import field_errors
from common.api.gateway import GatewaySpec, HTTPRouteSpec
from common.api.istio_networking import (
    DestinationRuleSpec,
    ServiceEntrySpec,
    StringMatch,
    VirtualServiceSpec,
)


def _errors(model: Any, data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return field_errors(info.value)


def test_httproute_defaults_match_the_crd() -> None:
    spec = HTTPRouteSpec.model_validate({
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"matches": [{"headers": [{"name": "v", "value": "1"}]}],
                   "backendRefs": [{"name": "b", "port": 80}],
                   "filters": [{"type": "RequestRedirect", "requestRedirect": {}}]}]})
    rule = spec.rules[0]
    assert spec.parent_refs[0].is_service
    assert rule.matches[0].path.type == "PathPrefix" and rule.matches[0].path.value == "/"
    assert rule.matches[0].headers[0].type == "Exact"
    assert rule.backend_refs[0].weight == 1 and rule.backend_refs[0].kind == "Service"
    assert rule.filters[0].request_redirect is not None
    assert rule.filters[0].request_redirect.status_code == 302


def test_httproute_without_rules_has_one_catch_all_rule_without_backends() -> None:
    spec = HTTPRouteSpec.model_validate({})
    assert len(spec.rules) == 1 and spec.rules[0].backend_refs == ()
    assert spec.rules[0].matches[0].path.value == "/"


def test_gateway_parent_is_not_a_service() -> None:
    spec = HTTPRouteSpec.model_validate({"parentRefs": [{"name": "gw"}]})
    assert not spec.parent_refs[0].is_service


def test_unknown_field_is_reported_with_its_wire_path() -> None:
    errors = _errors(HTTPRouteSpec, {"rules": [{"matches": [{"pathh": {}}]}]})
    assert ("spec.rules[0].matches[0].pathh",
            "unknown field (check the spelling and the API version)") in errors


def test_filter_member_must_match_its_type() -> None:
    errors = _errors(HTTPRouteSpec, {"rules": [{"filters": [
        {"type": "URLRewrite", "requestRedirect": {}}]}]})
    assert any("filter type URLRewrite" in message for _path, message in errors)


def test_mirror_percent_and_fraction_are_exclusive() -> None:
    errors = _errors(HTTPRouteSpec, {"rules": [{"filters": [
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "b", "port": 80},
                                                    "percent": 5,
                                                    "fraction": {"numerator": 1}}}]}]})
    assert any("not both" in message for _path, message in errors)


def test_malformed_gateway_duration_is_a_field_error() -> None:
    errors = _errors(HTTPRouteSpec, {"rules": [{"timeouts": {"request": "1.5s"}}]})
    assert errors[0][0] == "spec.rules[0].timeouts.request"


def test_redirect_status_outside_the_enum_is_refused() -> None:
    errors = _errors(HTTPRouteSpec, {"rules": [{"filters": [
        {"type": "RequestRedirect", "requestRedirect": {"statusCode": 305}}]}]})
    assert errors and errors[0][0].startswith("spec.rules[0].filters[0].requestRedirect")


def test_gateway_spec_for_a_waypoint() -> None:
    spec = GatewaySpec.model_validate({
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]})
    assert spec.listeners[0].allowed_routes.namespaces.from_ == "Same"


def test_string_match_allows_at_most_one_kind() -> None:
    assert StringMatch.model_validate({}).exact is None
    with pytest.raises(ValidationError, match="exactly one of exact, prefix, regex"):
        StringMatch.model_validate({"exact": "a", "prefix": "b"})


def test_virtual_service_entry_needs_exactly_one_action() -> None:
    errors = _errors(VirtualServiceSpec, {"hosts": ["a"], "http": [
        {"route": [{"destination": {"host": "a"}}], "redirect": {"uri": "/x"}}]})
    assert any("exactly one of route" in m for _p, m in errors)


def test_virtual_service_unknown_field_and_bad_duration_are_both_reported() -> None:
    errors = _errors(VirtualServiceSpec, {"hosts": ["a"], "http": [
        {"route": [{"destination": {"host": "a"}}], "timeout": "ten", "retrys": {}}]})
    paths = [p for p, _m in errors]
    assert "spec.http[0].timeout" in paths and "spec.http[0].retrys" in paths


def test_destination_rule_full_traffic_policy_parses() -> None:
    spec = DestinationRuleSpec.model_validate({
        "host": "reviews",
        "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"},
                                                "maglev": {"tableSize": 65537}},
                             "localityLbSetting": {"failover": [{"from": "us", "to": "eu"}]}},
            "connectionPool": {"tcp": {"maxConnections": 1, "connectTimeout": "30ms"},
                               "http": {"http1MaxPendingRequests": 1,
                                        "maxRequestsPerConnection": 1}},
            "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s",
                                 "baseEjectionTime": "3m", "maxEjectionPercent": 100},
            "tls": {"mode": "ISTIO_MUTUAL"},
            "portLevelSettings": [{"port": {"number": 9080},
                                   "loadBalancer": {"simple": "RANDOM"}}]},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
    assert spec.traffic_policy is not None
    assert spec.traffic_policy.outlier_detection is not None
    assert spec.traffic_policy.outlier_detection.consecutive_5xx_errors == 3
    lb = spec.traffic_policy.load_balancer
    assert lb is not None and lb.locality_lb_setting is not None
    assert lb.locality_lb_setting.failover[0].from_ == "us"


def test_consistent_hash_needs_one_key() -> None:
    errors = _errors(DestinationRuleSpec, {"host": "r", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {"httpHeaderName": "x", "useSourceIp": True}}}})
    assert any("consistentHash" in m for _p, m in errors)


def test_service_entry_parses() -> None:
    spec = ServiceEntrySpec.model_validate({
        "hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https",
                                                 "protocol": "TLS"}],
        "resolution": "DNS", "location": "MESH_EXTERNAL"})
    assert spec.ports[0].number == 443
