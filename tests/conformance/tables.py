"""Load the conformance case tables (``cases/*.yaml``) and check outcomes against expectations.

A table file holds route objects (Kubernetes YAML), optionally the services
they address (default: the Gateway API mesh suite's ``echo``, ``echo-v1..3``
in ``gateway-conformance-mesh`` with ports 80 and 8080), and cases of the
shape of the Gateway API conformance suite's ``ExpectedResponse``::

    request:  {method, host, path, headers, destination, source_labels}
    backend_response_headers: {...}          # what the backend answers with
    expected:
      status                                 # default 200
      backend, subset                        # service (and subset) that gets the request
      path, host                             # as the backend sees them (after rewrites)
      request_headers / absent_request_headers
      response_headers / absent_response_headers
      redirect: {scheme, host, port, path, query}   # parts of Location; unset = request's
      body                                   # direct responses
      route_name                             # rule identity (metrics, access log)
      mirrored_to: [{backend, subset, host, percent}]
      distribution: {backend or backend/subset or status: share}, requests, tolerance

:func:`check` compares an :class:`Observation` (what happened to one request:
built from the route engine here, from the wire in the waypoint's integration
tests later) with a case, so both runners share one definition of "passes".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

CASES_DIR = Path(__file__).parent / "cases"
MESH_NAMESPACE = "gateway-conformance-mesh"
DEFAULT_SERVICES: tuple[dict[str, Any], ...] = tuple(
    {"name": name, "namespace": MESH_NAMESPACE, "ports": [80, 8080], "vips": [f"10.96.0.{i + 1}"]}
    for i, name in enumerate(("echo", "echo-v1", "echo-v2", "echo-v3")))


@dataclass(frozen=True)
class Table:
    """One file: its objects, services and cases."""

    name: str
    path: Path
    objects: tuple[dict[str, Any], ...]
    services: tuple[dict[str, Any], ...]
    home_namespace: str
    cases: tuple[Case, ...]
    expect_issues: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    table: str
    index: int
    name: str
    request: Mapping[str, Any]
    expected: Mapping[str, Any]
    backend_response_headers: Mapping[str, str]

    @property
    def id(self) -> str:
        return f"{self.table}[{self.index}]" + (f" {self.name}" if self.name else "")

    @property
    def samples(self) -> int:
        """How many requests the case needs (distributions need many)."""
        return int(self.expected.get("requests", 1))


@dataclass
class Observation:
    """What one request came to: status, who got it and how, what the client saw."""

    status: int
    backend: str | None = None
    subset: str | None = None
    path: str | None = None
    host: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    location: str | None = None
    body: bytes = b""
    mirrors: list[tuple[str, str | None, str]] = field(default_factory=list)
    route_name: str | None = None


def load_tables(directory: Path = CASES_DIR) -> list[Table]:
    tables = []
    for path in sorted(directory.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        name = doc["name"]
        cases = tuple(
            Case(table=name, index=i, name=c.get("name", ""), request=c["request"],
                 expected=c["expected"],
                 backend_response_headers=c.get("backend_response_headers", {}))
            for i, c in enumerate(doc["cases"]))
        tables.append(Table(name=name, path=path, objects=tuple(doc["objects"]),
                            services=tuple(doc.get("services", DEFAULT_SERVICES)),
                            home_namespace=doc.get("home_namespace", MESH_NAMESPACE),
                            cases=cases, expect_issues=tuple(doc.get("expect_issues", ()))))
    return tables


def _lower(headers: Mapping[str, Any]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def check(case: Case, observations: list[Observation]) -> list[str]:
    """Differences between the observations of ``case`` and its expectations (empty = pass)."""
    exp = case.expected
    if "distribution" in exp:
        return _check_distribution(case, observations)
    problems = _check_one(case, observations[0])
    if any("percent" in m for m in exp.get("mirrored_to", ())):
        problems += _check_mirror_share(case, observations)
    return problems


def _check_one(case: Case, obs: Observation) -> list[str]:
    exp = case.expected
    problems: list[str] = []
    want_status = exp.get("status", 200)
    if obs.status != want_status:
        problems.append(f"status {obs.status}, expected {want_status}")
    if "backend" in exp and obs.backend != exp["backend"]:
        problems.append(f"backend {obs.backend!r}, expected {exp['backend']!r}")
    if "subset" in exp and obs.subset != exp["subset"]:
        problems.append(f"subset {obs.subset!r}, expected {exp['subset']!r}")
    if "path" in exp and obs.path != exp["path"]:
        problems.append(f"backend saw path {obs.path!r}, expected {exp['path']!r}")
    if "host" in exp and obs.host != exp["host"]:
        problems.append(f"backend saw host {obs.host!r}, expected {exp['host']!r}")
    problems += _check_headers("request", obs.request_headers, exp.get("request_headers", {}),
                               exp.get("absent_request_headers", ()))
    problems += _check_headers("response", obs.response_headers,
                               exp.get("response_headers", {}),
                               exp.get("absent_response_headers", ()))
    if "redirect" in exp:
        problems += _check_redirect(case, obs)
    if "route_name" in exp and obs.route_name != exp["route_name"]:
        problems.append(f"route {obs.route_name!r}, expected {exp['route_name']!r}")
    if "body" in exp and obs.body != str(exp["body"]).encode():
        problems.append(f"body {obs.body!r}, expected {exp['body']!r}")
    if "mirrored_to" in exp and not any("percent" in m for m in exp["mirrored_to"]):
        want = exp["mirrored_to"]
        got = obs.mirrors
        if len(got) != len(want):
            problems.append(f"mirrored to {got}, expected {want}")
        for m, (backend, subset, host) in zip(want, got, strict=False):
            if m["backend"] != backend or m.get("subset", subset) != subset or (
                    "host" in m and m["host"] != host):
                problems.append(f"mirror {(backend, subset, host)}, expected {m}")
    return problems


def _check_headers(which: str, got: Mapping[str, str], want: Mapping[str, Any],
                   absent: Any) -> list[str]:
    problems = []
    for name, value in _lower(want).items():
        if got.get(name) != value:
            problems.append(f"{which} header {name}: {got.get(name)!r}, expected {value!r}")
    for name in absent:
        if name.lower() in got:
            problems.append(f"{which} header {name} present, expected absent")
    return problems


def _check_redirect(case: Case, obs: Observation) -> list[str]:
    if obs.location is None:
        return ["no Location header"]
    want = case.expected["redirect"]
    loc = urlsplit(obs.location)
    req_host = str(case.request.get("host", "echo")).split(":")[0]
    req_path = str(case.request.get("path", "/")).partition("?")[0]
    problems = []
    for part, got, default in (("scheme", loc.scheme, "http"), ("host", loc.hostname, req_host),
                               ("path", loc.path, req_path),
                               ("query", loc.query, None)):
        expected = want.get(part, default)
        if expected is not None and got != expected:
            problems.append(f"Location {part} {got!r}, expected {expected!r} ({obs.location})")
    if "port" in want:
        got_port = str(loc.port) if loc.port is not None else ""
        if got_port != str(want["port"]):
            problems.append(f"Location port {got_port!r}, expected {want['port']!r} "
                            f"({obs.location})")
    return problems


def _share_ok(count: int, total: int, share: float, tolerance: float) -> bool:
    # The table's tolerance, widened to five standard deviations of the binomial draw
    # where that is larger: 70/30 over 1,000 requests has sigma 1.45 %, so a 5 % bound
    # alone is 3.4 sigma and failed a correct split about once in 1,700 checks (one
    # suite run drew 755/1000 against 704 +- 16 over eight reruns).  A wrong split
    # (50/50 for 70/30) is still 14 sigma out.
    sigma = math.sqrt(share * (1 - share) / total)
    return abs(count / total - share) <= max(tolerance, 5 * sigma) + 1e-9


def _check_distribution(case: Case, observations: list[Observation]) -> list[str]:
    exp = case.expected
    counts: dict[str, int] = {}
    for obs in observations:
        if obs.backend is not None and obs.status == 200:
            key = obs.backend if obs.subset is None else f"{obs.backend}/{obs.subset}"
        else:
            key = str(obs.status)
        counts[key] = counts.get(key, 0) + 1
    total = len(observations)
    tolerance = float(exp.get("tolerance", 0.05))
    problems = []
    for key in set(counts) | {str(k) for k in exp["distribution"]}:
        share = float(exp["distribution"].get(key, 0.0))
        if not _share_ok(counts.get(key, 0), total, share, tolerance):
            problems.append(f"{key}: {counts.get(key, 0)}/{total}, expected share {share}")
    return problems


def _check_mirror_share(case: Case, observations: list[Observation]) -> list[str]:
    exp = case.expected
    total = len(observations)
    tolerance = float(exp.get("tolerance", 0.05))
    problems = []
    for m in exp["mirrored_to"]:
        count = sum(1 for o in observations if any(b == m["backend"] for b, _s, _h in o.mirrors))
        share = float(m.get("percent", 100)) / 100
        if not _share_ok(count, total, share, tolerance):
            problems.append(f"mirrored to {m['backend']} {count}/{total}, expected share {share}")
    return problems
