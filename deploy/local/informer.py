"""Caches of API objects kept current by the shared watch client, and a change signal.

Every controller of the supervisor reads these caches and reconciles when :class:`Signal`
fires; none of them keeps its own copy of the cluster.  A write's answer carries the new
``resourceVersion``; :meth:`Cache.wait_seen` lets a controller wait until its cache has
caught up with its own write before reconciling again, so a stale cache never makes it
create the same pod twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Generic

import trio

from common.errors import MeshError
from common.kube import Change, KubeClient, Resync
from common.kube.client import R
from common.logging import get_logger

log = get_logger("local.informer")

# Changes arrive in bursts (a Deployment scaled to 100 is 100 pod events); one
# reconcile after a short quiet spell does the work of many.
DEBOUNCE = 0.02
# After a failed reconcile (a 409, the API server restarting), try again this soon.
RETRY_AFTER = 0.5
# A watch normally delivers our own write within milliseconds; past this, reconcile anyway.
CATCH_UP_LIMIT = 5.0


class Signal:
    """A generation counter with a wake-up: reconcilers sleep until something changed."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = trio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, generation: int) -> None:
        while self.generation <= generation:
            await self._event.wait()


def _rv(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class Cache(Generic[R]):
    """All objects of one kind, keyed by (namespace, name)."""

    def __init__(self, kind: type[R], signal: Signal) -> None:
        self.kind = kind
        self.signal = signal
        self.objects: dict[tuple[str, str], R] = {}
        self.synced = trio.Event()
        self.seen = 0
        self._seen_changed = trio.Event()

    def values(self) -> list[R]:
        return list(self.objects.values())

    def get(self, namespace: str | None, name: str) -> R | None:
        return self.objects.get((namespace or "", name))

    def apply(self, event: Resync[R] | Change[R]) -> None:
        if isinstance(event, Resync):
            self.objects = {(o.metadata.namespace or "", o.metadata.name): o
                            for o in event.objects}
            self._advance(_rv(event.resource_version))
            self.synced.set()
        else:
            obj = event.object
            key = (obj.metadata.namespace or "", obj.metadata.name)
            if event.type == "DELETED":
                self.objects.pop(key, None)
            else:
                self.objects[key] = obj
            self._advance(_rv(obj.metadata.resource_version))
        self.signal.notify()

    def _advance(self, rv: int) -> None:
        if rv > self.seen:
            self.seen = rv
            self._seen_changed.set()
            self._seen_changed = trio.Event()

    async def wait_seen(self, rv: str | None) -> None:
        """Return once the cache reflects version ``rv`` (or after :data:`CATCH_UP_LIMIT`)."""
        target = _rv(rv)
        with trio.move_on_after(CATCH_UP_LIMIT):
            while self.seen < target:
                await self._seen_changed.wait()

    async def run(self, client: KubeClient) -> None:
        from common.kube import watch_kind

        async with aclosing(watch_kind(client, self.kind)) as events:
            async for event in events:
                self.apply(event)


async def reconcile_forever(name: str, signal: Signal,
                            reconcile: Callable[[], Awaitable[None]]) -> None:
    """Call ``reconcile`` after every burst of changes; failures are logged and retried."""
    logger = log.bind(controller=name)
    seen = -1
    while True:
        await signal.wait_past(seen)
        await trio.sleep(DEBOUNCE)
        seen = signal.generation
        try:
            await reconcile()
        except MeshError as exc:
            logger.warning("reconcile_failed", error=str(exc), retry_in=RETRY_AFTER)
            await trio.sleep(RETRY_AFTER)
            seen = -1
