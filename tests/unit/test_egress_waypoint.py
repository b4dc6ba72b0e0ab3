"""Egress through a waypoint, sans I/O: which ServiceEntry traffic ztunnel sends to the
waypoint, STATIC endpoints for ztunnel's pass-through, entry hosts as route targets of the
waypoint, and the endpoints (with TLS origination) its clusters dial."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import trio
import trio.testing

from common.kube import DestinationRule, VirtualService
from common.kube.objects import KubeObject
from common.model import Snapshot, WaypointRef
from common.service_entries import entry_index
from common.translate import translate
from tests.unit.mesh_objects import namespace, pod, waypoint_gateway, waypoint_pod
from waypoint.clusters import Clusters, snapshot_endpoints
from waypoint.egress import ExternalEndpoint
from waypoint.routing.model import RouteTable
from waypoint.routing.snapshot import update_from_snapshot
from waypoint.routing.translate import RouteTableStore
from waypoint.tls_origination import Origination
from waypoint.upstream import TcpTransport, UpstreamConnection
from ztunnel.decide import Passthrough, ViaWaypoint, decide_outbound

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
WAYPOINT = WaypointRef("demo", "waypoint")


def entry(name: str, spec: dict[str, Any], *, ns: str = "demo",
          labels: dict[str, str] | None = None, created: str = "2026-01-01T00:00:00Z"
          ) -> KubeObject:
    return KubeObject.model_validate({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {},
                     "resourceVersion": "1", "creationTimestamp": created},
        "spec": {"location": "MESH_EXTERNAL", **spec}})


API = {"hosts": ["api.example.com"], "resolution": "STATIC",
       "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8443},
                 {"number": 443, "name": "https", "protocol": "HTTPS"}],
       "endpoints": [{"address": "192.0.2.10"}, {"address": "192.0.2.11",
                                                 "ports": {"http": 9443}}]}
USE = {"istio.io/use-waypoint": "waypoint"}


def mesh(*objects: Any, ns_labels: dict[str, str] | None = None) -> Snapshot:
    return translate([namespace("demo", **{**AMBIENT, **(ns_labels or {})}),
                      pod("client", ip="10.1.0.1"), waypoint_gateway(),
                      waypoint_pod("waypoint-0", ip="10.1.9.1"), *objects])


def vip(snap: Snapshot, host: str) -> str:
    return entry_index(snap).by_host[host].addresses[0]


# --- ztunnel -------------------------------------------------------------------------------


def test_an_entry_labelled_with_a_waypoint_is_sent_there_by_its_address() -> None:
    snap = mesh(entry("api", API, labels=USE))
    address = vip(snap, "api.example.com")
    decision = decide_outbound(snap, snap.workloads_by_ip["10.1.0.1"], address, 80,
                               random.Random(0))
    assert isinstance(decision, ViaWaypoint)
    assert decision.hbone_addr == ("10.1.9.1", 15008)
    assert decision.authority == f"{address}:80"
    assert decision.waypoint.ref == WAYPOINT


def test_the_namespace_label_applies_and_none_on_the_entry_opts_out() -> None:
    snap = mesh(entry("api", API), entry("own", {**API, "hosts": ["own.example.com"]},
                                         labels={"istio.io/use-waypoint": "none"}),
                ns_labels=USE)
    client = snap.workloads_by_ip["10.1.0.1"]
    rng = random.Random(0)
    assert isinstance(decide_outbound(snap, client, vip(snap, "api.example.com"), 80, rng),
                      ViaWaypoint)
    assert isinstance(decide_outbound(snap, client, vip(snap, "own.example.com"), 80, rng),
                      Passthrough)


def test_the_waypoints_own_traffic_and_tls_ports_go_straight_to_static_endpoints() -> None:
    snap = mesh(entry("api", API, labels=USE))
    address = vip(snap, "api.example.com")
    rng = random.Random(3)
    waypoint = snap.workloads_by_ip["10.1.9.1"]
    seen: Counter[tuple[str, int]] = Counter()
    for _ in range(200):
        decision = decide_outbound(snap, waypoint, address, 80, rng)
        assert isinstance(decision, Passthrough) and decision.resolve is None
        seen[decision.addr] += 1
    # port 80 is named http: endpoint 11 maps it to 9443, endpoint 10 uses targetPort 8443
    assert set(seen) == {("192.0.2.10", 8443), ("192.0.2.11", 9443)}
    assert min(seen.values()) > 60
    # HTTPS carries the client's own TLS, which the waypoint cannot route: ztunnel passes it.
    tls = decide_outbound(snap, snap.workloads_by_ip["10.1.0.1"], address, 443, rng)
    assert isinstance(tls, Passthrough) and tls.addr[1] == 443
    assert tls.addr[0] in ("192.0.2.10", "192.0.2.11")


def test_static_endpoint_weights_and_dns_names_in_endpoints() -> None:
    spec = {"hosts": ["w.example.com"], "resolution": "STATIC",
            "ports": [{"number": 7000, "name": "tcp", "protocol": "TCP"}],
            "endpoints": [{"address": "192.0.2.1", "weight": 9}, {"address": "192.0.2.2"}]}
    named = {"hosts": ["n.example.com"], "resolution": "DNS",
             "ports": [{"number": 7000, "name": "tcp", "protocol": "TCP"}],
             "endpoints": [{"address": "backend.example.net", "ports": {"tcp": 7001}}]}
    snap = mesh(entry("w", spec), entry("n", named))
    client = snap.workloads_by_ip["10.1.0.1"]
    rng = random.Random(5)
    picks: Counter[tuple[str, int]] = Counter()
    for _ in range(1000):
        decision = decide_outbound(snap, client, vip(snap, "w.example.com"), 7000, rng)
        assert isinstance(decision, Passthrough)
        picks[decision.addr] += 1
    assert 0.85 < picks[("192.0.2.1", 7000)] / 1000 < 0.95
    decision = decide_outbound(snap, client, vip(snap, "n.example.com"), 7000, rng)
    assert isinstance(decision, Passthrough)
    assert decision.resolve == "backend.example.net" and decision.addr[1] == 7001


def test_an_undeclared_port_of_an_entry_is_not_the_entrys() -> None:
    snap = mesh(entry("api", API, labels=USE))
    decision = decide_outbound(snap, snap.workloads_by_ip["10.1.0.1"],
                               vip(snap, "api.example.com"), 8080, random.Random(0))
    assert isinstance(decision, Passthrough)
    assert decision.addr == (vip(snap, "api.example.com"), 8080)


def test_a_missing_waypoint_leaves_the_entry_at_l4() -> None:
    snap = mesh(entry("api", API, labels={"istio.io/use-waypoint": "nope"}))
    decision = decide_outbound(snap, snap.workloads_by_ip["10.1.0.1"],
                               vip(snap, "api.example.com"), 80, random.Random(0))
    assert isinstance(decision, Passthrough)


# --- the waypoint --------------------------------------------------------------------------


def _table(snap: Snapshot, waypoint: WaypointRef = WAYPOINT) -> RouteTable:
    return update_from_snapshot(RouteTableStore(), snap, waypoint)


def dr(spec: dict[str, Any]) -> DestinationRule:
    return DestinationRule.model_validate({
        "metadata": {"name": "api-tls", "namespace": "demo", "resourceVersion": "1"},
        "spec": spec})


def vs(spec: dict[str, Any]) -> VirtualService:
    return VirtualService.model_validate({
        "metadata": {"name": "api", "namespace": "demo", "resourceVersion": "1"},
        "spec": spec})


def test_the_waypoint_routes_an_entry_host_by_name_and_address() -> None:
    snap = mesh(entry("api", API, labels=USE))
    table = _table(snap)
    by_name = table.lookup("api.example.com", 80)
    assert by_name is not None and by_name is table.lookup(vip(snap, "api.example.com"), 80)
    assert table.lookup("API.example.com", 80) is by_name
    assert ("api", 80) not in table.by_destination  # no short names for entry hosts
    assert "outbound|80||api.example.com" in table.clusters
    assert not table.issues, table.issues
    # Another waypoint does not serve it.
    other = _table(snap, WaypointRef("demo", "other"))
    assert other.lookup("api.example.com", 80) is None


def test_a_virtual_service_on_an_entry_host_applies_its_retries() -> None:
    snap = mesh(entry("api", API, labels=USE), vs({
        "hosts": ["api.example.com"],
        "http": [{"route": [{"destination": {"host": "api.example.com"}}],
                  "retries": {"attempts": 3, "retryOn": "503"}}]}))
    table = _table(snap)
    routes = table.lookup("api.example.com", 80)
    assert routes is not None
    rule = routes.rest[0].rule
    assert rule.source.kind == "VirtualService"
    assert rule.resilience.retries.attempts == 3
    assert 503 in rule.resilience.retries.retriable_status_codes
    assert not table.issues, table.issues


def test_static_endpoints_of_an_entry_cluster_with_tls_origination_per_port() -> None:
    snap = mesh(entry("api", API, labels=USE), dr({
        "host": "api.example.com",
        "trafficPolicy": {"portLevelSettings": [{
            "port": {"number": 80},
            "tls": {"mode": "SIMPLE", "sni": "edge.example.com",
                    "caCertificates": "/etc/egress/ca.pem"}}]}}))
    table = _table(snap)
    assert not table.issues, table.issues  # sni and caCertificates are supported now
    cluster = table.clusters["outbound|80||api.example.com"]
    assert cluster.tls_mode == "SIMPLE"
    specs = snapshot_endpoints(snap, cluster)
    infos = sorted((s.info for s in specs), key=lambda i: i.ip)
    want = Origination(sni="edge.example.com", ca_file="/etc/egress/ca.pem")
    assert infos == [ExternalEndpoint("192.0.2.10", 8443, origination=want),
                     ExternalEndpoint("192.0.2.11", 9443, origination=want)]
    assert all(not i.hbone for i in infos)
    https = snapshot_endpoints(snap, table.clusters["outbound|443||api.example.com"])
    assert {s.info.port for s in https} == {443}
    assert all(isinstance(s.info, ExternalEndpoint) and s.info.origination is None
               for s in https)


def test_dns_entries_resolve_their_host_at_the_waypoint_with_tls_from_the_top_level() -> None:
    spec = {"hosts": ["dns.example.com"], "resolution": "DNS",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443}]}
    snap = mesh(entry("dns", spec, labels=USE), dr({
        "host": "*.example.com", "trafficPolicy": {"tls": {"mode": "SIMPLE",
                                                           "insecureSkipVerify": True}}}))
    table = _table(snap)
    (spec_,) = snapshot_endpoints(snap, table.clusters["outbound|80||dns.example.com"])
    assert spec_.info == ExternalEndpoint("dns.example.com", 443, resolve=True,
                                          origination=Origination("dns.example.com",
                                                                  insecure=True))


def test_resolution_none_dials_the_entrys_address() -> None:
    spec = {"hosts": ["raw.example.com"], "resolution": "NONE", "addresses": ["198.51.100.7"],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
    snap = mesh(entry("raw", spec, labels=USE))
    table = _table(snap)
    assert table.lookup("198.51.100.7", 80) is not None
    (spec_,) = snapshot_endpoints(snap, table.clusters["outbound|80||raw.example.com"])
    assert spec_.info == ExternalEndpoint("198.51.100.7", 80)


async def test_idle_connections_do_not_outlive_a_change_of_tls_origination() -> None:
    def with_sni(sni: str) -> Snapshot:
        return mesh(entry("api", API, labels=USE), dr({
            "host": "api.example.com", "trafficPolicy": {"tls": {"mode": "SIMPLE",
                                                                 "sni": sni}}}))
    first = with_sni("one.example.com")
    clusters = Clusters(TcpTransport())
    await clusters.update(_table(first), lambda c: snapshot_endpoints(first, c))
    state = clusters.by_name["outbound|80||api.example.com"]
    spec = state.endpoints["192.0.2.10:8443"]
    host = next(h for h in state.picker.hosts if h.address == spec.address)
    assert state.breaker.try_connection()
    stream, _peer = trio.testing.memory_stream_pair()
    await state.pool.release(UpstreamConnection(stream, host, spec.info), reusable=True)
    assert state.pool.idle_count(spec.address) == 1
    again = with_sni("one.example.com")
    await clusters.update(_table(again), lambda c: snapshot_endpoints(again, c))
    assert state.pool.idle_count(spec.address) == 1  # reached the same way: kept
    changed = with_sni("two.example.com")
    await clusters.update(_table(changed), lambda c: snapshot_endpoints(changed, c))
    assert state.pool.idle_count(spec.address) == 0


def test_a_host_also_named_by_an_entry_elsewhere_routes_to_the_waypoints_own() -> None:
    elsewhere = entry("api", {**API, "endpoints": [{"address": "203.0.113.1"}]}, ns="other",
                      created="2027-01-01T00:00:00Z")
    snap = mesh(namespace("other"), elsewhere, entry("api", API, labels=USE), vs({
        "hosts": ["api.example.com"],
        "http": [{"route": [{"destination": {"host": "api.example.com"}}],
                  "retries": {"attempts": 3, "retryOn": "503"}}]}))
    table = _table(snap)
    routes = table.lookup("api.example.com", 80)
    assert routes is not None and routes.rest[0].rule.source.kind == "VirtualService"
    cluster = table.clusters["outbound|80||api.example.com"]
    assert {s.info.ip for s in snapshot_endpoints(snap, cluster)} == {"192.0.2.10",
                                                                      "192.0.2.11"}
