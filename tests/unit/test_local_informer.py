"""Informer caches and the level-triggered reconcile loop (on trio's autojump clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from common.errors import MeshError
from common.kube import Change, Pod, Resync
from deploy.local.informer import Cache, Signal, reconcile_forever


def _pod(name: str, rv: str) -> Pod:
    return Pod.model_validate({"metadata": {"name": name, "namespace": "ns",
                                            "resourceVersion": rv}})


async def test_cache_applies_resync_and_changes_and_tracks_versions() -> None:
    signal = Signal()
    cache = Cache(Pod, signal)
    cache.apply(Resync([_pod("a", "3")], "5"))
    assert cache.synced.is_set() and cache.seen == 5 and cache.get("ns", "a") is not None
    cache.apply(Change("ADDED", _pod("b", "6")))
    cache.apply(Change("DELETED", _pod("a", "7")))
    assert [p.metadata.name for p in cache.values()] == ["b"]
    assert cache.seen == 7 and signal.generation == 3


async def test_wait_seen_returns_once_the_write_is_in_the_cache(
        autojump_clock: trio.testing.MockClock) -> None:
    cache = Cache(Pod, Signal())
    cache.apply(Resync([], "1"))
    async with trio.open_nursery() as nursery:
        async def later() -> None:
            await trio.sleep(1)
            cache.apply(Change("ADDED", _pod("x", "9")))
        nursery.start_soon(later)
        started = trio.current_time()
        await cache.wait_seen("9")
        assert trio.current_time() - started == pytest.approx(1)


async def test_reconcile_runs_after_changes_and_retries_failures(
        autojump_clock: trio.testing.MockClock) -> None:
    signal = Signal()
    calls: list[float] = []

    async def reconcile() -> None:
        calls.append(trio.current_time())
        if len(calls) == 2:
            raise MeshError("API briefly unavailable")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconcile_forever, "test", signal, reconcile)
        await trio.sleep(1)
        assert len(calls) == 1  # the initial pass, then quiet: no busy loop
        signal.notify()
        await trio.sleep(1)
        assert len(calls) == 3  # the change, and the retry of its failure
        await trio.sleep(10)
        assert len(calls) == 3
        nursery.cancel_scope.cancel()
