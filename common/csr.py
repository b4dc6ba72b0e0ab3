"""Getting a certificate by CSR from the node's ztunnel (the waypoint's way, docs/security.md).

The key is generated here and never leaves the process; only the CSR is sent.  The
answer is the leaf (with any intermediates) followed by the trust roots, all PEM: the
self-signed certificates are the roots.
"""

from __future__ import annotations

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.ca import WorkloadCertificate, make_csr
from common.certs import Issuer
from common.errors import CertificateError
from common.identity import SpiffeId

DEFAULT_URL = "http://127.0.0.1:15012"


def _split(pem: bytes) -> tuple[bytes, bytes]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"the CSR answer is not PEM certificates: {exc}") from exc
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs
                     if c.subject != c.issuer)
    roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs
                     if c.subject == c.issuer)
    if not chain or not roots:
        raise CertificateError("the CSR answer must hold a leaf and at least one root")
    return chain, roots


async def request_certificate(
        url: str, identity: SpiffeId, *,
        timeout: float = 10.0,  # noqa: ASYNC109 - httpx's per-request timeout
        connect_wait: float = 0.0) -> WorkloadCertificate:
    """A certificate for ``identity`` signed by the ztunnel at ``url`` (``.../csr``).

    ``connect_wait``: for how long a refused connection is retried (with backoff), for a
    waypoint that starts before its node's ztunnel has opened the listener.
    """
    key_pem, csr_pem = await trio.to_thread.run_sync(make_csr, identity)
    endpoint = url.rstrip("/") + "/csr"
    give_up = trio.current_time() + connect_wait
    delay = 0.2
    async with httpx.AsyncClient(timeout=timeout) as client:
        while True:
            try:
                response = await client.post(endpoint, content=csr_pem,
                                             headers={"content-type": "application/pkcs10"})
                break
            except httpx.ConnectError as exc:
                if trio.current_time() + delay > give_up:
                    raise CertificateError(
                        f"cannot reach the node's ztunnel at {endpoint}: {exc} (is this pod "
                        f"a waypoint on a node whose ztunnel is running?)") from exc
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except httpx.HTTPError as exc:
                raise CertificateError(f"CSR to {endpoint} failed: {exc}") from exc
    if response.status_code != 200:
        raise CertificateError(f"{endpoint} refused the CSR for {identity}: "
                               f"{response.status_code} {response.text.strip()}")
    chain, roots = _split(response.content)
    cert = WorkloadCertificate.from_pem(key_pem, chain, roots)
    if cert.identity != identity:
        raise CertificateError(f"{endpoint} signed {cert.identity}, not {identity}: this pod "
                               f"runs as {cert.identity}")
    return cert


def csr_issuer(url: str = DEFAULT_URL, *, connect_wait: float = 30.0) -> Issuer:
    """An issuer for :class:`~common.certs.CertificateStore` that asks ztunnel by CSR."""
    async def issue(identity: SpiffeId) -> WorkloadCertificate:
        return await request_certificate(url, identity, connect_wait=connect_wait)
    return issue
