"""Which Service a route host is, for policies whose targetRefs name a Service."""

from __future__ import annotations

from common.authz.model import ServiceRef
from waypoint.proxy import service_ref_of
from waypoint.routing.model import RoutesKind, ServiceRoutes


def _routes(host: str, namespace: str = "shop") -> ServiceRoutes:
    return ServiceRoutes(kind=RoutesKind.DEFAULT, host=host, port=80,
                         service_namespace=namespace)


def test_a_service_host_names_its_service() -> None:
    assert service_ref_of(_routes("api.shop.svc.cluster.local")) == ServiceRef("shop", "api")


def test_a_service_entry_host_is_not_taken_for_a_service_of_its_first_label() -> None:
    # A policy for Service shop/api must not apply to the external api.example.com.
    ref = service_ref_of(_routes("api.example.com"))
    assert ref != ServiceRef("shop", "api")
    assert ref == ServiceRef("shop", "api.example.com")


def test_a_host_whose_second_label_is_another_namespace_is_not_a_service() -> None:
    assert service_ref_of(_routes("api.other.svc.cluster.local")).name != "api"
