"""Translation: per-object errors, API precedence, policies into the resilience types."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.routing_helpers import NS, backend, backend_of, httproute, obj, send, svc, table
from waypoint.resilience.config import (
    ISTIO_DEFAULT_RETRY,
    NO_RETRY,
    SimpleLb,
)
from waypoint.routing.catalog import ApiObject, ServiceInfo
from waypoint.routing.match import Outcome
from waypoint.routing.model import ConfigIssue, RouteTable
from waypoint.routing.translate import RouteTableStore


def _errors(t: RouteTable) -> list[ConfigIssue]:
    return [i for i in t.issues if i.severity == "error"]


def vs(name: str, http: list[dict[str, Any]], hosts: list[str] | None = None,
       created: str = "", **extra: Any) -> ApiObject:
    return obj("VirtualService", name, {"hosts": hosts or ["echo"], "http": http, **extra},
               created=created)


def dr(name: str, spec: dict[str, Any], created: str = "") -> ApiObject:
    return obj("DestinationRule", name, spec, created=created)


# --- per-object errors ------------------------------------------------------------------------

def test_a_bad_regex_rejects_its_route_only() -> None:
    bad = httproute("bad", [{"matches": [{"path": {"type": "RegularExpression",
                                                   "value": "(a+)+"}}],
                             "backendRefs": [backend("v2")]}], parent="echo")
    good = httproute("good", [{"backendRefs": [backend("v1")]}], parent="v3")
    t = table(bad, good)
    assert backend_of(send(t, host="v3")) == "v1"
    assert backend_of(send(t, host="echo")) == "echo"  # bad route absent: default route
    [issue] = _errors(t)
    assert (issue.ref.name, issue.field) == ("bad", "spec.rules[0].matches[0]")
    assert "backtrack" in issue.message


@pytest.mark.parametrize(("rules", "field", "words"), [
    ([{"filters": [{"type": "ExtensionRef",
                    "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}]}],
     "spec.rules[0].filters[0]", "not supported"),
    ([{"matches": [{"path": {"type": "Exact", "value": "/a"}}],
       "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
           "type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}],
     "spec.rules[0].filters[0].path", "PathPrefix"),
    ([{"timeouts": {"request": "1s", "backendRequest": "2s"}}], "spec.rules[0]",
     "must not exceed"),
    ([{"timeouts": {"request": "1.5s"}}], "spec.rules[0].timeouts.request", "GEP-2257"),
    ([{"matches": [{"path": {"type": "PathPrefix", "value": "/a/../b"}}]}],
     "spec.rules[0].matches[0]", "must not contain"),
    ([{"bogus": 1}], "spec.rules[0].bogus", "unknown field"),
])
def test_invalid_httproutes_are_reported_with_their_field(rules: list[dict[str, Any]],
                                                          field: str, words: str) -> None:
    t = table(httproute("r", rules))
    [issue] = _errors(t)
    assert issue.field == field and words in issue.message
    assert backend_of(send(t)) == "echo"


def test_unresolvable_backends_keep_the_route_and_answer_500() -> None:
    t = table(httproute("r", [{"backendRefs": [backend("missing"),
                                               backend("v1", namespace="other")]}]))
    messages = [i.message for i in _errors(t)]
    assert any("BackendNotFound" in m for m in messages)
    assert any("RefNotPermitted" in m for m in messages)
    assert send(t).status == 500


def test_consumer_routes_and_unknown_parents_are_warnings() -> None:
    consumer = httproute("c", [{"backendRefs": [backend("v1")]}], ns="client",
                         namespace=NS)
    missing = httproute("m", [{"backendRefs": [backend("v1")]}], parent="nope")
    t = table(consumer, missing)
    assert [i.severity for i in t.issues] == ["warning", "warning"]
    assert backend_of(send(t)) == "echo"


def test_store_keeps_the_previous_table_when_translation_fails_as_a_whole() -> None:
    store = RouteTableStore()
    first = store.update([svc("echo")], [])
    assert first.version == 1

    class Exploding(ServiceInfo):
        @property
        def hostname(self) -> str:
            raise RuntimeError("bug")

    assert store.update([Exploding("x", NS, ())], []) is first
    assert store.current is first


# --- which API wins ---------------------------------------------------------------------------

def test_httproute_wins_over_virtual_service_for_the_same_service() -> None:
    t = table(httproute("r", [{"backendRefs": [backend("v1")]}]),
              vs("v", [{"route": [{"destination": {"host": "v2"}}]}]))
    assert backend_of(send(t)) == "v1"
    assert any("HTTPRoute wins" in i.message for i in t.issues)


def test_oldest_virtual_service_wins_and_the_other_is_reported() -> None:
    old = vs("old", [{"route": [{"destination": {"host": "v1"}}]}], created="2024-01-01")
    new = vs("new", [{"route": [{"destination": {"host": "v2"}}]}], created="2024-02-01")
    t = table(new, old)
    assert backend_of(send(t)) == "v1"
    assert [i.ref.name for i in t.issues] == ["new"]


def test_exact_host_beats_a_wildcard_and_gateway_only_services_are_skipped() -> None:
    wild = vs("wild", [{"route": [{"destination": {"host": "v2"}}]}],
              hosts=["*.default.svc.cluster.local"], created="2024-01-01")
    exact = vs("exact", [{"route": [{"destination": {"host": "v1"}}]}], created="2024-02-01")
    ingress = vs("ingress", [{"route": [{"destination": {"host": "v3"}}]}], hosts=["v1"],
                 gateways=["istio-system/ingress"])
    t = table(wild, exact, ingress)
    assert backend_of(send(t)) == "v1"
    assert backend_of(send(t, host="v3")) == "v2"
    assert backend_of(send(t, host="v1")) == "v2"


def test_virtual_service_with_zero_weights_is_rejected() -> None:
    t = table(vs("v", [{"route": [{"destination": {"host": "v1"}, "weight": 0},
                                  {"destination": {"host": "v2"}, "weight": 0}]}]))
    [issue] = _errors(t)
    assert issue.field == "spec.http[0].route" and "sum to 0" in issue.message


def test_unknown_subset_answers_503_cluster_not_found() -> None:
    t = table(vs("v", [{"route": [{"destination": {"host": "v1", "subset": "nope"}}]}]))
    decision = send(t)
    assert decision.status == 503 and decision.response_flag == "NC"
    assert "subset 'nope'" in _errors(t)[0].message


def test_istio_regex_with_backreference_is_refused() -> None:
    t = table(vs("v", [{"match": [{"uri": {"regex": r"/(a)\1"}}],
                        "route": [{"destination": {"host": "v1"}}]}]))
    assert "RE2" in _errors(t)[0].message


# --- policies -------------------------------------------------------------------------------

def test_virtual_service_resilience_is_translated() -> None:
    t = table(vs("v", [{"timeout": "2s",
                        "retries": {"attempts": 3, "perTryTimeout": "500ms",
                                    "retryOn": "5xx,connect-failure,503"},
                        "fault": {"delay": {"fixedDelay": "1.5s", "percentage": {"value": 0.1}},
                                  "abort": {"grpcStatus": "UNAVAILABLE",
                                            "percentage": {"value": 5}}},
                        "route": [{"destination": {"host": "v1"}}]}]))
    res = send(t).resilience
    assert res is not None
    assert res.timeouts.request == 2.0
    assert res.retries.attempts == 3 and res.retries.per_try_timeout == 0.5
    assert {"5xx", "connect-failure"} <= res.retries.retry_on
    assert res.retries.retriable_status_codes == frozenset({503})
    assert res.fault is not None and res.fault.delay is not None and res.fault.abort is not None
    assert res.fault.delay.fixed_delay == 1.5 and res.fault.delay.percentage == 0.1
    assert res.fault.abort.grpc_status == 14


def test_retry_defaults_and_explicit_zero() -> None:
    default = table(vs("v", [{"route": [{"destination": {"host": "v1"}}]}]))
    off = table(vs("v", [{"retries": {"attempts": 0},
                          "route": [{"destination": {"host": "v1"}}]}]))
    assert send(default).resilience is not None
    assert send(default).resilience.retries is ISTIO_DEFAULT_RETRY  # type: ignore[union-attr]
    assert send(off).resilience.retries is NO_RETRY  # type: ignore[union-attr]


def test_httproute_timeouts_and_retry_are_translated() -> None:
    t = table(httproute("r", [{"timeouts": {"request": "10s", "backendRequest": "2s"},
                               "retry": {"attempts": 3, "codes": [503], "backoff": "100ms"},
                               "backendRefs": [backend("v1")]}]))
    res = send(t).resilience
    assert res is not None
    assert (res.timeouts.request, res.timeouts.per_try) == (10.0, 2.0)
    assert res.retries.attempts == 3 and res.retries.backoff_base == 0.1
    assert res.retries.retriable_status_codes == frozenset({503})


def test_zero_timeout_disables_it() -> None:
    t = table(httproute("r", [{"timeouts": {"request": "0s"}, "backendRefs": [backend("v1")]}]))
    assert send(t).resilience.timeouts.request is None  # type: ignore[union-attr]


def test_destination_rule_settings_reach_the_cluster() -> None:
    t = table(
        dr("echo", {"host": "echo", "trafficPolicy": {
            "loadBalancer": {"simple": "ROUND_ROBIN",
                             "localityLbSetting": {"failover": [{"from": "r1", "to": "r2"}]}},
            "connectionPool": {"tcp": {"maxConnections": 1, "connectTimeout": "30ms"},
                               "http": {"http1MaxPendingRequests": 1,
                                        "maxRequestsPerConnection": 1}},
            "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s",
                                 "baseEjectionTime": "3m", "maxEjectionPercent": 100},
            "tls": {"mode": "ISTIO_MUTUAL"},
            "portLevelSettings": [{"port": {"number": 8080},
                                   "loadBalancer": {"simple": "RANDOM"}}]},
            "subsets": [{"name": "v1", "labels": {"version": "v1"},
                         "trafficPolicy": {"loadBalancer": {"consistentHash": {
                             "httpHeaderName": "X-User"}}}}]}),
        vs("v", [{"match": [{"port": 80}],
                  "route": [{"destination": {"host": "echo", "subset": "v1"}}]},
                 {"route": [{"destination": {"host": "echo"}}]}]))
    assert _errors(t) == []
    sub = send(t).cluster
    assert sub is not None and sub.subset == "v1" and dict(sub.subset_labels) == {"version": "v1"}
    res = sub.resilience
    assert res.load_balancer.consistent_hash is not None
    assert res.load_balancer.consistent_hash.http_header_name == "x-user"
    assert res.connection_pool.max_connections == 1
    assert res.connection_pool.connect_timeout == pytest.approx(0.03)
    assert res.connection_pool.max_requests_per_connection == 1
    assert res.outlier_detection is not None
    assert res.outlier_detection.consecutive_5xx == 3
    assert res.outlier_detection.base_ejection_time == 180.0
    assert sub.tls_mode == "ISTIO_MUTUAL"
    plain = send(t, host="echo:8080").cluster
    assert plain is not None and plain.subset is None
    assert plain.resilience.load_balancer.simple is SimpleLb.RANDOM
    assert plain.resilience.load_balancer.locality_lb is None
    assert t.clusters["outbound|80||echo.default.svc.cluster.local"].resilience \
        .load_balancer.simple is SimpleLb.ROUND_ROBIN


def test_destination_rule_values_the_settings_refuse_are_reported() -> None:
    t = table(dr("echo", {"host": "echo", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {"httpHeaderName": "x", "maglev": {"tableSize": 1000}}}}}))
    [issue] = _errors(t)
    assert "prime" in issue.message
    assert send(t).outcome is Outcome.FORWARD


def test_second_destination_rule_for_a_host_is_ignored() -> None:
    t = table(dr("a", {"host": "echo", "subsets": [{"name": "x"}]}, created="2024-01-01"),
              dr("b", {"host": "echo.default.svc.cluster.local"}, created="2024-02-01"))
    [issue] = _errors(t)
    assert issue.ref.name == "b" and "oldest" in issue.message


def test_istio_direct_response_redirect_and_mirror() -> None:
    t = table(vs("v", [
        {"match": [{"uri": {"exact": "/teapot"}}],
         "directResponse": {"status": 418, "body": {"bytes": "dGVh"}}},
        {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new"}},
        {"route": [{"destination": {"host": "v1"}}],
         "mirrors": [{"destination": {"host": "v2"}, "percentage": {"value": 100}},
                     {"destination": {"host": "v3"}, "percentage": {"value": 0}}]}]))
    teapot = send(t, "/teapot")
    assert (teapot.outcome, teapot.status, teapot.body) == (Outcome.DIRECT_RESPONSE, 418, b"tea")
    moved = send(t, "/old/x")
    assert (moved.status, moved.location) == (301, "http://echo/new")
    forwarded = send(t, "/x")
    assert [m.cluster.service_name for m in forwarded.mirrors] == ["v2"]


def test_fields_the_waypoint_does_not_act_on_are_warned_about() -> None:
    t = table(dr("echo", {"host": "echo", "trafficPolicy": {"connectionPool": {
        "tcp": {"tcpKeepalive": {"time": "7200s"}}, "http": {"h2UpgradePolicy": "UPGRADE"}}}}),
        httproute("r", [{"sessionPersistence": {"sessionName": "s"},
                         "backendRefs": [backend("v1")]}], parent="v1"))
    warned = sorted((i.ref.name, i.field) for i in t.issues if i.severity == "warning")
    assert warned == [("echo", "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy"),
                      ("echo", "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"),
                      ("r", "spec.rules[0].sessionPersistence")]
    assert _errors(t) == []


def test_hostnames_on_a_service_route_are_ignored_with_a_warning() -> None:
    route = httproute("r", [{"backendRefs": [backend("v1")]}])
    route = ApiObject(kind=route.kind, namespace=route.namespace, name=route.name,
                      spec={**route.spec, "hostnames": ["only.example"]})
    t = table(route)
    assert backend_of(send(t, host="echo")) == "v1"
    [issue] = t.issues
    assert issue.field == "spec.hostnames" and issue.severity == "warning"


def test_routes_of_services_the_waypoint_does_not_serve_are_skipped_quietly() -> None:
    from waypoint.routing.translate import translate
    theirs = httproute("theirs", [{"bogus": 1}], parent="v1")
    theirs_vs = vs("theirs-vs", [{"route": [{"destination": {"host": "v3"}}]}], hosts=["v2"])
    broken = obj("HTTPRoute", "broken", {"parentRefs": "nonsense"})
    ours = httproute("ours", [{"backendRefs": [backend("v1")]}])
    from tests.unit.routing_helpers import SERVICES
    t = translate(SERVICES, [theirs, theirs_vs, broken, ours], served={(NS, "echo")},
                  home_namespace=NS)
    assert backend_of(send(t)) == "v1"
    assert send(t, host="v2").status == 404  # not served: no entry at all
    assert [i.ref.name for i in t.issues] == ["broken"]
