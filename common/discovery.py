"""Discovery: API objects in, a fresh :class:`~common.model.Snapshot` out, whenever they change.

Theory of operation.  :class:`Discovery` runs one informer (:func:`common.kube.watch_kind`)
per kind the translator reads, all on one :class:`~common.kube.KubeClient`.  Each event
goes into that kind's :class:`~common.kube.ObjectCache` and into the
:class:`~common.translate.MeshTranslator`, and wakes the publisher.  The publisher
coalesces bursts: it waits until no event came for ``debounce`` seconds, but never
longer than ``max_delay`` after the first one, then builds one snapshot and hands it to
the :class:`SnapshotHolder`.  Nothing is published before every informer has finished
its first list (a partial mesh would look like pods leaving it); from then on the
holder is ``ready``.  A kind the server does not serve at all (its CRD is not installed:
404 from API discovery) counts as listed and empty, and is picked up if it appears.

When the API server goes away the informers back off and yield nothing, so the holder
keeps serving the last good snapshot; when it comes back they watch again from where
they were (or list again after a 410), and a re-list that brings nothing new publishes
nothing.

Readers take ``holder.current`` (one attribute read: a connection keeps the snapshot it
started with) or follow changes with ``async for snap in holder.subscribe()``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

import trio

from common.errors import KubeApiError
from common.kube import Backoff, KubeClient, ObjectCache, by_kind, model_for, watch_kind
from common.logging import get_logger
from common.model import DEFAULT_TRUST_DOMAIN, Snapshot, empty_snapshot
from common.translate import KINDS, MeshTranslator

__all__ = ["DEFAULT_DEBOUNCE", "DEFAULT_MAX_DELAY", "Discovery", "SnapshotHolder"]

log = get_logger("discovery")

DEFAULT_DEBOUNCE = 0.02
DEFAULT_MAX_DELAY = 0.25


class SnapshotHolder:
    """The current snapshot, swapped atomically, and a way to wait for newer ones."""

    def __init__(self, initial: Snapshot | None = None) -> None:
        self.current: Snapshot = initial if initial is not None else empty_snapshot()
        #: Set once the first complete snapshot is published.
        self.ready = trio.Event()
        self._published = trio.Event()

    def publish(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` current and wake every waiter (from a trio task)."""
        self.current = snapshot
        self.ready.set()
        woken, self._published = self._published, trio.Event()
        woken.set()

    async def wait_newer(self, version: int) -> Snapshot:
        """The current snapshot once its version is above ``version``."""
        while self.current.version <= version:
            await self._published.wait()
        return self.current

    async def wait_for(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """The first current snapshot for which ``predicate`` holds (bound it with a deadline)."""
        snap = self.current
        while not predicate(snap):
            snap = await self.wait_newer(snap.version)
        return snap

    async def subscribe(self) -> AsyncIterator[Snapshot]:
        """The current snapshot, then each newer one; a slow reader skips to the newest."""
        snap = self.current
        while True:
            yield snap
            snap = await self.wait_newer(snap.version)


class Discovery:
    """Informers for every kind, one translator, one publisher; ``await run()`` until cancelled.

    ``trust_domain`` names workload identities (``spiffe://<td>/ns/..``); it must be the
    mesh CA's.  Pass ``translator`` instead to set the cluster domain or root namespace.
    """

    def __init__(self, client: KubeClient, holder: SnapshotHolder | None = None, *,
                 translator: MeshTranslator | None = None,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, kinds: Iterable[str] = KINDS,
                 debounce: float = DEFAULT_DEBOUNCE, max_delay: float = DEFAULT_MAX_DELAY,
                 backoff: Callable[[], Backoff] = Backoff) -> None:
        self.client = client
        self.holder = holder if holder is not None else SnapshotHolder()
        self.translator = (translator if translator is not None
                           else MeshTranslator(trust_domain=trust_domain))
        self.kinds = tuple(kinds)
        self.caches: dict[str, ObjectCache[Any]] = {kind: ObjectCache() for kind in self.kinds}
        self.debounce = debounce
        self.max_delay = max_delay
        self._backoff = backoff
        self._listed: set[str] = set()
        self._wake = trio.Event()

    @property
    def synced(self) -> bool:
        """Every informer has finished its first list."""
        return len(self._listed) == len(self.kinds)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Watch and publish until cancelled; ``started`` once the first snapshot is out."""
        async with trio.open_nursery() as nursery:
            for kind in self.kinds:
                nursery.start_soon(self._inform, kind)
            nursery.start_soon(self._publish_loop)
            await self.holder.ready.wait()
            task_status.started()

    async def _inform(self, kind: str) -> None:
        model = model_for(kind)
        cache = self.caches[kind]
        if await self._served(kind) is False:
            # A CRD that is not installed (no Istio networking APIs, say) has no objects;
            # waiting for its first list would keep the mesh from ever starting.  The
            # informer keeps retrying, so installing the CRD later is picked up.
            log.warning("kind_not_served", kind=kind,
                        hint="is its CRD installed? treated as having no objects")
            self._listed.add(kind)
            self._wake.set()
        events = watch_kind(self.client, model, backoff=self._backoff())
        async with aclosing(events) as stream:
            async for event in stream:
                cache.apply(event)
                self.translator.apply(kind, event)
                if kind not in self._listed:
                    self._listed.add(kind)
                    log.debug("informer_synced", kind=kind, objects=len(cache))
                self._wake.set()

    async def _served(self, kind: str) -> bool | None:
        """Whether the server lists ``kind`` in its API discovery (None: cannot tell now)."""
        rt = by_kind(kind)
        path = f"/apis/{rt.group}/{rt.version}" if rt.group else f"/api/{rt.version}"
        try:
            found = await self.client.request("GET", path)
        except KubeApiError as exc:
            return False if exc.code == 404 else None
        resources = found.get("resources") if isinstance(found, dict) else None
        if not isinstance(resources, list):
            return None
        return any(isinstance(r, dict) and r.get("name") == rt.plural for r in resources)

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._settle()
            if not self.synced:
                continue
            if self.holder.ready.is_set() and not self.translator.pending:
                continue
            self._publish()

    async def _settle(self) -> None:
        """Wait for a quiet ``debounce`` interval, at most ``max_delay`` after the first event."""
        give_up = trio.current_time() + self.max_delay
        while True:
            self._wake = trio.Event()
            left = give_up - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(min(self.debounce, left)):
                await self._wake.wait()
            if not self._wake.is_set():
                return

    def _publish(self) -> None:
        started = time.perf_counter()
        previous = self.holder.current
        try:
            snapshot = self.translator.snapshot()
        except Exception:
            # Bad objects become issues, never exceptions: reaching here is a bug, and the
            # last good snapshot beats none.
            log.exception("snapshot_build_failed", version=previous.version)
            return
        first = not self.holder.ready.is_set()
        self.holder.publish(snapshot)
        log.info("snapshot_published" if first else "snapshot_updated",
                 version=snapshot.version, workloads=len(snapshot.workloads_by_uid),
                 services=len(snapshot.services_by_key),
                 waypoints=len(snapshot.waypoints_by_ref), issues=len(snapshot.issues),
                 build_ms=round((time.perf_counter() - started) * 1000, 2))
        known = set(previous.issues)
        for issue in snapshot.issues:
            if issue not in known:
                log.warning("config_issue", kind=issue.kind, namespace=issue.namespace,
                            name=issue.name, severity=issue.severity.value,
                            reason=issue.reason, message=issue.message)
