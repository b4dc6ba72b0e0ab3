"""Live upstream state for workload-addressed traffic: one small cluster per pod and port.

Istio's waypoint sends pod-addressed requests to its ``encap`` cluster, an
original-destination cluster whose hosts are made on demand.  Here each (pod IP,
port) that requests reach gets its own :class:`~waypoint.clusters.ClusterState`
with that one endpoint, so the pipeline's picker, breaker and keep-alive pool work
unchanged (:meth:`DirectClusters.get`).

Entries live as long as their pod stays the same: when a new
:class:`~waypoint.routing.workloads.WorkloadIndex` arrives, entries whose pod is
gone, no longer served, or changed (identity, capture, labels) are dropped and their
idle connections closed.  A client cannot grow the table without bound by dialling
many ports: past :data:`MAX_ENTRIES` the oldest entry is dropped the same way.
Requests already running keep the state they took.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.logging import get_logger
from waypoint.clusters import ClusterState, EndpointSpec
from waypoint.routing.match import RouteDecision
from waypoint.routing.workloads import EMPTY_WORKLOADS, PodTarget, WorkloadIndex
from waypoint.upstream import EndpointInfo, Transport

_log = get_logger("waypoint.direct")

#: Pod/port pairs kept at once (each holds a small picker, breaker and idle pool).
MAX_ENTRIES = 1024


@dataclass(slots=True)
class _Entry:
    target: PodTarget
    transport: Transport
    state: ClusterState
    decision: RouteDecision


class DirectClusters:
    """The ``encap`` cluster's per-destination state; one per waypoint process."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._index: WorkloadIndex = EMPTY_WORKLOADS

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, index: WorkloadIndex, target: PodTarget, port: int,
                  transport: Transport) -> tuple[ClusterState, RouteDecision]:
        """The cluster state and route decision for ``target`` on ``port``.

        The bookkeeping is synchronous (a request cancelled in a close cannot leave the
        table half-updated); only the closing of dropped pools' idle connections waits.
        """
        dropped: list[_Entry] = []
        if index is not self._index:
            self._index = index
            for key, old in list(self._entries.items()):
                if index.by_ip.get(key[0]) != old.target:
                    dropped.append(self._entries.pop(key))
        key = (target.ip, port)
        entry = self._entries.get(key)
        if entry is not None and entry.transport is not transport:
            dropped.append(self._entries.pop(key))
            entry = None
        if entry is None:
            while len(self._entries) >= self.max_entries:
                dropped.append(self._entries.pop(next(iter(self._entries))))
            cluster = target.cluster(port)
            spec = EndpointSpec(EndpointInfo(target.ip, port, identity=target.identity,
                                             hbone=target.hbone),
                                labels=target.labels, workload=target.workload,
                                version=target.version)
            entry = self._entries[key] = _Entry(
                target, transport, ClusterState(cluster, [spec], transport),
                target.decision(cluster))
        for old in dropped:
            _log.debug("direct cluster dropped", pod=f"{old.target.namespace}/{old.target.name}",
                       destination=f"{old.target.ip}:{old.state.cluster.port}")
            await old.state.pool.close_idle()
        return entry.state, entry.decision
