"""The client over HTTPS with kubeconfig-style credentials: CA data and a client certificate."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import ssl
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.kube import KubeClient, KubeConfig, Namespace, ObjectMeta
from deploy.local.apiserver import ApiServer, Store

Pem = tuple[str, str]  # certificate, key


def _issue(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
           *, ca: bool = False, ip: str | None = None,
           client: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Pem:
    cert, key = pair
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


async def test_https_with_ca_data_and_client_certificate_data(nursery: trio.Nursery,
                                                              tmp_path: Path) -> None:
    ca = _issue("test-ca", None, ca=True)
    server_cert, server_key = _pem(_issue("apiserver", ca, ip="127.0.0.1"))
    client_cert, client_key = _pem(_issue("admin", ca, client=True))
    ca_pem = _pem(ca)[0]
    (tmp_path / "server.pem").write_text(server_cert + server_key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca_pem)
    server_ctx.load_cert_chain(tmp_path / "server.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # like kube-apiserver with --client-ca-file

    store = Store(tmp_path / "db.sqlite")
    api = ApiServer(store)
    listeners = await nursery.start(functools.partial(
        trio.serve_ssl_over_tcp, api.handle_connection, 0, server_ctx, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    config = KubeConfig(server=f"https://127.0.0.1:{port}", ca_data=ca_pem,
                        client_cert_data=client_cert, client_key_data=client_key, token="t")
    with trio.fail_after(10):
        async with KubeClient(config) as client:
            await client.create(Namespace(metadata=ObjectMeta(name="secure")))
            listed = await client.list(Namespace)
    assert [n.name for n in listed.items] == ["secure"]
