"""What every connection handler of one ztunnel shares: config, snapshot, certificates, metrics.

The snapshot is read once per connection (:meth:`ProxyState.snapshot`, an attribute
read): a connection decides on the mesh as it was when it arrived; the registry of live
connections (:mod:`ztunnel.proxy.live`) re-checks them when policy changes later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.certs import CertificateStore
from common.discovery import SnapshotHolder
from common.metrics import Metrics
from common.model import Snapshot
from ztunnel.proxy.live import LiveConnections


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Deadlines and ports of the data path (ports are Istio's, DESIGN.md section 3)."""

    connect_timeout: float = 5.0
    hbone_idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    inbound_hbone_port: int = 15008


@dataclass(eq=False)
class ProxyState:
    """Shared by every pod's listeners in one ztunnel."""

    node: str
    snapshots: SnapshotHolder
    certs: CertificateStore
    metrics: Metrics = field(default_factory=Metrics)
    config: ProxyConfig = field(default_factory=ProxyConfig)
    live: LiveConnections = field(default_factory=LiveConnections)
    rng: random.Random = field(default_factory=random.Random)

    def snapshot(self) -> Snapshot:
        return self.snapshots.current
