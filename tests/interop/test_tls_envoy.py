"""Our mTLS endpoints against Envoy's (BoringSSL): Envoy as TLS server and as TLS client.

One Envoy terminates our client's TLS (client certificate required, SAN checked,
TLS 1.3, ALPN h2) and opens TLS to our server with its own certificate, proxying
bytes with tcp_proxy:  connect_tls --> Envoy --> accept_tls.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from common.ca import CertificateAuthority, WorkloadCertificate
from common.errors import HandshakeError
from common.identity import SpiffeId
from common.tls import TLSStream, accept_tls, client_context, connect_tls, server_context

pytestmark = pytest.mark.envoy

TD = "cluster.local"
CLIENT = SpiffeId(TD, "default", "client")
SERVER = SpiffeId(TD, "default", "server")
ENVOY = SpiffeId(TD, "default", "envoy")

def _tls(directory: Path, peer: SpiffeId, indent: int) -> str:
    """A common_tls_context: TLS 1.3, ALPN h2, Envoy's certificate, the peer's SAN required."""
    lines = [
        "common_tls_context:",
        "  tls_params: {tls_minimum_protocol_version: TLSv1_3, "
        "tls_maximum_protocol_version: TLSv1_3}",
        '  alpn_protocols: ["h2"]',
        f"  tls_certificates: [{{certificate_chain: {{filename: {directory}/envoy.pem}}, "
        f"private_key: {{filename: {directory}/envoy.key}}}}]",
        "  validation_context:",
        f"    trusted_ca: {{filename: {directory}/ca.pem}}",
        f'    match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer}"}}}}]',
    ]
    return "\n".join(" " * indent + line for line in lines)


_CONFIG = """
static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": "type.googleapis.com/\\
            envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
          require_client_certificate: true
{downstream_tls}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: out
  clusters:
  - name: out
    connect_timeout: 2s
    type: STATIC
    load_assignment:
      cluster_name: out
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address:
        {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
{upstream_tls}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _accept(lsock: socket.socket) -> socket.socket:
    while True:
        try:
            return lsock.accept()[0]
        except BlockingIOError:
            await trio.lowlevel.wait_readable(lsock)


@pytest.fixture
async def envoy_between(tmp_path: Path) -> AsyncIterator[tuple[int, socket.socket,
                                                               WorkloadCertificate,
                                                               WorkloadCertificate]]:
    ca = CertificateAuthority.generate(TD)
    envoy_cert = ca.issue(ENVOY)
    (tmp_path / "ca.pem").write_bytes(ca.roots_pem)
    (tmp_path / "envoy.pem").write_bytes(envoy_cert.cert_pem)
    (tmp_path / "envoy.key").write_bytes(envoy_cert.key_pem)
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(4)
    upstream.setblocking(False)
    listen = _free_port()
    config = _CONFIG.format(listen=listen, upstream=upstream.getsockname()[1],
                            downstream_tls=_tls(tmp_path, CLIENT, 10),
                            upstream_tls=_tls(tmp_path, SERVER, 8))
    (tmp_path / "envoy.yaml").write_text(config)
    envoy = shutil.which("envoy")
    assert envoy is not None
    log = (tmp_path / "envoy.log").open("wb")
    process = await trio.lowlevel.open_process(
        [envoy, "-c", str(tmp_path / "envoy.yaml"), "--concurrency", "1", "-l", "warning",
         "--base-id", str(listen)], stdout=log, stderr=log)
    try:
        with trio.fail_after(30):
            while True:  # poll until Envoy listens (or has died)
                assert process.poll() is None, (tmp_path / "envoy.log").read_text()[-3000:]
                probe = trio.socket.socket()
                try:
                    await probe.connect(("127.0.0.1", listen))
                    break
                except OSError:
                    await trio.sleep(0.05)
                finally:
                    probe.close()
        yield listen, upstream, ca.issue(CLIENT), ca.issue(SERVER)
    finally:
        process.kill()
        await process.wait()
        log.close()
        upstream.close()


async def test_our_client_and_server_through_envoy_tls(
        envoy_between: tuple[int, socket.socket, WorkloadCertificate, WorkloadCertificate],
) -> None:
    listen, upstream, client_cert, server_cert = envoy_between
    served: list[TLSStream] = []

    async def serve() -> None:
        # The readiness probe's connection made tcp_proxy open one upstream too; a real
        # listener would log that failed handshake and keep serving, and so does this one.
        while True:
            try:
                served.append(await accept_tls(await _accept(upstream),
                                               server_context(server_cert), trust_domain=TD))
                return
            except HandshakeError:
                continue

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            client = await connect_tls("127.0.0.1", listen, client_context(client_cert),
                                       expected={ENVOY})
            await client.send_all(b"hello through envoy")  # tcp_proxy connects upstream now
        server = served[0]
        assert client.peer_identity == ENVOY and server.peer_identity == ENVOY
        assert client.alpn == server.alpn == "h2"
        got = b""
        while len(got) < 19:
            got += await server.receive_some()
        assert got == b"hello through envoy"
        payload = bytes(range(256)) * 4096  # 1 MiB back
        await server.send_all(payload)
        received = bytearray()
        while len(received) < len(payload):
            received += await client.receive_some()
        assert received == payload
        # Our close_notify is Envoy's downstream EOF, which tcp_proxy passes upstream.
        await client.send_eof()
        assert await server.receive_some() == b""
        await server.send_all(b"after half-close")
        got = b""
        while len(got) < 16:
            got += await client.receive_some()
        assert got == b"after half-close"
        await server.aclose()
        assert await client.receive_some() == b""
        await client.aclose()
