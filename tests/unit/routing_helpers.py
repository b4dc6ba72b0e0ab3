"""Small builders shared by the routing unit tests."""

from __future__ import annotations

import random
from typing import Any

from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.match import Request, RouteDecision, route
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import translate

NS = "default"


def svc(name: str, ns: str = NS, ports: tuple[int, ...] = (80,),
        vips: tuple[str, ...] = ()) -> ServiceInfo:
    return ServiceInfo(name=name, namespace=ns,
                       ports=tuple(ServicePortInfo(port=p, name=f"p{p}") for p in ports),
                       vips=vips)


def httproute(name: str, rules: list[dict[str, Any]], parent: str = "echo", ns: str = NS,
              created: str = "", **parent_extra: Any) -> ApiObject:
    return ApiObject(kind="HTTPRoute", namespace=ns, name=name, creation_timestamp=created,
                     spec={"parentRefs": [{"group": "", "kind": "Service", "name": parent,
                                           **parent_extra}],
                           "rules": rules})


def obj(kind: str, name: str, spec: dict[str, Any], ns: str = NS,
        created: str = "") -> ApiObject:
    return ApiObject(kind=kind, namespace=ns, name=name, spec=spec, creation_timestamp=created)


def backend(name: str, port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, **extra}


SERVICES = [svc("echo", ports=(80, 8080), vips=("10.0.0.1",)), svc("v1"), svc("v2"), svc("v3")]


def table(*objects: ApiObject, services: list[ServiceInfo] | None = None) -> RouteTable:
    return translate(services if services is not None else SERVICES, list(objects),
                     home_namespace=NS)


def send(t: RouteTable, path: str = "/", host: str = "echo", method: str = "GET",
         rng: random.Random | None = None, **extra: Any) -> RouteDecision:
    headers = {k.lower(): v for k, v in extra.pop("headers", {}).items()}
    return route(t, Request(method=method, authority=host, path=path, headers=headers, **extra),
                 rng or random.Random(0))


def backend_of(decision: RouteDecision) -> str | None:
    return decision.cluster.service_name if decision.cluster is not None else None
