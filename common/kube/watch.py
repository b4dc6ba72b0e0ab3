"""Informer loop: list, then watch from the list's resourceVersion, forever.

Theory of operation.  :func:`watch_kind` yields a :class:`Resync` carrying the full list
first; the consumer replaces its whole cache with it.  Then it yields one :class:`Change`
per ADDED/MODIFIED/DELETED event.  It tracks the newest resourceVersion seen (BOOKMARK
events included, which is what they are for) and, when a watch ends or breaks, watches
again from there, so no event is lost or repeated.  When the server answers 410 (the
version was compacted away), it lists again and yields a new :class:`Resync`.  While the
server cannot be reached it waits with exponential backoff and full jitter
(:class:`Backoff`), yielding nothing, so the consumer keeps its last good state.

A watch that ends at once without delivering anything counts as a failure too, so a
misbehaving server cannot drive the loop into a busy spin.

Use it with ``async with contextlib.aclosing(watch_kind(...)) as events:`` so the HTTP
stream is released when the consumer stops early.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Generic, Literal

import trio

from common.errors import InvalidObjectError, KubeApiError, ResourceExpiredError
from common.kube.client import KubeClient, R, fill_type, typed
from common.logging import get_logger

log = get_logger("kube.watch")

# A watch is re-opened after this long times a random factor in [1, 2) (client-go's rule,
# so that many clients started together do not all reconnect together), even when the
# server would keep it longer; that also bounds how long a dead connection goes unnoticed.
WATCH_TIMEOUT_SECONDS = 300
# A watch ending sooner than this without any event is treated as a failure (backoff).
MIN_HEALTHY_WATCH = 1.0
# Status codes worth retrying: the server or something in front of it is unwell, or
# a CRD is not installed yet.  Anything else (400, 422...) is the caller's bug: raised.
_RETRYABLE = {0, 401, 403, 404, 408, 429, 500, 502, 503, 504}


@dataclass
class Backoff:
    """Exponential backoff with full jitter: try N waits uniform in [0, min(cap, base * 2^N))."""

    base: float = 0.2
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        # The floor keeps a sequence of unlucky draws near zero from spinning.
        return max(self.base / 10, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Resync(Generic[R]):
    """The complete current state: replace the whole cache with ``objects``."""

    objects: list[R]
    resource_version: str


@dataclass(frozen=True)
class Change(Generic[R]):
    """One change to apply to the cache."""

    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: R


async def watch_kind(client: KubeClient, kind: type[R], namespace: str | None = None, *,
                     label_selector: str | None = None, field_selector: str | None = None,
                     backoff: Backoff | None = None,
                     watch_timeout: int = WATCH_TIMEOUT_SECONDS,
                     ) -> AsyncGenerator[Resync[R] | Change[R], None]:
    """Informer events for ``kind`` (in ``namespace``, or all), forever; see module docstring."""
    rt = kind.resource_type()
    backoff = backoff or Backoff()
    logger = log.bind(kind=rt.kind, namespace=namespace or "*")
    resource_version: str | None = None
    while True:
        try:
            if resource_version is None:
                listed = await client.list(kind, namespace, label_selector=label_selector,
                                           field_selector=field_selector, skip_invalid=True)
                resource_version = listed.resource_version
                logger.debug("listed", count=len(listed.items), resource_version=resource_version)
                yield Resync(listed.items, resource_version)
            started = trio.current_time()
            delivered = False
            stream = client.watch(rt, namespace=namespace, resource_version=resource_version,
                                  label_selector=label_selector, field_selector=field_selector,
                                  timeout_seconds=int(watch_timeout
                                                      * (1 + backoff.rng.random())))
            async with aclosing(stream) as events:
                async for event in events:
                    delivered = True
                    backoff.reset()
                    resource_version = event.resource_version or resource_version
                    if event.type == "BOOKMARK":
                        continue
                    try:
                        obj = typed(kind, fill_type(event.object, rt))
                    except InvalidObjectError as exc:
                        logger.warning("invalid_object_skipped", event_type=event.type,
                                       error=str(exc))
                        continue
                    yield Change(event.type, obj)
            if not delivered and trio.current_time() - started < MIN_HEALTHY_WATCH:
                await trio.sleep(backoff.next_delay())
        except ResourceExpiredError as exc:
            logger.info("watch_expired_relisting", resource_version=resource_version,
                        reason=str(exc))
            resource_version = None
            # Two expiries in a row with nothing in between: do not hammer the server.
            if backoff.attempt:
                await trio.sleep(backoff.next_delay())
            else:
                backoff.attempt = 1
        except KubeApiError as exc:
            if exc.code not in _RETRYABLE:
                raise
            delay = backoff.next_delay()
            logger.warning("watch_failed_retrying", code=exc.code, reason=exc.reason,
                           error=str(exc), retry_in=round(delay, 3))
            await trio.sleep(delay)


class ObjectCache(Generic[R]):
    """The newest state of every object of one kind, fed with :func:`watch_kind` events.

    A :class:`Resync` replaces the whole content, a :class:`Change` updates one entry;
    lookups are dict hits keyed by (namespace, name).
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], R] = {}

    def apply(self, event: Resync[R] | Change[R]) -> None:
        if isinstance(event, Resync):
            self._objects = {_key(obj): obj for obj in event.objects}
        elif event.type == "DELETED":
            self._objects.pop(_key(event.object), None)
        else:
            self._objects[_key(event.object)] = event.object

    def get(self, name: str, namespace: str | None = None) -> R | None:
        return self._objects.get((namespace or "", name))

    def values(self) -> list[R]:
        return list(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)


def _key(obj: R) -> tuple[str, str]:
    return (obj.metadata.namespace or "", obj.metadata.name)
