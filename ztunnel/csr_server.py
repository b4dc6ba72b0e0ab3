"""The waypoint's certificate: a CSR listener on 127.0.0.1:15012 inside each waypoint pod.

docs/security.md: a waypoint generates its own key and asks the ztunnel of its node to
sign a CSR.  ztunnel opens this listener *inside the waypoint pod's network namespace*,
on loopback, so only processes of that pod can reach it; it therefore signs for exactly
that pod's service-account identity, whatever names the CSR carries, and only while
the pod is on this node (:class:`~ztunnel.certs.NodeIssuer`).

``POST /csr`` with a PEM CSR body answers 200 with the leaf (and any intermediates)
followed by the trust roots, all PEM; 400 for a bad CSR, 403 when the pod is no
longer this node's, 405 for another method.
"""

from __future__ import annotations

from common.admin import AdminServer, Request, Response
from common.errors import CertificateError
from common.logging import get_logger
from common.model import Workload
from ztunnel.certs import NodeIssuer
from ztunnel.proxy.dial import PodNetns

CSR_PORT = 15012
MAX_CSR = 16 * 1024

_log = get_logger("ztunnel.csr")


def csr_route(issuer: NodeIssuer, workload: Workload) -> AdminServer:
    """The HTTP server answering CSRs for ``workload`` (tests call it without a netns)."""
    identity = workload.identity
    name = f"{workload.namespace}/{workload.name}"

    async def sign(request: Request) -> Response:
        if request.method != "POST":
            return Response.text("POST a PEM certificate signing request to /csr\n", 405)
        if not request.body or len(request.body) > MAX_CSR:
            return Response.text("expected a PEM CSR body of at most 16 KiB\n", 400)
        try:
            issuer.workload_for(identity)
        except CertificateError as exc:
            _log.warning("waypoint csr refused", pod=name, reason=str(exc))
            return Response.text(f"{exc}\n", 403)
        try:
            chain = await issuer.sign_csr(request.body, identity)
        except CertificateError as exc:
            _log.warning("waypoint csr refused", pod=name, reason=str(exc))
            return Response.text(f"{exc}\n", 400)
        _log.info("waypoint certificate signed", pod=name, identity=str(identity))
        return Response(200, chain + issuer.ca.roots_pem, "application/x-pem-file")

    return AdminServer({"/csr": sign}, name=f"csr {name}")


async def serve_waypoint_csr(issuer: NodeIssuer, workload: Workload) -> None:
    """Serve CSRs on 127.0.0.1:15012 inside ``workload``'s netns until cancelled."""
    assert workload.netns is not None
    netns = PodNetns(workload.netns)
    try:
        listener = netns.listen("127.0.0.1", CSR_PORT)
    finally:
        netns.close()
    with listener:
        _log.info("waypoint csr listener open", pod=f"{workload.namespace}/{workload.name}")
        await csr_route(issuer, workload).serve(listener)
