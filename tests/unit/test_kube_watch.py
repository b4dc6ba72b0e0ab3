"""The client and the informer loop against recorded-style kube-apiserver responses."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import trio

from common.errors import (
    ApiServerUnreachableError,
    InvalidObjectError,
    KubeApiError,
    ResourceExpiredError,
)
from common.kube import (
    Backoff,
    Change,
    KubeClient,
    KubeConfig,
    ObjectCache,
    Pod,
    Resync,
    by_kind,
    watch_kind,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kube"
LIST = (FIXTURES / "pods-list.json").read_bytes()
WATCH = (FIXTURES / "pods-watch.jsonl").read_bytes()
EXPIRED = (FIXTURES / "pods-watch-expired.jsonl").read_bytes()
GONE = (FIXTURES / "status-gone.json").read_bytes()

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler) -> KubeClient:
    return KubeClient(KubeConfig.for_server("http://apiserver.test"),
                      transport=httpx.MockTransport(handler))


class Script:
    """Answers requests from a list of responses, recording what was asked."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.responses:
            raise httpx.ConnectError("script exhausted", request=request)
        answer = self.responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def params(self, i: int) -> dict[str, str]:
        return dict(self.requests[i].url.params)


def ok(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "application/json"})


async def test_list_fills_kind_and_types_items() -> None:
    async with client_for(Script(ok(LIST))) as client:
        listed = await client.list(Pod)
    assert listed.resource_version == "184467"
    first = listed.items[0]
    assert (first.kind, first.api_version) == ("Pod", "v1")
    assert first.status.pod_ip == "10.244.1.7" and first.spec.node_name == "kind-worker"
    assert first.metadata.owner_references[0].kind == "ReplicaSet"
    # Fields the model does not declare survive a round trip.
    assert first.to_dict()["spec"]["dnsPolicy"] == "ClusterFirst"
    assert first.to_dict()["metadata"]["managedFields"][0]["manager"] == "kube-controller-manager"


async def test_watch_stream_yields_events_and_bookmarks() -> None:
    script = Script(ok(WATCH))
    async with client_for(script) as client:
        events = [e async for e in client.watch(by_kind("Pod"), resource_version="184467")]
    assert [e.type for e in events] == ["ADDED", "MODIFIED", "BOOKMARK", "DELETED", "BOOKMARK"]
    assert events[-1].resource_version == "184530"
    params = script.params(0)
    assert params["watch"] == "1" and params["resourceVersion"] == "184467"
    assert params["allowWatchBookmarks"] == "true"


async def test_watch_error_event_410_raises_expired() -> None:
    async with client_for(Script(ok(EXPIRED))) as client:
        with pytest.raises(ResourceExpiredError) as err:
            async for _ in client.watch(by_kind("Pod"), resource_version="184530"):
                pass
    assert err.value.code == 410 and err.value.reason == "Expired"
    assert "too old resource version" in str(err.value)


async def test_http_410_status_raises_expired() -> None:
    async with client_for(Script(httpx.Response(410, content=GONE))) as client:
        with pytest.raises(ResourceExpiredError):
            await client.list(Pod)


async def test_connection_failure_is_unreachable_error() -> None:
    async with client_for(Script()) as client:
        with pytest.raises(ApiServerUnreachableError) as err:
            await client.get(Pod, "x", "demo")
    assert "cannot reach the API server at http://apiserver.test" in str(err.value)


async def _take(client: KubeClient, count: int) -> list[Resync[Pod] | Change[Pod]]:
    out: list[Resync[Pod] | Change[Pod]] = []
    backoff = Backoff(base=0.001, cap=0.002)
    with trio.fail_after(5):
        async with aclosing(watch_kind(client, Pod, backoff=backoff)) as events:
            async for event in events:
                out.append(event)
                if len(out) == count:
                    break
    return out


async def test_informer_lists_watches_tracks_bookmarks_and_relists_on_410() -> None:
    # list -> watch (events, stream ends) -> watch again from the last bookmark
    # -> 410 -> list again (Resync) -> watch.
    script = Script(ok(LIST), ok(WATCH), ok(EXPIRED), ok(LIST), ok(WATCH))
    async with client_for(script) as client:
        events = await _take(client, 6)
    assert isinstance(events[0], Resync) and events[0].resource_version == "184467"
    assert [p.name for p in events[0].objects] == ["web-v1-6d8f7b9c4d-x7k2p",
                                                    "coredns-7db6d8ff4d-4lq9s"]
    changes = [(e.type, e.object.name) for e in events[1:4] if isinstance(e, Change)]
    assert changes == [("ADDED", "web-v2-5c9d8f6b7-q2m8r"), ("MODIFIED", "web-v2-5c9d8f6b7-q2m8r"),
                       ("DELETED", "web-v1-6d8f7b9c4d-x7k2p")]
    assert isinstance(events[4], Resync)
    assert script.params(1)["resourceVersion"] == "184467"
    assert script.params(2)["resourceVersion"] == "184530"  # the last bookmark's version
    assert "watch" not in script.params(3)  # a plain list after the 410


async def test_informer_retries_unreachable_server_with_backoff() -> None:
    down = httpx.ConnectError("refused")
    script = Script(down, down, down, ok(LIST))
    async with client_for(script) as client:
        events = await _take(client, 1)
    assert isinstance(events[0], Resync) and len(script.requests) == 4


async def test_informer_raises_on_a_request_the_server_rejects() -> None:
    bad = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": "unable to parse requirement", "reason": "BadRequest",
                      "code": 400}).encode()
    async with client_for(Script(httpx.Response(400, content=bad))) as client:
        with pytest.raises(KubeApiError) as err:
            await _take(client, 1)
    assert err.value.code == 400


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(12)]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 < d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays) <= 30.0
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 0.5


def test_backoff_never_returns_zero() -> None:
    class Zero(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return 0.0

    assert Backoff(base=0.2, rng=Zero()).next_delay() > 0


async def test_object_cache_follows_resync_and_changes() -> None:
    script = Script(ok(LIST), ok(WATCH))
    cache: ObjectCache[Pod] = ObjectCache()
    async with client_for(script) as client:
        for event in await _take(client, 4):
            cache.apply(event)
    assert sorted(p.name for p in cache.values()) == ["coredns-7db6d8ff4d-4lq9s",
                                                      "web-v2-5c9d8f6b7-q2m8r"]
    running = cache.get("web-v2-5c9d8f6b7-q2m8r", "demo")
    assert running is not None and running.status.pod_ip == "10.244.2.9"
    cache.apply(Resync([], "1"))
    assert len(cache) == 0


async def test_informer_skips_an_object_that_does_not_fit_its_model() -> None:
    bad_list = json.loads(LIST)
    bad_list["items"][1]["spec"]["containers"] = "not-a-list"
    lines = WATCH.decode().splitlines()
    broken = json.loads(lines[0])
    broken["object"]["status"]["podIPs"] = 7
    stream = "\n".join([json.dumps(broken), *lines[1:]]).encode()
    script = Script(ok(json.dumps(bad_list).encode()), ok(stream))
    async with client_for(script) as client:
        events = await _take(client, 3)
        with pytest.raises(InvalidObjectError, match="coredns-7db6d8ff4d-4lq9s"):
            script.responses.append(ok(json.dumps(bad_list).encode()))
            await client.list(Pod)
    first = events[0]
    assert isinstance(first, Resync) and [p.name for p in first.objects] == \
        ["web-v1-6d8f7b9c4d-x7k2p"]
    assert [(e.type, e.object.name) for e in events[1:] if isinstance(e, Change)] == [
        ("MODIFIED", "web-v2-5c9d8f6b7-q2m8r"), ("DELETED", "web-v1-6d8f7b9c4d-x7k2p")]


async def test_informer_never_spins_while_the_server_is_down(autojump_clock: object) -> None:
    script = Script()  # every request: connection refused
    async with client_for(script) as client:
        with trio.move_on_after(300):  # virtual time: the clock jumps over the sleeps
            async with aclosing(watch_kind(client, Pod)) as events:
                async for _ in events:
                    pytest.fail("nothing can be yielded without a server")
    # Full jitter below a 30 s cap: over 300 s, no fewer than ~10 and far fewer than
    # the thousands a loop without backoff would make.
    assert 10 <= len(script.requests) <= 150
