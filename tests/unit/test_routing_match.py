"""The per-request engine: lookup, precedence, segment-boundary prefixes, weights, mirrors."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.unit.routing_helpers import backend, backend_of, httproute, send, svc, table
from waypoint.routing.match import Outcome, header_map, parse_query

SEGMENTS = st.lists(st.sampled_from(["a", "b", "ab", "a.b", ""]), min_size=0, max_size=4)


def _path(segments: list[str]) -> str:
    return "/" + "/".join(segments)


@settings(max_examples=150, deadline=None)
@given(prefix=SEGMENTS, path=SEGMENTS, trailing=st.booleans())
def test_prefix_match_respects_segment_boundary(prefix: list[str], path: list[str],
                                                trailing: bool) -> None:
    value = _path(prefix)
    assume("//" not in value and (value == "/" or not value.endswith("/")))
    route_value = value + "/" if trailing and value != "/" else value
    t = table(httproute("r", [{"matches": [{"path": {"type": "PathPrefix",
                                                     "value": route_value}}],
                               "backendRefs": [backend("v1")]}]))
    request_path = _path(path)
    decision = send(t, request_path)
    norm = value.rstrip("/") or "/"
    expected = norm == "/" or request_path == norm or request_path.startswith(norm + "/")
    assert (decision.outcome is Outcome.FORWARD) == expected, (route_value, request_path)


def test_prefix_does_not_match_inside_a_segment() -> None:
    t = table(httproute("r", [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                               "backendRefs": [backend("v2")]}]))
    assert backend_of(send(t, "/v2")) == "v2"
    assert backend_of(send(t, "/v2/x")) == "v2"
    assert backend_of(send(t, "/v2/")) == "v2"
    assert send(t, "/v2x").status == 404


# --- precedence: the indexed engine equals a brute-force sort of the spec's criteria ----------

_PATHS = [("Exact", "/a"), ("Exact", "/a/b"), ("PathPrefix", "/"), ("PathPrefix", "/a"),
          ("PathPrefix", "/a/"), ("PathPrefix", "/a/b"), ("PathPrefix", "/ab"),
          ("RegularExpression", "/a.*"), ("RegularExpression", "/[ab]+/b")]
_MATCH = st.fixed_dictionaries({
    "path": st.sampled_from(_PATHS),
    "method": st.sampled_from([None, "GET", "POST"]),
    "headers": st.lists(st.sampled_from(["x", "y", "z"]), unique=True, max_size=2),
    "query": st.lists(st.sampled_from(["q", "r"]), unique=True, max_size=2),
})
_ROUTE = st.lists(st.lists(_MATCH, min_size=1, max_size=2), min_size=1, max_size=3)


def _match_doc(m: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"path": {"type": m["path"][0], "value": m["path"][1]}}
    if m["method"]:
        doc["method"] = m["method"]
    if m["headers"]:
        doc["headers"] = [{"name": h.upper(), "value": "1"} for h in m["headers"]]
    if m["query"]:
        doc["queryParams"] = [{"name": q, "value": "1"} for q in m["query"]]
    return doc


def _spec_matches(m: dict[str, Any], path: str, method: str, headers: set[str],
                  query: set[str]) -> bool:
    import re
    kind, value = m["path"]
    if kind == "Exact":
        ok = path == value
    elif kind == "PathPrefix":
        norm = value.rstrip("/") or "/"
        ok = norm == "/" or path == norm or path.startswith(norm + "/")
    else:
        ok = re.fullmatch(value, path) is not None
    return (ok and (m["method"] is None or m["method"] == method)
            and set(m["headers"]) <= headers and set(m["query"]) <= query)


def _spec_key(m: dict[str, Any], created: str, name: str, ri: int, mi: int) -> tuple[Any, ...]:
    kind, value = m["path"]
    rank = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}[kind]
    return (rank, -len(value), 0 if m["method"] else 1, -len(m["headers"]), -len(m["query"]),
            created, name, ri, mi)


@settings(max_examples=60, deadline=None)
@given(routes=st.lists(_ROUTE, min_size=1, max_size=3), seed=st.integers(0, 2**16),
       request=st.fixed_dictionaries({
           "path": st.sampled_from(["/", "/a", "/a/", "/a/b", "/a/b/c", "/ab", "/b", "/b/b"]),
           "method": st.sampled_from(["GET", "POST", "PUT"]),
           "headers": st.sets(st.sampled_from(["x", "y", "z"])),
           "query": st.sets(st.sampled_from(["q", "r"]))}))
def test_precedence_is_a_total_order_independent_of_input_order(
        routes: list[list[list[dict[str, Any]]]], seed: int, request: dict[str, Any]) -> None:
    objects = []
    expected_key = None
    expected_name = None
    for i, rules in enumerate(routes):
        name, created = f"route-{i}", f"2024-01-0{(i * 7) % 3 + 1}T00:00:00Z"
        objects.append(httproute(name, [{"matches": [_match_doc(m) for m in matches],
                                         "backendRefs": [backend("v1")]}
                                        for matches in rules], created=created))
        for ri, matches in enumerate(rules):
            for mi, m in enumerate(matches):
                if _spec_matches(m, request["path"], request["method"], request["headers"],
                                 request["query"]):
                    key = _spec_key(m, created, name, ri, mi)
                    if expected_key is None or key < expected_key:
                        expected_key, expected_name = key, f"default/{name}/{ri}"
    shuffled = list(objects)
    random.Random(seed).shuffle(shuffled)
    query = "&".join(f"{q}=1" for q in sorted(request["query"]))
    path = request["path"] + (f"?{query}" if query else "")
    headers = {h: "1" for h in request["headers"]}
    for order in (objects, shuffled):
        decision = send(table(*order), path, method=request["method"], headers=headers)
        assert decision.route_name == (expected_name or "")


# --- lookup ---------------------------------------------------------------------------------

def test_unknown_destination_is_404_route_not_found() -> None:
    decision = send(table(), host="nobody")
    assert decision.status == 404 and decision.response_flag == "NR"


def test_every_host_form_and_the_vip_reach_the_service() -> None:
    t = table(httproute("r", [{"backendRefs": [backend("v1")]}]))
    for host in ("echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local",
                 "ECHO.default", "echo:80"):
        assert backend_of(send(t, host=host)) == "v1", host
    assert backend_of(send(t, host="whatever", destination="10.0.0.1")) == "v1"
    assert backend_of(send(t, host="echo.default.svc.cluster.local.")) == "v1"


def test_v6_vip_in_the_host_header_reaches_the_service() -> None:
    services = [svc("echo", vips=("fd00::1",)), svc("v1")]
    t = table(httproute("r", [{"backendRefs": [backend("v1")]}]), services=services)
    assert backend_of(send(t, host="[fd00::1]:80")) == "v1"
    assert backend_of(send(t, host="[fd00::1]")) == "v1"


def test_service_without_routes_goes_to_itself() -> None:
    decision = send(table(), host="echo:8080")
    assert decision.outcome is Outcome.FORWARD and decision.cluster is not None
    assert decision.cluster.name == "outbound|8080||echo.default.svc.cluster.local"


def test_route_parent_port_limits_the_route_to_that_port() -> None:
    t = table(httproute("r", [{"backendRefs": [backend("v1")]}], port=8080))
    assert backend_of(send(t, host="echo:8080")) == "v1"
    assert backend_of(send(t, host="echo")) == "echo"


def test_header_names_are_case_insensitive_and_values_are_not() -> None:
    t = table(httproute("r", [{"matches": [{"headers": [{"name": "X-Version", "value": "One"}]}],
                               "backendRefs": [backend("v1")]}]))
    assert backend_of(send(t, headers={"x-version": "One"})) == "v1"
    assert send(t, headers={"x-version": "one"}).status == 404


def test_only_the_first_header_match_entry_of_a_name_counts() -> None:
    t = table(httproute("r", [{"matches": [{"headers": [{"name": "x", "value": "1"},
                                                        {"name": "X", "value": "2"}]}],
                               "backendRefs": [backend("v1")]}]))
    assert backend_of(send(t, headers={"x": "1"})) == "v1"


def test_regex_header_and_path_match_fully() -> None:
    t = table(httproute("r", [{"matches": [{
        "path": {"type": "RegularExpression", "value": "/items/[0-9]+"},
        "headers": [{"type": "RegularExpression", "name": "x", "value": "v[12]"}]}],
        "backendRefs": [backend("v1")]}]))
    assert backend_of(send(t, "/items/42", headers={"x": "v2"})) == "v1"
    assert send(t, "/items/42/more", headers={"x": "v2"}).status == 404
    assert send(t, "/items/42", headers={"x": "v22"}).status == 404


def test_query_values_are_decoded_and_the_first_repeated_value_wins() -> None:
    assert parse_query("a=1&a=2&b=x%20y&c&=z") == {"a": "1", "b": "x y", "c": "", "": "z"}


# --- weights and mirrors ----------------------------------------------------------------------

def _split(weights: list[int]) -> Any:
    return table(httproute("r", [{"backendRefs": [backend(f"v{i + 1}", weight=w)
                                                  for i, w in enumerate(weights)]}]))


def test_weights_split_by_proportion() -> None:
    t = _split([90, 10])
    rng = random.Random(7)
    picks = [backend_of(send(t, rng=rng)) for _ in range(2000)]
    assert abs(picks.count("v1") / 2000 - 0.9) < 0.03


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(0, 5), min_size=2, max_size=3), seed=st.integers(0, 1000))
def test_zero_weight_backends_never_get_traffic(weights: list[int], seed: int) -> None:
    t = _split(weights)
    rng = random.Random(seed)
    for _ in range(50):
        decision = send(t, rng=rng)
        if sum(weights) == 0:
            assert decision.status == 500
        else:
            name = backend_of(decision)
            assert name is not None and weights[int(name[1]) - 1] > 0


def test_the_same_seed_gives_the_same_picks() -> None:
    t = _split([1, 1, 1])
    first = [backend_of(send(t, rng=r)) for r in [random.Random(3)] * 20]
    second = [backend_of(send(t, rng=r)) for r in [random.Random(3)] * 20]
    assert first == second


def test_mirror_share_and_shadow_host() -> None:
    t = table(httproute("r", [{"filters": [{"type": "RequestMirror", "requestMirror": {
        "backendRef": backend("v2"), "percent": 25}}], "backendRefs": [backend("v1")]}]))
    rng = random.Random(11)
    decisions = [send(t, host="echo:80", rng=rng) for _ in range(2000)]
    mirrored = [d for d in decisions if d.mirrors]
    assert abs(len(mirrored) / 2000 - 0.25) < 0.03
    assert all(backend_of(d) == "v1" for d in decisions)
    assert mirrored[0].mirrors[0].authority == "echo-shadow:80"
    assert mirrored[0].mirrors[0].cluster.service_name == "v2"


def test_header_lines_become_the_match_map() -> None:
    pairs = [(b"x-a", b"1"), (b"cookie", b"a=1"), (b"x-a", b"2"), (b"cookie", b"b=2"),
             (b"x-b", b"\xe9")]
    assert header_map(pairs) == {"x-a": "1,2", "cookie": "a=1; b=2", "x-b": "\u00e9"}
