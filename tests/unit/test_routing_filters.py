"""Header operations, path rewrites, redirect Location, mirror Host."""

from __future__ import annotations

import pytest

from waypoint.routing.filters import (
    apply_header_ops,
    apply_header_ops_pairs,
    redirect_location,
    replace_prefix,
    shadow_authority,
    split_authority,
)
from waypoint.routing.model import (
    HeaderOps,
    PathKind,
    PathRewrite,
    PathRewriteKind,
    Redirect,
    RequestMatch,
)


def _prefix(value: str) -> RequestMatch:
    return RequestMatch(path_kind=PathKind.PREFIX, path=value.rstrip("/") or "/", raw_path=value)


# The ReplacePrefixMatch table of the Gateway API reference (HTTPPathModifier).
@pytest.mark.parametrize(("path", "prefix", "replacement", "result"), [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/anything", "/", "/v1", "/v1/anything"),
])
def test_replace_prefix_match_follows_the_spec_table(path: str, prefix: str, replacement: str,
                                                     result: str) -> None:
    assert replace_prefix(path, _prefix(prefix), replacement, gateway=True) == result


def test_istio_prefix_rewrite_replaces_the_matched_characters() -> None:
    match = RequestMatch(path_kind=PathKind.PREFIX, path="/old", segment_prefix=False)
    assert replace_prefix("/older/x", match, "/new", gateway=False) == "/newer/x"


def test_header_ops_remove_then_set_then_add_case_insensitively() -> None:
    headers = {"x-a": "1", "x-b": "2", "x-c": "3"}
    ops = HeaderOps(set=(("x-a", "new"),), add=(("x-b", "more"), ("x-d", "d")),
                    remove=("x-c",))
    apply_header_ops(headers, ops)
    assert headers == {"x-a": "new", "x-b": "2,more", "x-d": "d"}


def test_header_ops_on_pairs_keep_order_and_repeated_lines() -> None:
    pairs = [(b"set-cookie", b"a=1"), (b"x-a", b"1"), (b"set-cookie", b"b=2"), (b"x-c", b"3")]
    ops = HeaderOps(set=(("x-a", "new"),), add=(("set-cookie", "c=3"),), remove=("x-c",))
    assert apply_header_ops_pairs(pairs, ops) == [
        (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-a", b"new"),
        (b"set-cookie", b"c=3")]


def test_empty_header_ops_leave_pairs_untouched() -> None:
    pairs = [(b"a", b"1")]
    assert apply_header_ops_pairs(pairs, HeaderOps()) is pairs


@pytest.mark.parametrize(("authority", "shadow"), [
    ("echo", "echo-shadow"), ("echo:8080", "echo-shadow:8080"),
    ("[fd00::1]:80", "[fd00::1]-shadow:80"),
    ("a.b.svc.cluster.local", "a.b.svc.cluster.local-shadow"),
])
def test_mirror_host_gets_shadow_before_the_port(authority: str, shadow: str) -> None:
    assert shadow_authority(authority) == shadow


@pytest.mark.parametrize(("authority", "parts"), [
    ("h", ("h", None)), ("h:81", ("h", 81)), ("[::1]:9", ("[::1]", 9)), ("[::1]", ("[::1]", None)),
    ("h:x", ("h:x", None)),
])
def test_split_authority(authority: str, parts: tuple[str, int | None]) -> None:
    assert split_authority(authority) == parts


def _loc(redirect: Redirect, authority: str = "echo", port: int = 80, path: str = "/p",
         query: str = "", match: RequestMatch | None = None) -> str:
    return redirect_location(redirect, scheme="http", authority=authority, port=port, path=path,
                             query=query, match=match or _prefix("/"))


def test_gateway_redirect_defaults_keep_scheme_host_port_and_query() -> None:
    assert _loc(Redirect(status=302), query="a=b") == "http://echo/p?a=b"
    assert _loc(Redirect(status=302), authority="echo:8080", port=8080) == "http://echo:8080/p"


def test_gateway_redirect_scheme_implies_its_well_known_port() -> None:
    assert _loc(Redirect(status=302, scheme="https"), port=8080) == "https://echo/p"
    assert _loc(Redirect(status=302, scheme="https", port=8443)) == "https://echo:8443/p"
    assert _loc(Redirect(status=302, host="x.org", port=80)) == "http://x.org/p"


def test_istio_redirect_keeps_the_request_port_unless_told() -> None:
    istio = Redirect(status=301, gateway_semantics=False,
                     path=PathRewrite(PathRewriteKind.FULL, "/new"))
    assert _loc(istio, authority="web:8080", port=8080) == "http://web:8080/new"
    moved = Redirect(status=301, gateway_semantics=False, scheme="https")
    assert _loc(moved, authority="web:8080", port=8080) == "https://web/p"
    derive = Redirect(status=301, gateway_semantics=False, scheme="https",
                      derive_port_from_request=True)
    assert _loc(derive, authority="web:8080", port=8080) == "https://web:8080/p"
    default = Redirect(status=301, gateway_semantics=False, protocol_default_port=True)
    assert _loc(default, authority="web:8080", port=8080) == "http://web/p"


def test_redirect_path_with_its_own_query_replaces_the_request_query() -> None:
    redirect = Redirect(status=302, path=PathRewrite(PathRewriteKind.FULL, "/n?x=1"))
    assert _loc(redirect, query="a=b") == "http://echo/n?x=1"
