"""Run every conformance case table against the route engine (no sockets).

The same tables are meant to run over the wire against a waypoint later; here
the "backend" is simulated from the route decision: it sees the request with
the decision's header mutations, path and host applied, and answers with the
case's ``backend_response_headers`` passed through the response mutations.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.conformance.tables import Case, Observation, Table, check, load_tables
from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.filters import apply_header_ops
from waypoint.routing.match import Outcome, Request, route
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import translate

TABLES = load_tables()
CASES = [case for table in TABLES for case in table.cases]
_BUILT: dict[str, RouteTable] = {}


def _service(doc: dict[str, Any]) -> ServiceInfo:
    return ServiceInfo(name=doc["name"], namespace=doc["namespace"],
                       ports=tuple(ServicePortInfo(port=p) for p in doc["ports"]),
                       vips=tuple(doc.get("vips", ())))


def _object(doc: dict[str, Any]) -> ApiObject:
    meta = doc["metadata"]
    return ApiObject(kind=doc["kind"], namespace=meta["namespace"], name=meta["name"],
                     spec=doc["spec"], creation_timestamp=meta.get("creationTimestamp", ""))


def build(table: Table) -> RouteTable:
    if table.name not in _BUILT:
        _BUILT[table.name] = translate([_service(s) for s in table.services],
                                       [_object(o) for o in table.objects],
                                       home_namespace=table.home_namespace)
    return _BUILT[table.name]


def observe(table: RouteTable, case: Case, rng: random.Random) -> Observation:
    req = case.request
    host = str(req.get("host", "echo"))
    headers = {str(k).lower(): str(v) for k, v in req.get("headers", {}).items()}
    request = Request(method=str(req.get("method", "GET")), authority=host,
                      path=str(req.get("path", "/")), headers=headers,
                      destination=req.get("destination"),
                      source_labels=req.get("source_labels", {}))
    decision = route(table, request, rng)
    response = {str(k).lower(): str(v) for k, v in case.backend_response_headers.items()}
    if decision.outcome is not Outcome.FORWARD:
        assert decision.status is not None
        apply_header_ops(response, decision.response_headers)
        return Observation(status=decision.status, location=decision.location,
                           body=decision.body, response_headers=response,
                           route_name=decision.route_name)
    assert decision.cluster is not None
    apply_header_ops(headers, decision.request_headers)
    apply_header_ops(response, decision.response_headers)
    return Observation(
        status=200, backend=decision.cluster.service_name, subset=decision.cluster.subset,
        path=decision.path or request.path, host=decision.authority or host,
        request_headers=headers, response_headers=response,
        mirrors=[(m.cluster.service_name, m.cluster.subset, m.authority)
                 for m in decision.mirrors], route_name=decision.route_name)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_table_translates_with_only_the_expected_issues(table: Table) -> None:
    issues = [i for i in build(table).issues if i.severity == "error"]
    unexpected = [str(i) for i in issues
                  if not any(word in str(i) for word in table.expect_issues)]
    assert unexpected == []
    for word in table.expect_issues:
        assert any(word in str(i) for i in issues), f"expected an issue mentioning {word!r}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(case: Case) -> None:
    table = next(t for t in TABLES if t.name == case.table)
    rng = random.Random(f"{case.id}")
    observations = [observe(build(table), case, rng) for _ in range(case.samples)]
    assert check(case, observations) == []
