"""Node-authorized certificate issuing: a ztunnel signs only for workloads on its own node.

Istio's node-authorization rule (docs/security.md): before a certificate is issued for an
identity, the identity must belong to a pod scheduled on this ztunnel's node in the
current snapshot.  Anything else is refused with a :class:`CertificateError` that says
which node was asked and what to check.  The CA itself is loaded from ``--ca-dir``
(``ca.pem`` + ``ca.key``, as ``ambientctl cluster up`` writes it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import trio

from common.ca import DEFAULT_LEAF_LIFETIME, CertificateAuthority, WorkloadCertificate
from common.certs import CertificateStore
from common.errors import CertificateError
from common.identity import SpiffeId
from common.logging import get_logger
from common.model import Snapshot, Workload

_log = get_logger("ztunnel.certs")


class NodeIssuer:
    """Issues workload certificates for the pods of one node only."""

    def __init__(self, ca: CertificateAuthority, node: str, snapshot: Callable[[], Snapshot],
                 *, lifetime: timedelta = DEFAULT_LEAF_LIFETIME) -> None:
        self.ca = ca
        self.node = node
        self._snapshot = snapshot
        self.lifetime = lifetime

    def workload_for(self, identity: SpiffeId) -> Workload:
        """A pod on this node running as ``identity``; raise CertificateError otherwise."""
        snapshot: Snapshot = self._snapshot()
        for uid in snapshot.workloads_by_node.get(self.node, ()):
            workload = snapshot.workloads_by_uid.get(uid)
            if workload is not None and workload.identity == identity:
                return workload
        raise CertificateError(
            f"refusing to issue a certificate for {identity}: no pod on node {self.node} runs "
            f"as that service account (a ztunnel certifies only its own node's pods; check "
            f"the pod's spec.nodeName and serviceAccountName)")

    async def issue(self, identity: SpiffeId) -> WorkloadCertificate:
        """The issuer for :class:`CertificateStore`: check the node, then sign off-loop."""
        self.workload_for(identity)
        cert = await trio.to_thread.run_sync(
            lambda: self.ca.issue(identity, lifetime=self.lifetime))
        _log.info("certificate issued", identity=str(identity), node=self.node,
                  not_after=cert.not_after.isoformat())
        return cert

    async def sign_csr(self, csr_pem: bytes, identity: SpiffeId) -> bytes:
        """Sign a CSR for ``identity`` (a waypoint pod on this node): leaf + chain PEM."""
        self.workload_for(identity)
        return await trio.to_thread.run_sync(
            lambda: self.ca.sign_csr(csr_pem, identity, lifetime=self.lifetime))

    def store(self) -> CertificateStore:
        return CertificateStore(self.issue)
