"""Micro-benchmark of the route table: translation time and microseconds per route decision.

Run: ``.venv/bin/python bench/routing_micro.py [--services N] [--quick]``.  Builds a
mesh of N services, half routed by an HTTPRoute and half by a VirtualService
(11 rules each, 90/10 splits), then times :func:`waypoint.routing.match.route`
for typical requests: CPU time of this process (``time.process_time``, so time spent
descheduled on a busy shared machine does not count), best of 5 runs.
The per-request figures must not grow with N: lookups are dict hits.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.match import Request, route
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import translate


def _objects(n: int) -> list[ApiObject]:
    objects = []
    for i in range(n):
        a, b = f"svc{(i + 1) % n}", f"svc{(i + 2) % n}"
        if i % 2 == 0:
            rules: list[dict[str, Any]] = [
                {"matches": [{"path": {"type": "PathPrefix", "value": f"/api/v{j}"}},
                             {"headers": [{"name": "x-user", "value": f"u{j}"}]}],
                 "backendRefs": [{"name": a, "port": 80, "weight": 90},
                                 {"name": b, "port": 80, "weight": 10}]} for j in range(10)]
            rules.append({"matches": [{"path": {"type": "Exact", "value": "/health"}}],
                          "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier":
                                       {"set": [{"name": "x-a", "value": "b"}]}}],
                          "backendRefs": [{"name": f"svc{i}", "port": 80}]})
            objects.append(ApiObject("HTTPRoute", "ns", f"r{i}", {
                "parentRefs": [{"group": "", "kind": "Service", "name": f"svc{i}"}],
                "rules": rules}))
        else:
            http: list[dict[str, Any]] = [
                {"match": [{"uri": {"prefix": f"/api/v{j}"}}],
                 "route": [{"destination": {"host": a}, "weight": 90},
                           {"destination": {"host": b}, "weight": 10}]} for j in range(10)]
            http.append({"route": [{"destination": {"host": f"svc{i}"}}]})
            objects.append(ApiObject("VirtualService", "ns", f"vs{i}",
                                     {"hosts": [f"svc{i}"], "http": http}))
    return objects


def _best_us(table: RouteTable, request: Request, iterations: int) -> float:
    rng = random.Random(1)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(iterations):
            route(table, request, rng)
        best = min(best, (time.process_time() - start) / iterations)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = args.services
    services = [ServiceInfo(f"svc{i}", "ns", (ServicePortInfo(80),),
                            vips=(f"10.1.{i // 250}.{i % 250}",)) for i in range(n)]
    objects = _objects(n)
    start = time.process_time()
    table = translate(services, objects, home_namespace="ns")
    elapsed = time.process_time() - start
    print(f"translate: {n} services, {n // 2} HTTPRoutes + {n - n // 2} VirtualServices "
          f"(11 rules each): {elapsed:.2f} s ({elapsed / n * 1e3:.2f} ms/object), "
          f"{len(table.issues)} issues")
    gw, vs = "svc2", "svc3"
    requests = {
        "HTTPRoute prefix /api/v7/..., 90/10 split": Request("GET", gw, "/api/v7/items/42?x=1"),
        "HTTPRoute exact /health + header set": Request("GET", gw, "/health"),
        "HTTPRoute header match x-user (10 candidates)": Request("GET", gw, "/",
                                                                 {"x-user": "u9"}),
        "HTTPRoute no match -> 404": Request("GET", gw, "/nothing/here"),
        "VirtualService 8th entry /api/v7": Request("GET", vs, "/api/v7/items"),
        "VirtualService catch-all (11th entry)": Request("GET", vs, "/other"),
        "lookup by VIP": Request("GET", "x", "/api/v1", destination="10.1.0.2"),
        "unknown host -> 404": Request("GET", "nobody", "/"),
    }
    iterations = 2_000 if args.quick else 20_000
    for name, request in requests.items():
        print(f"{name}: {_best_us(table, request, iterations):.2f} us/request")


if __name__ == "__main__":
    main()
