"""What every connection handler of one ztunnel shares: config, snapshot, certificates, metrics.

The snapshot is read once per connection (:meth:`ProxyState.snapshot`, an attribute
read): a connection decides on the mesh as it was when it arrived; the registry of live
connections (:mod:`ztunnel.proxy.live`) re-checks them when policy changes later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import trio

from common.certs import CertificateStore
from common.metrics import Metrics
from common.model import Snapshot, empty_snapshot
from ztunnel.proxy.live import LiveConnections


class SnapshotSource(Protocol):
    """Where ztunnel reads the mesh from (discovery on a cluster; a hand-built one in tests)."""

    @property
    def current(self) -> Snapshot: ...

    async def wait_newer(self, version: int) -> Snapshot:
        """Return the first snapshot whose version is greater than ``version``."""
        ...


class StaticSnapshots:
    """A :class:`SnapshotSource` fed by :meth:`publish` (tests, a fixed mesh)."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._current = snapshot if snapshot is not None else empty_snapshot()
        self._changed = trio.Event()

    @property
    def current(self) -> Snapshot:
        return self._current

    def publish(self, snapshot: Snapshot) -> None:
        self._current = snapshot
        self._changed.set()
        self._changed = trio.Event()

    async def wait_newer(self, version: int) -> Snapshot:
        while self._current.version <= version:
            await self._changed.wait()
        return self._current


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
    snapshots: SnapshotSource
    certs: CertificateStore
    metrics: Metrics = field(default_factory=Metrics)
    config: ProxyConfig = field(default_factory=ProxyConfig)
    live: LiveConnections = field(default_factory=LiveConnections)
    rng: random.Random = field(default_factory=random.Random)

    def snapshot(self) -> Snapshot:
        return self.snapshots.current
