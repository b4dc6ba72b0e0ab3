"""Per-connection observability: Istio's TCP metrics and one access-log line per connection.

A handler makes a :class:`Observed` when it knows both ends, calls :meth:`Observed.opened`
once the connection is established and :meth:`Observed.finished` exactly once at the end
with the byte counts and the outcome; refusals before that call :meth:`refused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from common.identity import SpiffeId
from common.logging import get_logger
from common.metrics import UNKNOWN, Metrics, TcpLabels, workload_name
from common.model import Service, Workload

access_log = get_logger("ztunnel.access")

MUTUAL_TLS = "mutual_tls"


def _workload_fields(workload: Workload | None) -> tuple[str, str]:
    if workload is None:
        return UNKNOWN, UNKNOWN
    return workload_name(workload.name, workload.labels), workload.namespace


def outbound_labels(source: Workload, destination: Workload | None,
                    service: Service | None, principal: SpiffeId | None, mtls: bool
                    ) -> TcpLabels:
    """Labels for a connection a local pod opened (reporter=source)."""
    src_name, src_ns = _workload_fields(source)
    dst_name, dst_ns = _workload_fields(destination)
    return TcpLabels(
        reporter="source", source_workload=src_name, source_workload_namespace=src_ns,
        source_principal=str(source.identity), destination_workload=dst_name,
        destination_workload_namespace=dst_ns,
        destination_service=service.hostname if service is not None else UNKNOWN,
        destination_principal=str(principal) if principal is not None else UNKNOWN,
        security_policy=MUTUAL_TLS if mtls else UNKNOWN)


def inbound_labels(local: Workload, source: Workload | None, peer: SpiffeId | None
                   ) -> TcpLabels:
    """Labels for a connection to a local pod (reporter=destination)."""
    src_name, src_ns = _workload_fields(source)
    if src_ns == UNKNOWN and peer is not None:
        src_ns = peer.namespace
    dst_name, dst_ns = _workload_fields(local)
    return TcpLabels(
        reporter="destination", source_workload=src_name, source_workload_namespace=src_ns,
        source_principal=str(peer) if peer is not None else UNKNOWN,
        destination_workload=dst_name, destination_workload_namespace=dst_ns,
        destination_principal=str(local.identity),
        security_policy=MUTUAL_TLS if peer is not None else UNKNOWN)


@dataclass(eq=False)
class Observed:
    """One connection's metrics and access-log line."""

    metrics: Metrics
    direction: str
    src: str
    dst: str
    labels: TcpLabels
    started: float = field(default_factory=trio.current_time)
    _opened: bool = False

    def opened(self) -> None:
        self._opened = True
        self.metrics.connection_opened(self.labels)

    def finished(self, sent: int, received: int, outcome: str = "closed",
                 reason: str | None = None) -> None:
        if self._opened:
            self.metrics.connection_closed(self.labels, sent, received)
        access_log.info(
            "connection", direction=self.direction, src=self.src, dst=self.dst,
            src_identity=self.labels.source_principal,
            dst_identity=self.labels.destination_principal,
            src_workload=f"{self.labels.source_workload_namespace}/"
                         f"{self.labels.source_workload}",
            dst_workload=f"{self.labels.destination_workload_namespace}/"
                         f"{self.labels.destination_workload}",
            dst_service=self.labels.destination_service, bytes_sent=sent,
            bytes_received=received,
            duration_ms=round((trio.current_time() - self.started) * 1000, 3),
            outcome=outcome, reason=reason)

    def refused(self, reason_key: str, reason: str) -> None:
        """The connection was refused or failed before it was established."""
        self.metrics.refusal(self.direction, reason_key)
        self.finished(0, 0, outcome="refused", reason=reason)
