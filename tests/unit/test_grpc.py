"""waypoint.grpc: detection, Envoy's HTTP -> gRPC status table, protocol selection."""

from __future__ import annotations

import pytest

from waypoint import grpc


@pytest.mark.parametrize(("status", "code"), [
    (400, grpc.INTERNAL), (401, grpc.UNAUTHENTICATED), (403, grpc.PERMISSION_DENIED),
    (404, grpc.UNIMPLEMENTED), (429, grpc.UNAVAILABLE), (502, grpc.UNAVAILABLE),
    (503, grpc.UNAVAILABLE), (504, grpc.UNAVAILABLE), (500, grpc.UNKNOWN), (418, grpc.UNKNOWN),
])
def test_http_status_maps_like_envoy(status: int, code: int) -> None:
    assert grpc.status_from_http(status) == code


def test_detects_grpc_content_types_only() -> None:
    assert grpc.is_grpc([(b"content-type", b"application/grpc")])
    assert grpc.is_grpc([(b"content-type", b"application/grpc+proto")])
    assert grpc.is_grpc([(b"content-type", b"Application/GRPC-web")])
    assert not grpc.is_grpc([(b"content-type", b"application/json")])
    assert not grpc.is_grpc([])


def test_trailers_only_carries_mapped_status_and_encoded_message() -> None:
    pairs = dict(grpc.trailers_only(503, b"no healthy upstream\n"))
    assert pairs[b"content-type"] == b"application/grpc"
    assert pairs[b"grpc-status"] == b"14"
    assert pairs[b"grpc-message"] == b"no healthy upstream"
    assert b"grpc-message" not in dict(grpc.trailers_only(404, b""))


def test_message_percent_encoding() -> None:
    assert grpc.encode_message(b"a%b\xc3\xa9\n") == b"a%25b%C3%A9%0A"


def test_grpc_status_reads_valid_values_only() -> None:
    assert grpc.grpc_status([(b"grpc-status", b"14")]) == 14
    assert grpc.grpc_status([(b"grpc-status", b"x")]) is None
    assert grpc.grpc_status([(b"content-type", b"application/grpc")]) is None


@pytest.mark.parametrize(("name", "app", "h2"), [
    ("grpc", None, True), ("grpc-web", None, True), ("http2-api", None, True),
    ("http", None, False), ("grpcx", None, False), (None, "kubernetes.io/h2c", True),
    ("http", "grpc", True), ("grpc", "http", False), (None, None, False),
])
def test_protocol_selection_by_port_name_and_app_protocol(
        name: str | None, app: str | None, h2: bool) -> None:
    assert grpc.wants_h2(name, app) is h2


def test_snapshot_predicate_selects_h2_for_declared_ports_and_follows_versions() -> None:
    from types import SimpleNamespace
    from typing import cast

    from common.model import Endpoint, ServicePort, Snapshot
    from waypoint.h2_upstream import snapshot_h2_endpoints
    from waypoint.upstream import EndpointInfo

    def snap(version: int, app_protocol: str | None) -> Snapshot:
        service = SimpleNamespace(
            ports=(ServicePort(port=9000, target_port=9090, name="grpc-api"),
                   ServicePort(port=80, target_port=8080, name="http",
                               app_protocol=app_protocol)),
            ready_endpoints=(Endpoint(ip="10.1.0.5", ready=True, target_ports={80: 8081}),))
        return cast(Snapshot, SimpleNamespace(version=version,
                                              services_by_key={("demo", "svc"): service}))

    current = [snap(1, None)]
    is_h2 = snapshot_h2_endpoints(lambda: current[0])
    assert is_h2(EndpointInfo("10.1.0.5", 9090))
    assert not is_h2(EndpointInfo("10.1.0.5", 8081))
    assert not is_h2(EndpointInfo("10.1.0.6", 9090))
    current[0] = snap(2, "kubernetes.io/h2c")
    assert is_h2(EndpointInfo("10.1.0.5", 8081))  # the EndpointSlice's resolved target port


def test_local_timeout_is_deadline_exceeded_other_local_answers_follow_the_table() -> None:
    assert grpc.local_status(504) == grpc.DEADLINE_EXCEEDED
    assert grpc.local_status(503) == grpc.UNAVAILABLE
    assert dict(grpc.trailers_only(504, b"upstream request timeout"))[b"grpc-status"] == b"4"
