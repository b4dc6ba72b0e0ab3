"""Hostile or random API objects never break translation: they are reported, never raised."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conformance.test_httproute_conformance import TABLES, build
from tests.unit.routing_helpers import SERVICES, obj, send
from waypoint.routing.match import Request, route
from waypoint.routing.translate import translate

_KEYS = ["parentRefs", "rules", "matches", "path", "type", "value", "headers", "name",
         "backendRefs", "port", "weight", "filters", "requestRedirect", "hostname",
         "statusCode", "hosts", "http", "match", "uri", "exact", "prefix", "regex", "route",
         "destination", "host", "subset", "retries", "attempts", "timeout", "fault", "kind",
         "group", "mirror", "rewrite", "host", "trafficPolicy", "subsets", "labels"]
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000),
                    st.sampled_from(["", "/", "/a", "echo", "v1", "Service", "(a+)+", "1s",
                                     "Exact", "PathPrefix", "RegularExpression", "x" * 300,
                                     "RequestRedirect", "*", "mesh"]))
_TREES = st.recursive(_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)), max_leaves=25)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["HTTPRoute", "VirtualService", "DestinationRule",
                             "ServiceEntry"]),
       spec=st.dictionaries(st.sampled_from(_KEYS), _TREES, max_size=4))
def test_random_specs_are_reported_not_raised(kind: str, spec: dict[str, Any]) -> None:
    if kind == "HTTPRoute" and isinstance(spec.get("parentRefs"), list):
        spec["parentRefs"] = [*spec["parentRefs"], {"group": "", "kind": "Service",
                                                    "name": "echo"}]
    table = translate(SERVICES, [obj(kind, "random", spec)], home_namespace="default")
    decision = send(table, "/a", rng=random.Random(0))
    # Forwarded (no status) or answered locally with a valid status; never an exception.
    assert decision.status is None or 200 <= decision.status <= 599


_TEXT = st.text(st.sampled_from("/abc.?=&%:[]x1 \t"), max_size=30)


@settings(max_examples=100, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "", "get"]), authority=_TEXT, path=_TEXT,
       headers=st.dictionaries(st.sampled_from(["x-a", "version", "host", "cookie"]), _TEXT,
                               max_size=3),
       port=st.one_of(st.none(), st.integers(0, 70000)))
def test_any_request_gets_a_decision(method: str, authority: str, path: str,
                                     headers: dict[str, str], port: int | None) -> None:
    for table in TABLES:
        decision = route(build(table), Request(method, authority, path, headers, port=port),
                         random.Random(0))
        assert decision.status is None or 200 <= decision.status <= 599
