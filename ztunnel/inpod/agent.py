"""The node agent: enrol and release this node's pods as the snapshot changes.

For every pod on this node that is captured (ambient namespace or pod label, not opted
out) and whose network namespace is known (annotated by the local cluster's kubelet, or
found by pod IP on Kubernetes): open its listeners inside that namespace
(:class:`~ztunnel.proxy.pod.EnrolledPod`), *then* install the capture rules, so no
redirected connection ever meets a closed port.  A pod that stops being captured (label
removed, ``none`` opt-out) or is deleted: rules removed first (new connections go
direct), then its listeners and live connections closed; the pod keeps running.

Installation is idempotent, so a restarted ztunnel simply enrols every captured pod
again.  A pod whose enrolment failed (namespace not there yet, nft missing) is retried
on the next snapshot or after :data:`RETRY_INTERVAL`.

Waypoint pods are never captured, but each one on this node gets a per-pod service
(``waypoint_service``: the CSR listener on 127.0.0.1:15012 that issues its certificate).

When the snapshot's policies change, every live inbound connection is re-checked
(:meth:`ztunnel.proxy.live.LiveConnections.recheck`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import trio

from common.errors import MeshError
from common.logging import get_logger
from common.model import Snapshot, Workload
from ztunnel.inpod.install import install_capture, remove_capture
from ztunnel.proxy.pod import EnrolledPod, PodHook
from ztunnel.proxy.state import ProxyState

_log = get_logger("ztunnel.agent")

RETRY_INTERVAL = 5.0
"""Seconds between reconciles when no new snapshot arrives (retries failed enrolments)."""

WaypointService = Callable[[Workload], Awaitable[None]]
CaptureFn = Callable[[str], Awaitable[None]]
NetnsFinder = Callable[[Mapping[str, Sequence[str]]], Awaitable[dict[str, str]]]
"""Pod uid -> IPs in, pod uid -> netns path out, for the pods it could find (Kubernetes)."""


@dataclass(eq=False)
class _Enrolment:
    pod: EnrolledPod
    settled: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None


def describe(exc: BaseException) -> str:
    """One line for an error, with the leaves of an exception group spelled out."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return str(exc) or repr(exc)


class InpodAgent:
    """Keeps the set of enrolled pods equal to the snapshot's captured pods on this node."""

    def __init__(self, state: ProxyState, *, hooks: Sequence[PodHook] = (),
                 waypoint_service: WaypointService | None = None,
                 install: CaptureFn = install_capture,
                 remove: CaptureFn = remove_capture,
                 find_netns: NetnsFinder | None = None) -> None:
        self.state = state
        self.node = state.node
        self.hooks = tuple(hooks)
        self.waypoint_service = waypoint_service
        self._install = install
        self._remove = remove
        self._find_netns = find_netns
        self.enrolled: dict[str, _Enrolment] = {}
        self.waypoints: dict[str, trio.CancelScope] = {}
        self.synced = False
        self._nursery: trio.Nursery | None = None
        self._policies: tuple[object, object] | None = None
        self._reconciled = trio.Event()

    @property
    def ready(self) -> bool:
        """A snapshot was synced and every captured pod of it is set up (or reported failed)."""
        return self.synced

    def pods(self) -> list[EnrolledPod]:
        return [e.pod for e in self.enrolled.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Reconcile on every new snapshot until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                snapshot = self.state.snapshot()
                await self.reconcile(snapshot)
                with trio.move_on_after(RETRY_INTERVAL):
                    await self.state.snapshots.wait_newer(snapshot.version)

    async def wait_reconciled(self) -> None:
        """Wait for the next completed reconcile (tests)."""
        await self._reconciled.wait()

    async def _node_workloads(self, snapshot: Snapshot) -> list[Workload]:
        """This node's workloads, with the netns filled in where it had to be found.

        On the local cluster the kubelet annotates each pod with its netns; on
        Kubernetes the runtime does not, so the namespace is found by pod IP.
        """
        workloads = list(snapshot.node_workloads(self.node))
        missing = {w.uid: w.ips for w in workloads
                   if w.netns is None and w.ips and (w.captured or w.is_waypoint)}
        if not missing or self._find_netns is None:
            return workloads
        found = await self._find_netns(missing)
        return [replace(w, netns=found[w.uid]) if w.uid in found else w for w in workloads]

    async def reconcile(self, snapshot: Snapshot) -> None:
        desired: dict[str, Workload] = {}
        waypoints: dict[str, Workload] = {}
        for workload in await self._node_workloads(snapshot):
            if workload.netns is None:
                continue
            if workload.is_waypoint:
                waypoints[workload.uid] = workload
            elif workload.captured:
                desired[workload.uid] = workload
        for uid, enrolment in list(self.enrolled.items()):
            wanted = desired.get(uid)
            if wanted is None or wanted.netns != enrolment.pod.workload.netns:
                await self._unenrol(enrolment, deleted=uid not in snapshot.workloads_by_uid)
        for uid, workload in desired.items():
            if uid not in self.enrolled:
                await self._enrol(workload)
        self._reconcile_waypoints(waypoints)
        policies = (snapshot.ztunnel_policies, snapshot.peer_authentication)
        if self._policies is not None and (policies[0] is not self._policies[0]
                                           or policies[1] is not self._policies[1]):
            self.state.live.recheck(snapshot)
        self._policies = policies
        self.state.metrics.enrolled_pods.set(len(self.enrolled))
        if snapshot.version > 0:
            self.synced = True
        self._reconciled.set()
        self._reconciled = trio.Event()

    async def _enrol(self, workload: Workload) -> None:
        assert self._nursery is not None, "start InpodAgent.run first"
        log = _log.bind(pod=f"{workload.namespace}/{workload.name}", netns=workload.netns)
        try:
            pod = EnrolledPod(self.state, workload, hooks=self.hooks)
        except MeshError as exc:
            log.warning("enrolment failed", reason=str(exc))
            return
        enrolment = _Enrolment(pod)
        self.enrolled[workload.uid] = enrolment
        self._nursery.start_soon(self._serve, enrolment)
        await enrolment.settled.wait()
        if enrolment.finished.is_set():
            return  # failed while starting; logged
        assert workload.netns is not None
        try:
            await self._install(workload.netns)
        except MeshError as exc:
            log.warning("enrolment failed: capture rules not installed", reason=str(exc))
            pod.close()
            await enrolment.finished.wait()

    async def _serve(self, enrolment: _Enrolment) -> None:
        pod = enrolment.pod
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._settle_when_ready, enrolment)
                await pod.run()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            enrolment.failed = describe(exc)
            pod.log.warning("pod failed", reason=enrolment.failed, exc_info=exc)
        finally:
            if self.enrolled.get(pod.uid) is enrolment:
                del self.enrolled[pod.uid]
            enrolment.settled.set()
            enrolment.finished.set()

    @staticmethod
    async def _settle_when_ready(enrolment: _Enrolment) -> None:
        await enrolment.pod.ready.wait()
        enrolment.settled.set()

    async def _unenrol(self, enrolment: _Enrolment, *, deleted: bool) -> None:
        pod = enrolment.pod
        netns = pod.workload.netns
        assert netns is not None
        if not deleted:
            try:
                await self._remove(netns)
            except MeshError as exc:
                pod.log.warning("capture rules not removed", reason=str(exc))
        pod.close()
        await enrolment.finished.wait()
        if not any(e.pod.identity == pod.identity for e in self.enrolled.values()):
            self.state.certs.forget(pod.identity)
        pod.log.info("pod released", deleted=deleted)

    def _reconcile_waypoints(self, waypoints: dict[str, Workload]) -> None:
        if self.waypoint_service is None:
            return
        for uid, scope in list(self.waypoints.items()):
            if uid not in waypoints:
                scope.cancel()
                del self.waypoints[uid]
        for uid, workload in waypoints.items():
            if uid not in self.waypoints:
                scope = trio.CancelScope()
                self.waypoints[uid] = scope
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_waypoint, workload, scope)

    async def _serve_waypoint(self, workload: Workload, scope: trio.CancelScope) -> None:
        assert self.waypoint_service is not None
        with scope:
            try:
                await self.waypoint_service(workload)
            except Exception as exc:
                _log.warning("waypoint service failed", pod=f"{workload.namespace}/"
                             f"{workload.name}", reason=str(exc))
        if self.waypoints.get(workload.uid) is scope:
            del self.waypoints[workload.uid]

    async def drain(self, grace: float) -> None:
        """Drain every pod in parallel (SIGTERM): stop accepting, finish within ``grace``."""
        async with trio.open_nursery() as nursery:
            for enrolment in list(self.enrolled.values()):
                nursery.start_soon(enrolment.pod.drain, grace)
