"""Consistent-hash keys (Istio "Destination Rule" ConsistentHashLB key sources)."""

from __future__ import annotations

from waypoint.resilience.config import ConsistentHashSettings, HashCookie
from waypoint.resilience.hashkey import request_hash


def test_header_key_and_missing_header() -> None:
    s = ConsistentHashSettings(http_header_name="X-User")
    a = request_hash(s, {"x-user": "alice"}, source_ip="10.0.0.1")
    assert a is not None and a == request_hash(s, {"x-user": "alice"}, source_ip="10.9.9.9")
    assert request_hash(s, {}, source_ip="10.0.0.1") is None


def test_source_ip_key() -> None:
    s = ConsistentHashSettings(use_source_ip=True)
    assert request_hash(s, {}, source_ip="10.0.0.1") != request_hash(s, {}, source_ip="10.0.0.2")


def test_query_parameter_is_case_sensitive() -> None:
    s = ConsistentHashSettings(http_query_parameter_name="user")
    assert request_hash(s, {}, source_ip="", path="/a?user=bob&x=1") is not None
    assert request_hash(s, {}, source_ip="", path="/a?User=bob") is None


def test_cookie_key_and_minted_cookie_with_ttl() -> None:
    s = ConsistentHashSettings(http_cookie=HashCookie(name="sticky", path="/", ttl=60.0))
    found = request_hash(s, {"cookie": "a=1; sticky=xyz"}, source_ip="10.0.0.1")
    assert found is not None and found.set_cookie is None
    minted = request_hash(s, {}, source_ip="10.0.0.1")
    assert minted is not None and minted.set_cookie is not None
    assert minted.set_cookie.startswith("sticky=") and "Max-Age=60" in minted.set_cookie
    value = minted.set_cookie.split(";")[0].split("=")[1]
    # The client's next request, carrying the cookie, hashes to the same key.
    again = request_hash(s, {"cookie": f"sticky={value}"}, source_ip="10.0.0.7")
    assert again is not None and again.value == minted.value
    no_ttl = ConsistentHashSettings(http_cookie=HashCookie(name="sticky"))
    assert request_hash(no_ttl, {}, source_ip="10.0.0.1") is None
