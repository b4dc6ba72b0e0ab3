"""Helpers for egress tests: a CA of the test's own (common.ca, in tmp_path), a server
certificate for a DNS name under it, and a small HTTPS/HTTP server on trio that counts
what it serves (the "external" endpoint)."""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.ca import CertificateAuthority


@dataclass(frozen=True)
class ServerCerts:
    ca_file: Path
    cert_file: Path
    key_file: Path


def server_certs(directory: Path, *hosts: str) -> ServerCerts:
    """A fresh CA (common.ca, saved in ``directory``) and a server certificate for ``hosts``."""
    directory.mkdir(parents=True, exist_ok=True)
    CertificateAuthority.generate("egress.test").save(directory)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ServerCerts(directory / "ca.pem", cert_file, key_file)


@dataclass
class ExternalServer:
    """Answers ``GET <path>`` with 200 and ``path host sni``; a path containing ``fail-N``
    answers 503 to its first N requests.  Counts requests per path, records SNI names."""

    certs: ServerCerts | None = None
    hits: Counter[str] = field(default_factory=Counter)
    sni: list[str | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def context(self) -> ssl.SSLContext | None:
        if self.certs is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certs.cert_file, self.certs.key_file)

        def record(_obj: object, name: str | None, _ctx: object) -> None:
            self.sni.append(name)
        ctx.sni_callback = record
        return ctx

    async def serve(self, listener: trio.SocketListener, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.context()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream: trio.abc.Stream = await listener.accept()
                if ctx is not None:
                    stream = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        buffer = b""
        try:
            with trio.move_on_after(30):
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    path = lines[0].split(" ")[1]
                    host = next((ln.split(":", 1)[1].strip() for ln in lines[1:]
                                 if ln.lower().startswith("host:")), "")
                    self.hosts.append(host)
                    self.hits[path] += 1
                    status = b"200 OK"
                    for part in path.split("/"):
                        if part.startswith("fail-") and self.hits[path] <= int(part[5:]):
                            status = b"503 Service Unavailable"
                    sni = self.sni[-1] if self.sni else None
                    body = f"{path} {host} {sni}".encode()
                    await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n"
                                          b"\r\n" % len(body) + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, IndexError, ValueError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
