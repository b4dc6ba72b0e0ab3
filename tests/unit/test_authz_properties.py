"""Properties of the decision that must hold for any policies and any request."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common.authz.model import RequestContext
from tests.unit.authz_helpers import compile_all, ctx, l4, l7, policy, targeting_waypoint

NAMESPACES = ["a", "b", "c"]


def _values(pool: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)


_SOURCE_FIELDS: dict[str, st.SearchStrategy[list[str]]] = {
    "namespaces": _values(["a", "b", "c*", "*"]),
    "notNamespaces": _values(["a", "b"]),
    "principals": _values(["cluster.local/ns/a/sa/x", "*/sa/y", "cluster.local/*", "*"]),
    "notPrincipals": _values(["cluster.local/ns/b/sa/x"]),
    "ipBlocks": _values(["10.0.0.0/24", "10.0.1.1", "0.0.0.0/0"]),
    "notIpBlocks": _values(["10.0.0.0/28"]),
    "remoteIpBlocks": _values(["10.0.0.0/24"]),
    "requestPrincipals": _values(["*", "issuer/sub"]),
    "notRequestPrincipals": _values(["*"]),
}
_OPERATION_FIELDS: dict[str, st.SearchStrategy[list[str]]] = {
    "ports": _values(["80", "8080"]),
    "notPorts": _values(["9090"]),
    "methods": _values(["GET", "POST"]),
    "notMethods": _values(["DELETE"]),
    "paths": _values(["/a", "/a*", "*.png", "/api/{*}"]),
    "notPaths": _values(["/admin*"]),
    "hosts": _values(["svc.local", "*.local"]),
}
_CONDITIONS = st.sampled_from([
    {"key": "source.ip", "values": ["10.0.0.0/24"]},
    {"key": "destination.port", "notValues": ["8080"]},
    {"key": "source.namespace", "values": ["a"]},
    {"key": "request.headers[x-v]", "values": ["1"]},
    {"key": "request.auth.claims[iss]", "values": ["x"]},
    {"key": "connection.sni", "notValues": ["a.local"]},
])


def _block(fields: dict[str, st.SearchStrategy[list[str]]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields).filter(bool)


_RULES = st.fixed_dictionaries({}, optional={
    "from": st.lists(_block(_SOURCE_FIELDS).map(lambda s: {"source": s}), min_size=1,
                     max_size=2),
    "to": st.lists(_block(_OPERATION_FIELDS).map(lambda o: {"operation": o}), min_size=1,
                   max_size=2),
    "when": st.lists(_CONDITIONS, min_size=1, max_size=2),
})


def _spec(action: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda rules, selector: {"action": action, "rules": rules, **selector},
                     st.lists(_RULES, max_size=3),
                     st.sampled_from([{}, {"selector": {"matchLabels": {"app": "httpbin"}}}]))


_CONTEXTS = st.builds(
    lambda ns, src, port, method, path, headers, sni: ctx(
        ns, "x", src=src, port=port, method=method, path=path, headers=headers,
        host="svc.local", sni=sni),
    st.sampled_from([*NAMESPACES, None]),
    st.sampled_from(["10.0.0.5", "10.0.1.1", "192.168.0.1"]),
    st.sampled_from([80, 8080, 9090]),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(["/a", "/a/b", "/x.png", "/admin/1", "/api/v1"]),
    st.sampled_from([{}, {"x-v": "1"}]),
    st.sampled_from([None, "a.local"]),
)

_BASE = st.lists(st.sampled_from(["ALLOW", "DENY"]).flatmap(_spec), max_size=3)


def _objects(specs: list[dict[str, Any]], *, waypoint: bool = False) -> list[Any]:
    return [policy(f"p{i}", targeting_waypoint(s) if waypoint else s)
            for i, s in enumerate(specs)]


def _allowed(specs: list[dict[str, Any]], request: RequestContext, waypoint: bool) -> bool:
    cfg = compile_all(*_objects(specs, waypoint=waypoint))
    return (l7(cfg, request) if waypoint else l4(cfg, request)).allowed


@settings(max_examples=100, deadline=None)
@given(_BASE, _spec("DENY"), _CONTEXTS, st.booleans())
def test_adding_a_deny_never_turns_a_deny_into_an_allow(
        base: list[dict[str, Any]], deny: dict[str, Any], request: RequestContext,
        waypoint: bool) -> None:
    if _allowed([*base, deny], request, waypoint):
        assert _allowed(base, request, waypoint)


@settings(max_examples=100, deadline=None)
@given(st.lists(_spec("DENY"), max_size=2), _spec("ALLOW"), _CONTEXTS, st.booleans())
def test_first_allow_policy_can_only_restrict(
        denies: list[dict[str, Any]], allow: dict[str, Any], request: RequestContext,
        waypoint: bool) -> None:
    if _allowed([*denies, allow], request, waypoint):
        assert _allowed(denies, request, waypoint)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["ALLOW", "DENY"]).flatmap(_spec), _CONTEXTS)
def test_ztunnel_allows_less_and_denies_more_than_the_waypoint(
        spec: dict[str, Any], request: RequestContext) -> None:
    at_l4 = compile_all(policy("p", spec)).policies[0]
    at_l7 = compile_all(policy("p", targeting_waypoint(spec))).policies[0]
    if spec["action"] == "ALLOW" and at_l4.matches(request):
        assert at_l7.matches(request)
    if spec["action"] == "DENY" and at_l7.matches(request):
        assert at_l4.matches(request)


@settings(max_examples=50, deadline=None)
@given(_BASE, st.sampled_from(["ALLOW", "DENY"]).flatmap(_spec), _CONTEXTS)
def test_dry_run_policy_never_changes_the_enforced_decision(
        base: list[dict[str, Any]], extra: dict[str, Any], request: RequestContext) -> None:
    without = compile_all(*_objects(base))
    with_dry = compile_all(*_objects(base), policy("dry", extra, dry_run=True))
    assert l4(with_dry, request).allowed == l4(without, request).allowed


@settings(max_examples=50, deadline=None)
@given(_BASE.flatmap(lambda specs: st.tuples(st.just(specs), st.permutations(range(len(specs))))),
       _CONTEXTS)
def test_decision_does_not_depend_on_object_order(
        base_and_order: tuple[list[dict[str, Any]], list[int]], request: RequestContext) -> None:
    specs, order = base_and_order
    objects = _objects(specs)
    shuffled = [objects[i] for i in order]
    assert l4(compile_all(*objects), request) == l4(compile_all(*shuffled), request)
