"""The live inbound connections of one ztunnel, re-checked when policy changes.

An inbound connection is authorized once, when it arrives.  Istio's ztunnel also
closes connections that a *later* policy denies; so does this: every inbound
connection registers here with the facts its check used (destination pod, peer
identity, source IP, port) and the cancel scope of its relay.  :meth:`recheck` runs
the same decision against a new snapshot and cancels the ones now denied.  The check
is the per-connection check (dict hits), so a re-check costs one per live connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from common.identity import SpiffeId
from common.logging import get_logger
from common.model import Snapshot
from ztunnel.decide import Deny, decide_inbound

_log = get_logger("ztunnel.live")


@dataclass(eq=False)
class LiveConnection:
    """One inbound connection being relayed to a local pod."""

    workload_uid: str
    peer: SpiffeId | None
    source_ip: str
    dst_ip: str
    dst_port: int
    plaintext: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed_reason: str | None = None


class LiveConnections:
    """Registry of live inbound connections (synchronous bookkeeping only)."""

    def __init__(self) -> None:
        self._connections: set[LiveConnection] = set()

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, connection: LiveConnection) -> None:
        self._connections.add(connection)

    def discard(self, connection: LiveConnection) -> None:
        self._connections.discard(connection)

    def recheck(self, snapshot: Snapshot) -> list[LiveConnection]:
        """Cancel the connections ``snapshot`` no longer allows; return them."""
        closed = []
        for conn in list(self._connections):
            local = snapshot.workloads_by_uid.get(conn.workload_uid)
            if local is None:
                continue  # the pod left: un-enrolling it cancels its connections
            outcome = decide_inbound(snapshot, local, conn.dst_ip, conn.dst_port, conn.peer,
                                     conn.source_ip, conn.plaintext)
            if isinstance(outcome, Deny):
                conn.closed_reason = f"policy changed: {outcome.reason}"
                conn.scope.cancel()
                self._connections.discard(conn)
                closed.append(conn)
                _log.info("live connection closed by policy", pod=f"{local.namespace}/"
                          f"{local.name}", peer=str(conn.peer), src=conn.source_ip,
                          dst_port=conn.dst_port, reason=outcome.reason)
        return closed
