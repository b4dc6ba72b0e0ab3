"""TLS origination at the waypoint: which DestinationRule section applies (pure), and the
egress transport dialling a loopback HTTPS server with a CA of the test's own."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from common.errors import (
    CertificateError,
    ConnectRefusedError,
    HandshakeError,
    KubeApiError,
    NameResolutionError,
)
from common.kube.objects import KubeObject
from tests.unit.egress_helpers import ExternalServer, server_certs
from waypoint.egress import EgressTransport, ExternalEndpoint
from waypoint.tls_origination import ContextCache, Origination, origination_for, tls_section
from waypoint.upstream import EndpointInfo

HOST = "api.example.com"


def rule(name: str, spec: dict[str, Any], created: str = "2026-01-01T00:00:00Z") -> KubeObject:
    return KubeObject.model_validate({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": "demo", "creationTimestamp": created},
        "spec": spec})


def test_port_level_tls_beats_top_level_and_exact_hosts_beat_wildcards() -> None:
    rules = [
        rule("wild", {"host": "*.example.com", "trafficPolicy": {"tls": {
            "mode": "SIMPLE", "sni": "wild"}}}),
        rule("exact", {"host": "api.example.com", "trafficPolicy": {
            "tls": {"mode": "SIMPLE", "sni": "top"},
            "portLevelSettings": [{"port": {"number": 80}, "tls": {
                "mode": "SIMPLE", "sni": "port80", "caCertificates": "/ca.pem"}}]}}),
        rule("newer", {"host": "api.example.com", "trafficPolicy": {"tls": {
            "mode": "SIMPLE", "sni": "newer"}}}, created="2026-02-01T00:00:00Z"),
    ]
    assert origination_for("SIMPLE", rules, "api.example.com", 80) == Origination(
        "port80", "/ca.pem")
    assert origination_for("SIMPLE", rules, "api.example.com", 8080) == Origination("top")
    assert origination_for("SIMPLE", rules, "www.example.com", 80) == Origination("wild")
    assert origination_for("DISABLE", rules, "api.example.com", 80) is None
    assert origination_for(None, rules, "api.example.com", 80) is None
    # The mode may come from a subset the details do not see: defaults, SNI = host.
    assert origination_for("SIMPLE", [], "x.example.org", 80) == Origination("x.example.org")
    assert tls_section([rule("bad", {"host": "api.example.com", "bogus": 1})],
                       "api.example.com", 80) is None


def test_credential_name_names_a_secret_in_the_rules_namespace() -> None:
    rules = [rule("api", {"host": "api.example.com", "trafficPolicy": {"tls": {
        "mode": "SIMPLE", "credentialName": "api-ca", "caCertificates": "/ignored.pem"}}})]
    origination = origination_for("SIMPLE", rules, "api.example.com", 443)
    assert origination == Origination("api.example.com", "/ignored.pem",
                                      credential=("demo", "api-ca"))
    assert origination is not None and origination.ca_source == "Secret demo/api-ca"


class Tcp:
    async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        raise AssertionError("external endpoints must not reach the mesh transport")


async def _request(stream: trio.abc.Stream, host: str) -> bytes:
    """One GET; the response (head and its content-length body)."""
    await stream.send_all(f"GET /hello HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
    await stream.aclose()
    return data


@pytest.fixture
async def https(tmp_path: Path, nursery: trio.Nursery) -> tuple[ExternalServer, int]:
    server = ExternalServer(server_certs(tmp_path / "pki", "api.example.com"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve, listeners[0])
    return server, listeners[0].socket.getsockname()[1]


async def test_tls_is_originated_with_sni_and_verified_against_the_given_ca(
        https: tuple[ExternalServer, int]) -> None:
    server, port = https
    assert server.certs is not None
    transport = EgressTransport(Tcp())
    good = Origination("api.example.com", str(server.certs.ca_file))
    stream = await transport.connect(ExternalEndpoint("127.0.0.1", port, origination=good), 5)
    reply = await _request(stream, "api.example.com")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert reply.endswith(b"/hello api.example.com api.example.com")
    assert server.sni == ["api.example.com"]


async def test_a_wrong_name_or_an_unknown_ca_fails_the_handshake_with_advice(
        https: tuple[ExternalServer, int]) -> None:
    server, port = https
    assert server.certs is not None
    transport = EgressTransport(Tcp())
    wrong_name = Origination("other.example.com", str(server.certs.ca_file))
    with pytest.raises(HandshakeError, match=r"does not verify for 'other\.example\.com'"):
        await transport.connect(ExternalEndpoint("127.0.0.1", port, origination=wrong_name), 5)
    system_roots = Origination("api.example.com")
    with pytest.raises(HandshakeError, match="the system roots"):
        await transport.connect(ExternalEndpoint("127.0.0.1", port, origination=system_roots),
                                5)
    skip = Origination("api.example.com", insecure=True)
    stream = await transport.connect(ExternalEndpoint("127.0.0.1", port, origination=skip), 5)
    assert (await _request(stream, "x")).startswith(b"HTTP/1.1 200")


async def test_plain_tcp_and_names_resolved_at_connect_time(nursery: trio.Nursery) -> None:
    server = ExternalServer()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve, listeners[0])
    port = listeners[0].socket.getsockname()[1]
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, p: int) -> tuple[str, int]:
        asked.append((host, p))
        await trio.lowlevel.checkpoint()
        return "127.0.0.1", p

    transport = EgressTransport(Tcp(), resolve=resolve)
    stream = await transport.connect(ExternalEndpoint("api.example.com", port, resolve=True), 5)
    assert (await _request(stream, "api.example.com")).startswith(b"HTTP/1.1 200")
    assert asked == [("api.example.com", port)]
    assert server.sni == []


async def test_connect_failures_are_upstream_errors_that_name_the_endpoint() -> None:
    transport = EgressTransport(Tcp())
    with pytest.raises(ConnectRefusedError, match=r"external endpoint 127\.0\.0\.1:1: "):
        await transport.connect(ExternalEndpoint("127.0.0.1", 1), 5)
    with pytest.raises(NameResolutionError):
        await transport.connect(ExternalEndpoint("no-such-host.invalid", 80, resolve=True), 5)


async def test_mesh_endpoints_go_to_the_inner_transport() -> None:
    seen: list[EndpointInfo] = []

    class Inner:
        async def connect(self, endpoint: EndpointInfo, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
            seen.append(endpoint)
            await trio.lowlevel.checkpoint()
            return trio.testing.MemoryReceiveStream()  # type: ignore[return-value]

    await EgressTransport(Inner()).connect(EndpointInfo("10.1.0.5", 8080, hbone=True), 1)
    assert seen == [EndpointInfo("10.1.0.5", 8080, hbone=True)]


class Secrets:
    """A fake Secret store that counts reads."""

    def __init__(self, data: Mapping[str, Mapping[str, str]]) -> None:
        self.data = data
        self.reads = 0

    async def __call__(self, namespace: str, name: str) -> Mapping[str, str]:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        if (namespace, name) == ("demo", "missing"):
            raise KubeApiError(404, "NotFound", 'secrets "missing" not found')
        return self.data[f"{namespace}/{name}"]


async def test_the_ca_of_a_credential_name_secret_verifies_and_is_cached(
        https: tuple[ExternalServer, int], mock_clock: trio.testing.MockClock) -> None:
    server, port = https
    assert server.certs is not None
    pem = base64.b64encode(server.certs.ca_file.read_bytes()).decode()
    secrets = Secrets({"demo/api-ca": {"ca.crt": pem}, "demo/empty": {"tls.crt": pem}})
    contexts = ContextCache(secrets, ttl=60)
    transport = EgressTransport(Tcp(), contexts=contexts)
    origination = Origination(HOST, credential=("demo", "api-ca"))
    for _ in range(2):
        stream = await transport.connect(ExternalEndpoint("127.0.0.1", port,
                                                          origination=origination), 5)
        assert (await _request(stream, HOST)).startswith(b"HTTP/1.1 200")
    assert secrets.reads == 1
    mock_clock.jump(61)  # the CA is read again after the TTL (a rotated Secret applies)
    await contexts.get(origination)
    assert secrets.reads == 2
    with pytest.raises(CertificateError, match="has no CA bundle"):
        await contexts.get(Origination(HOST, credential=("demo", "empty")))
    with pytest.raises(CertificateError, match="cannot be read"):
        await contexts.get(Origination(HOST, credential=("demo", "missing")))
