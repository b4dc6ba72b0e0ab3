"""Shared helpers of the security suite: hostile certificates and memory bounds.

The HBONE fixtures themselves (mesh CA, server, echo upstream, good client) come from
``tests/integration/hbone_support.py`` and the raw HTTP/2 client from
``tests/integration/test_hbone_bad_input.py``; nothing is copied here.
"""

from __future__ import annotations

import ssl
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.ca import CertificateAuthority


def leaf_with_san(ca: CertificateAuthority, san: x509.GeneralName, tmp: Path, *,
                  not_before: datetime | None = None,
                  lifetime: timedelta = timedelta(hours=1)) -> ssl.SSLContext:
    """A client context holding a leaf signed by ``ca`` with exactly ``san``.

    The CA's own ``issue`` only ever writes a SPIFFE URI SAN, which is the point of it;
    a hostile or misconfigured issuer is not so careful, so the tests sign by hand.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    ca_cert = x509.load_pem_x509_certificate(ca.root_pem)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .sign(ca._key, hashes.SHA256()))
    chain = tmp / "chain.pem"
    keyfile = tmp / "key.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(cadata=ca.roots_pem.decode())
    ctx.load_cert_chain(chain, keyfile)
    return ctx


@dataclass
class MemoryBound:
    """Traced allocations while the block ran: growth of live memory and the peak."""

    start: int = 0
    end: int = 0
    peak: int = 0

    @property
    def growth(self) -> int:
        return self.end - self.start


@contextmanager
def traced_memory() -> Iterator[MemoryBound]:
    """Measure Python allocations (the server runs in this process) during the block."""
    bound = MemoryBound()
    tracemalloc.start()
    try:
        bound.start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield bound
        bound.end, bound.peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
