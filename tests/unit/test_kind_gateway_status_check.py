"""The kind e2e's check of the waypoint's Gateway status (tests/kind/support.py), offline:
it accepts what the waypoint writes (waypoint/gateway_status.py) and names what is wrong
with a status that is missing, stale or not programmed."""

from __future__ import annotations

from typing import Any

from common.kube import Gateway, Service
from tests.kind.support import gateway_status_problems
from waypoint.gateway_status import gateway_status

NOW = "2026-11-25T10:00:00Z"
IP = "10.96.0.20"


def gateway(generation: int, status: dict[str, Any] | None = None) -> Gateway:
    return Gateway.model_validate({
        "metadata": {"name": "waypoint", "namespace": "mesh-e2e", "generation": generation},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        "status": status or {}})


def service(with_ip: bool = True) -> Service:
    spec: dict[str, Any] = {"ports": [{"port": 15008}]}
    if with_ip:
        spec["clusterIP"] = IP
    return Service.model_validate({"metadata": {"name": "waypoint", "namespace": "mesh-e2e"},
                                   "spec": spec})


def written(generation: int, svc: Service | None) -> dict[str, Any]:
    """The Gateway as stored after the waypoint wrote its status for ``generation``."""
    status = gateway_status(gateway(generation), svc, True, NOW)
    assert status is not None
    return gateway(generation, status).model_dump(by_alias=True, mode="json")


def test_accepts_the_status_a_ready_waypoint_writes() -> None:
    assert gateway_status_problems(written(2, service()), [IP]) == []


def test_a_gateway_without_status_is_reported() -> None:
    raw = gateway(1).model_dump(by_alias=True, mode="json")
    problems = gateway_status_problems(raw, [IP])
    assert "no Accepted condition" in problems and "no Programmed condition" in problems


def test_a_status_for_an_older_generation_is_reported() -> None:
    raw = written(2, service())
    raw["metadata"]["generation"] = 3
    problems = gateway_status_problems(raw, [IP])
    assert any(p.startswith("Programmed=True for generation 2 (Gateway at 3)")
               for p in problems), problems


def test_a_gateway_without_its_service_is_not_programmed() -> None:
    problems = gateway_status_problems(written(1, None), [IP])
    assert any(p.startswith("Programmed=False") and "AddressNotAssigned" in p
               for p in problems), problems
    assert any(p.startswith("addresses []") for p in problems), problems
    assert any(p.startswith("listener 'mesh' not Programmed=True") for p in problems)


def test_addresses_must_be_the_services_cluster_ips() -> None:
    problems = gateway_status_problems(written(1, service()), ["10.96.0.99"])
    assert problems == [f"addresses ['{IP}'], want the Service's cluster IPs ['10.96.0.99']"]
