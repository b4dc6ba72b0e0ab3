"""The ingress gateway's cores and its HTTPS listener over loopback (no cluster).

Certificates are generated here; nothing is read from disk.
"""

from __future__ import annotations

import datetime
import random
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import ConfigError
from deploy.local import echo
from tests.unit.waypoint_helpers import Client, Reply
from waypoint.app import Options
from waypoint.clusters import EndpointSpec, static_endpoints
from waypoint.ingress import (
    CertificateSet,
    HostIndex,
    Ingress,
    IngressProxy,
    ingress_routes,
    listen,
    listeners_of,
    tls_pair,
)
from waypoint.proxy import RouterState
from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.match import Request
from waypoint.routing.match import route as route_request
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import translate
from waypoint.upstream import EndpointInfo, TcpTransport

GATEWAY = {
    "gatewayClassName": "pyambient",
    "listeners": [
        {"name": "http", "port": 8080, "protocol": "HTTP"},
        {"name": "https", "port": 8443, "protocol": "HTTPS",
         "tls": {"certificateRefs": [{"name": "shop-cert"}, {"name": "api-cert"}]}},
        {"name": "tcp", "port": 9000, "protocol": "TCP"},
    ],
}


def route(name: str, hostnames: list[str], backend: str, *, section: str | None = None,
          namespace: str = "edge", gateway: str = "gw") -> ApiObject:
    parent: dict[str, object] = {"name": gateway}
    if section is not None:
        parent["sectionName"] = section
    return ApiObject(kind="HTTPRoute", namespace=namespace, name=name, spec={
        "parentRefs": [parent], "hostnames": hostnames,
        "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]})


def test_listeners_of_keeps_http_and_https_and_says_what_it_skips() -> None:
    listeners, issues = listeners_of(GATEWAY, "edge")
    assert [(x.name, x.port, x.protocol) for x in listeners] == [
        ("http", 8080, "HTTP"), ("https", 8443, "HTTPS")]
    assert listeners[1].certificates == (("edge", "shop-cert"), ("edge", "api-cert"))
    assert any("TCP" in i for i in issues)
    _, issues = listeners_of({**GATEWAY, "gatewayClassName": "istio-waypoint"}, "edge")
    assert "not an ingress class" in issues[0]
    bad = {"gatewayClassName": "istio", "listeners": [
        {"name": "s", "port": 443, "protocol": "HTTPS", "tls": {}}]}
    assert listeners_of(bad, "edge") == ([], ["spec.listeners[0]: an HTTPS listener needs "
                                              "tls.certificateRefs"])


def test_host_index_exact_then_longest_wildcard_then_any() -> None:
    index = HostIndex()
    index.add("*", 80, "any")
    index.add("*.example.com", 80, "wide")
    index.add("*.api.example.com", 80, "narrow")
    index.add("shop.example.com", 80, "shop")
    assert index.resolve("Shop.Example.com:80", 80) == "shop"
    assert index.resolve("v1.api.example.com", 80) == "narrow"
    assert index.resolve("www.example.com", 80) == "wide"
    assert index.resolve("example.com", 80) == "any"
    assert index.resolve("shop.example.com", 443) is None


def _table(routes: list[ApiObject]) -> tuple[RouteTable, HostIndex]:
    listeners, _ = listeners_of(GATEWAY, "edge")
    result = ingress_routes("edge", "gw", listeners, routes)
    backends = [ServiceInfo(name=n, namespace="edge", ports=(ServicePortInfo(port=80),),
                            vips=(vip,)) for n, vip in (("shop", "10.96.0.10"),
                                                         ("api", "10.96.0.11"))]
    table = translate([*result.services, *backends], result.objects, served=result.served,
                      home_namespace="edge")
    assert not [i for i in table.issues if i.severity == "error"], table.issues
    return table, result.hosts


def test_routes_attach_by_gateway_parent_hostname_and_section() -> None:
    _, hosts = _table([
        route("shop", ["shop.example.com"], "shop"),
        route("api", ["*.api.example.com"], "api", section="https"),
        route("other-gateway", ["x.example.com"], "shop", gateway="elsewhere"),
        route("other-ns", ["y.example.com"], "shop", namespace="team"),  # from: Same
    ])
    assert hosts.resolve("shop.example.com", 8080) is not None
    assert hosts.resolve("shop.example.com", 8443) is not None
    assert hosts.resolve("v1.api.example.com", 8443) is not None
    assert hosts.resolve("v1.api.example.com", 8080) is None  # sectionName: https only
    assert hosts.resolve("x.example.com", 8080) is None
    assert hosts.resolve("y.example.com", 8080) is None


def _cert(names: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tls_pair_needs_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"tls\.crt and tls\.key"):
        tls_pair({"data": {"tls.crt": "AAAA"}})


@pytest.fixture
async def ingress(nursery: trio.Nursery) -> AsyncIterator[tuple[int, dict[str, bytes]]]:
    """An Ingress serving the HTTPS listener on loopback, backends are echo servers."""
    ports: dict[str, int] = {}
    for name in ("shop", "api"):
        server = echo.Server(echo.Identity(pod=f"{name}-pod", namespace="edge",
                                           service_account=name, node="local"))
        (ports[name],) = await nursery.start(echo.serve, [0], server, "127.0.0.1")
    shop, api = _cert(["shop.example.com"]), _cert(["*.api.example.com"])
    gw = Ingress(Options(name="gw", namespace="edge", access_log=False),
                 transport=TcpTransport())
    listeners, _ = listeners_of(GATEWAY, "edge")
    gw.listeners = listeners
    gw.certs = {"https": CertificateSet([shop, api])}
    table, hosts = _table([route("shop", ["shop.example.com"], "shop"),
                           route("api", ["*.api.example.com"], "api")])
    endpoints = {("edge", n, 80): [EndpointSpec(EndpointInfo("127.0.0.1", p), workload=n)]
                 for n, p in ports.items()}
    await gw.clusters.update(table, static_endpoints(endpoints))
    proxy = gw.proxy
    assert isinstance(proxy, IngressProxy)
    proxy.state = RouterState(table, gw.clusters, gw.options.gateway)
    proxy.hosts = hosts
    sock = listen(0, "127.0.0.1")
    port = sock.getsockname()[1]
    https = next(x for x in listeners if x.name == "https")
    # The listener port in the route table is the Gateway's (8443), whatever we bound.
    nursery.start_soon(gw.serve_listener, https, sock)
    yield port, {"shop": shop[0], "api": api[0]}


async def _get(port: int, sni: str, ca: bytes, path: str = "/", *,
               check_hostname: bool = True) -> tuple[str, Reply]:
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.check_hostname = check_hostname
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=sni)
    await tls.do_handshake()
    cert = tls.getpeercert()
    assert cert is not None
    names = [v for k, v in cert["subjectAltName"]]
    reply = await Client(tls).request(path, host=sni)
    await tls.aclose()
    return str(names[0]), reply


async def test_https_with_sni_picks_the_certificate_and_the_route(
        ingress: tuple[int, dict[str, bytes]]) -> None:
    port, cas = ingress
    name, reply = await _get(port, "shop.example.com", cas["shop"])
    assert name == "shop.example.com"
    assert reply.status == 200 and b'"shop-pod"' in reply.body
    name, reply = await _get(port, "v2.api.example.com", cas["api"])
    assert name == "*.api.example.com"
    assert reply.status == 200 and b'"api-pod"' in reply.body
    _, reply = await _get(port, "shop.example.com", cas["shop"], "/x")
    assert reply.status == 200
    # A host no route names: the certificate is the listener's first, the answer 404.
    name, reply = await _get(port, "nobody.example.com", cas["shop"], check_hostname=False)
    assert name == "shop.example.com" and reply.status == 404


def test_virtual_service_bound_by_gateways_routes_its_hosts() -> None:
    vs = ApiObject(kind="VirtualService", namespace="edge", name="shop-vs", spec={
        "hosts": ["vs.example.com"], "gateways": ["edge/gw"],
        "http": [{"match": [{"uri": {"prefix": "/api"}, "gateways": ["edge/gw"]}],
                  "route": [{"destination": {"host": "api", "port": {"number": 80}}}]},
                 {"match": [{"uri": {"prefix": "/other"}, "gateways": ["elsewhere"]}],
                  "route": [{"destination": {"host": "api", "port": {"number": 80}}}]},
                 {"route": [{"destination": {"host": "shop", "port": {"number": 80}}}]}]})
    mesh_only = ApiObject(kind="VirtualService", namespace="edge", name="mesh-vs", spec={
        "hosts": ["mesh.example.com"],
        "http": [{"route": [{"destination": {"host": "shop"}}]}]})
    table, hosts = _table([vs, mesh_only])
    assert hosts.resolve("mesh.example.com", 8080) is None
    alias = hosts.resolve("vs.example.com", 8443)
    assert alias is not None and hosts.resolve("vs.example.com", 8080) == alias
    def backend(path: str) -> str | None:
        decision = route_request(table, Request(method="GET", authority="vs.example.com", path=path,
                                        port=8443, destination=alias), random.Random(0))
        return decision.cluster.service_name if decision.cluster is not None else None

    assert backend("/api/x") == "api"
    assert backend("/other") == "shop"  # that match is for another gateway
    assert backend("/") == "shop"
