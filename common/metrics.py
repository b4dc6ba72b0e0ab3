"""Prometheus metrics with Istio's names and labels, in a registry this process owns.

Istio's TCP metrics (``istio_tcp_connections_opened_total`` and friends) carry a fixed
label set; dashboards and alerts written for Istio work unchanged when ours match.
Cardinality stays bounded: workloads are named by their *workload* (the Deployment,
from the canonical-name labels or the pod name without its ReplicaSet suffixes), never
by pod, and refusal reasons are a small closed set of words.

The registry is per :class:`Metrics` instance (not prometheus_client's global one), so
tests and several components in one process do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["CONTENT_TYPE", "HBONE_REFUSAL_REASONS", "UNKNOWN", "HboneRefusals", "Metrics",
           "TcpLabels", "workload_name"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN = "unknown"
# Label sets are bounded by workload pairs; the cache is a safety net, not a limit.
_CHILD_CACHE_LIMIT = 10_000

TCP_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "destination_workload", "destination_workload_namespace", "destination_service",
    "destination_principal", "security_policy", "response_flags",
)

# A ReplicaSet pod is <deployment>-<pod-template-hash>-<5 chars>; a StatefulSet or
# DaemonSet pod <name>-<ordinal or 5 chars>.
_REPLICASET_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{5,10}-[a-z0-9]{5}$")
_CANONICAL_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


def workload_name(pod_name: str, labels: Mapping[str, str]) -> str:
    """The name Istio reports for a pod's workload (bounded: one per Deployment)."""
    for key in _CANONICAL_LABELS:
        value = labels.get(key)
        if value:
            return value
    match = _REPLICASET_POD.match(pod_name)
    return match.group("name") if match else pod_name


@dataclass(frozen=True, slots=True)
class TcpLabels:
    """The label values of one connection, in :data:`TCP_LABELS` order."""

    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_principal: str = UNKNOWN
    security_policy: str = UNKNOWN
    response_flags: str = "-"

    def values(self) -> tuple[str, ...]:
        return (self.reporter, self.source_workload, self.source_workload_namespace,
                self.source_principal, self.destination_workload,
                self.destination_workload_namespace, self.destination_service,
                self.destination_principal, self.security_policy, self.response_flags)


class Metrics:
    """The counters a data-plane process exports; :meth:`render` is the scrape body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                              TCP_LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                              TCP_LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent towards the destination",
                            TCP_LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes",
                                "Bytes received from the destination", TCP_LABELS, registry=r)
        self.refused = Counter("ztunnel_connections_refused",
                               "Connections refused or reset, by direction and reason",
                               ("direction", "reason"), registry=r)
        self.policy_closed = Counter("ztunnel_connections_closed_by_policy",
                                     "Live connections closed because a new policy denies "
                                     "them", (), registry=r)
        self._children: dict[TcpLabels, tuple[Any, Any, Any, Any]] = {}
        self.enrolled_pods = Gauge("ztunnel_enrolled_pods", "Pods this ztunnel captures",
                                   registry=r)
        self.hbone_refused = HboneRefusals(r)

    def _tcp(self, labels: TcpLabels) -> tuple[Any, Any, Any, Any]:
        """The four TCP counters of one label set (a dict hit after the first time: a
        ``labels()`` lookup costs about 10 µs, four of them per connection add up)."""
        children = self._children.get(labels)
        if children is None:
            values = labels.values()
            children = (self.opened.labels(*values), self.closed.labels(*values),
                        self.sent.labels(*values), self.received.labels(*values))
            if len(self._children) >= _CHILD_CACHE_LIMIT:
                self._children.clear()
            self._children[labels] = children
        return children

    def connection_opened(self, labels: TcpLabels) -> None:
        self._tcp(labels)[0].inc()

    def connection_closed(self, labels: TcpLabels, sent: int, received: int) -> None:
        _, closed, sent_c, received_c = self._tcp(labels)
        closed.inc()
        if sent:
            sent_c.inc(sent)
        if received:
            received_c.inc(received)

    def refusal(self, direction: str, reason: str) -> None:
        self.refused.labels(direction, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        body: bytes = generate_latest(self.registry)
        return body


# Every way an HBONE server (common.hbone.server) refuses a peer, as metric label values.
# TLS handshake: plaintext or not TLS 1.3; no client certificate; a chain from another
# CA; an expired (or not yet valid) certificate; another trust domain; no SPIFFE ID in
# the certificate; no handshake in time; any other handshake failure.  Request: not a
# plain CONNECT; an authority that is not ip:port; another malformed request; refused
# while draining.  Connection: rapid reset; PING/SETTINGS/CONTINUATION flood; header
# list over its bound; any other HTTP/2 violation.
HBONE_REFUSAL_REASONS = (
    "not_tls", "no_client_cert", "unknown_ca", "expired_cert", "wrong_trust_domain",
    "not_spiffe", "handshake_timeout", "tls_failed",
    "not_connect", "bad_authority", "bad_request", "draining",
    "rapid_reset", "flood", "header_list_too_large", "protocol_error",
    "other",
)


class HboneRefusals:
    """``pyambient_hbone_refused_total{reason}``: one count per refusal an HBONE server makes.

    Istio's ztunnel has no such counter (``istio_tcp_connections_failed`` needs a known
    source workload, which a refused handshake never reveals), hence our own prefix.
    Calling the instance counts one refusal.  Every reason starts at 0, so a rate is
    defined before the first refusal; a word outside :data:`HBONE_REFUSAL_REASONS` is
    counted as ``other`` rather than let it grow the label set.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter("pyambient_hbone_refused",
                               "Refusals by the HBONE server (TLS handshake, request, HTTP/2 "
                               "abuse), by reason", ("reason",), registry=registry)
        self._children = {reason: self.counter.labels(reason)
                          for reason in HBONE_REFUSAL_REASONS}

    def __call__(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:
            child = self._children["other"]
        child.inc()
