"""Building and checking HBONE CONNECT requests (pure functions)."""

from __future__ import annotations

import re

import pytest

from common.hbone.request import (
    BadRequestError,
    Baggage,
    build_request,
    format_address,
    parse_authority,
    parse_request,
)


@pytest.mark.parametrize(("authority", "expected"), [
    ("10.0.0.1:80", ("10.0.0.1", 80)),
    ("[fd00::1]:8080", ("fd00::1", 8080)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
])
def test_parse_authority_accepts_ip_and_port(authority: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority) == expected


@pytest.mark.parametrize(("authority", "message"), [
    ("10.0.0.1", "no port"),
    ("example.com:80", "IP address"),
    ("fd00::1:80", "brackets"),
    ("[10.0.0.1]:80", "brackets"),
    ("10.0.0.1:0", "1-65535"),
    ("10.0.0.1:99999", "1-65535"),
    ("10.0.0.1:http", "1-65535"),
    ("[fd00::1]80", r"\[ipv6\]:port"),
    ("", "no port"),
])
def test_parse_authority_rejects_with_400(authority: str, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        parse_authority(authority)
    assert info.value.status == 400


def test_format_address_brackets_ipv6() -> None:
    assert format_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_address("fd00::1", 80) == "[fd00::1]:80"


def test_build_request_is_plain_connect_with_istio_headers() -> None:
    baggage = Baggage(namespace="default", workload_name="sleep", service_name="sleep",
                      service_version="v1")
    headers = dict(build_request("[fd00::2]:9080", forwarded_for="[fd00::1]:40000",
                                 baggage=baggage))
    assert headers[b":method"] == b"CONNECT"
    assert headers[b":authority"] == b"[fd00::2]:9080"
    assert b":scheme" not in headers and b":path" not in headers and b":protocol" not in headers
    assert headers[b"forwarded"] == b'for="[fd00::1]:40000"'
    assert headers[b"baggage"] == (b"k8s.namespace.name=default,k8s.deployment.name=sleep,"
                                   b"service.name=sleep,service.version=v1")
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers[b"traceparent"])


def test_build_request_keeps_a_given_traceparent_and_checks_authority() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert dict(build_request("1.2.3.4:5", traceparent=tp))[b"traceparent"] == tp.encode()
    with pytest.raises(BadRequestError):
        build_request("not-an-ip:80")


def test_parse_request_reads_what_build_request_wrote() -> None:
    raw = build_request("10.0.0.9:8080", forwarded_for="10.0.0.1:1234",
                        baggage=Baggage(namespace="ns1", workload_name="w"))
    request = parse_request(1, raw, peer_identity=None, peer_address=("10.0.0.1", 5))
    assert (request.host, request.port) == ("10.0.0.9", 8080)
    assert request.forwarded_for == "10.0.0.1:1234"
    assert request.baggage == {"k8s.namespace.name": "ns1", "k8s.deployment.name": "w"}
    assert request.traceparent is not None


@pytest.mark.parametrize(("headers", "message"), [
    ([(b":method", b"GET"), (b":authority", b"1.2.3.4:80"), (b":scheme", b"http"),
      (b":path", b"/")], "only CONNECT"),
    ([(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:80"), (b":protocol", b"websocket"),
      (b":scheme", b"https"), (b":path", b"/")], "extended CONNECT"),
    ([(b":method", b"CONNECT"), (b":authority", b"svc.example:80")], "IP address"),
])
def test_parse_request_refuses_non_hbone_requests_with_400(
        headers: list[tuple[bytes, bytes]], message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        parse_request(1, headers, peer_identity=None, peer_address=None)
    assert info.value.status == 400
