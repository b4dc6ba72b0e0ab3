"""The waypoint's request pipeline end to end over memory streams (no sockets).

Each test builds a waypoint from a bench-style config, fake backends behind an
in-memory transport, and talks HTTP/1.1 to the real shell.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from common.authz.compile import PolicyObject, compile_authorization_policies
from tests.unit.waypoint_helpers import Answer, FakeBackend, Harness, Seen, service
from waypoint.proxy import PeerInfo, RouterState

A = "10.1.0.1:8080"
B = "10.1.0.2:8080"
C = "10.1.0.3:8080"


def vs(host: str, http: list[dict[str, Any]], name: str = "vs") -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name}, "spec": {"hosts": [host], "http": http}}


def dr(host: str, policy: dict[str, Any], subsets: list[dict[str, Any]] | None = None
       ) -> dict[str, Any]:
    spec: dict[str, Any] = {"host": host, "trafficPolicy": policy}
    if subsets:
        spec["subsets"] = subsets
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": f"dr-{host}"}, "spec": spec}


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def harness(nursery: trio.Nursery, objects: list[dict[str, Any]],
                  backends: dict[str, FakeBackend],
                  services: list[dict[str, Any]] | None = None) -> Harness:
    doc = {"services": services or [service("echo", A)], "objects": objects}
    return await Harness(nursery, doc, backends).start()


def failing(times: int, status: int = 503) -> Callable[[Seen], Answer]:
    count = [0]

    def answer(seen: Seen) -> Answer:
        count[0] += 1
        return Answer(status=status) if count[0] <= times else Answer()
    return answer


async def test_default_route_forwards_with_envoy_headers(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    reply = await h.client().request("/x?y=1", headers={"connection": "keep-alive",
                                                       "x-envoy-upstream-rq-timeout-ms": "900"})
    assert reply.status == 200 and reply.body == b"ok"
    assert "x-envoy-upstream-service-time" in reply.headers
    seen = backend.seen[0]
    assert seen.head.target == b"/x?y=1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-request-id")
    assert seen.header("x-envoy-attempt-count") == "1"
    assert seen.header("x-envoy-expected-rq-timeout-ms") == "900"
    assert seen.header("x-envoy-upstream-rq-timeout-ms") is None
    assert seen.header("connection") is None


async def test_keep_alive_reuses_the_upstream_connection(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    client = h.client()
    for _ in range(5):
        assert (await client.request("/")).status == 200
    assert backend.connections == 1 and len(backend.seen) == 5


async def test_a_malformed_request_after_a_good_one_gets_its_400(
        nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    client = h.client()
    assert (await client.request("/")).status == 200
    # Content-Length and Transfer-Encoding together: a smuggling shape, refused.
    await client.stream.send_all(b"POST / HTTP/1.1\r\nhost: echo\r\ncontent-length: 3\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
    answer = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in answer:
            answer += await client.stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert len(backend.seen) == 1


async def test_unknown_host_is_404_no_route(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    reply = await h.client().request("/", host="nosuch")
    assert reply.status == 404 and backend.seen == []
    assert h.waypoint.metrics.total(response_code="404", response_flags="NR") == 1


async def test_route_without_backends_is_500(nursery: trio.Nursery) -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                      "rules": [{"backendRefs": [{"name": "missing", "port": 80}]}]}}
    h = await harness(nursery, [route], {A: FakeBackend("a")})
    assert (await h.client().request("/")).status == 500


async def test_redirect_and_direct_response(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [
        {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new"}},
        {"match": [{"uri": {"exact": "/teapot"}}],
         "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
        {"route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a")
    h = await harness(nursery, objects, {A: backend})
    client = h.client()
    redirect = await client.request("/old/page")
    assert redirect.status == 301 and redirect.headers["location"].endswith("/new")
    teapot = await client.request("/teapot")
    assert teapot.status == 418 and teapot.body == b"short and stout"
    assert backend.seen == []


async def test_l7_policy_denies_by_path_and_method(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    policy = PolicyObject("default", "deny-admin", {
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                        "name": "waypoint"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin*"], "methods": ["POST"]}}]}]})
    cfg = compile_authorization_policies([policy])
    assert not cfg.issues
    state = h.waypoint.proxy.state
    h.waypoint.proxy.state = RouterState(state.table, state.clusters, state.gateway,
                                         cfg.waypoint)
    client = h.client(PeerInfo(source_ip="10.0.0.9", destination_ip="10.96.0.1"))
    denied = await client.request("/admin/x", method="POST", body=b"{}")
    assert denied.status == 403 and denied.body == b"RBAC: access denied"
    assert (await client.request("/admin/x")).status == 200
    assert [s.head.method for s in backend.seen] == [b"GET"]


async def test_fault_abort_never_reaches_the_backend(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"fault": {"abort": {"httpStatus": 418,
                                                "percentage": {"value": 100}}},
                            "route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a")
    h = await harness(nursery, objects, {A: backend})
    reply = await h.client().request("/")
    assert reply.status == 418 and reply.body == b"fault filter abort"
    assert backend.seen == []
    assert h.waypoint.metrics.total(response_flags="FI") == 1


async def test_retry_succeeds_after_failures_with_attempt_count(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"retries": {"attempts": 3, "retryOn": "5xx"},
                            "route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a", failing(2))
    h = await harness(nursery, objects, {A: backend})
    reply = await h.client().request("/")
    assert reply.status == 200
    assert [s.header("x-envoy-attempt-count") for s in backend.seen] == ["1", "2", "3"]


async def test_retries_exhausted_forward_the_last_response(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"retries": {"attempts": 2, "retryOn": "5xx"},
                            "route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a", failing(10, status=500))
    h = await harness(nursery, objects, {A: backend})
    assert (await h.client().request("/")).status == 500
    assert len(backend.seen) == 3


async def test_retry_goes_to_another_host(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"retries": {"attempts": 1, "retryOn": "5xx"},
                            "route": [{"destination": {"host": "echo"}}]}])]
    bad = FakeBackend("bad", failing(100))
    good = FakeBackend("good")
    h = await harness(nursery, objects, {A: bad, B: good}, [service("echo", A, B)])
    client = h.client()
    for _ in range(10):
        assert (await client.request("/")).status == 200


async def test_connect_failure_is_retried_by_default(nursery: trio.Nursery) -> None:
    down = FakeBackend("down")
    down.refuse = True
    up = FakeBackend("up")
    h = await harness(nursery, [], {A: down, B: up}, [service("echo", A, B)])
    client = h.client()
    for _ in range(6):
        assert (await client.request("/")).status == 200


async def test_all_endpoints_refusing_is_503_connection_failure(nursery: trio.Nursery) -> None:
    down = FakeBackend("down")
    down.refuse = True
    h = await harness(nursery, [], {A: down})
    reply = await h.client().request("/")
    assert reply.status == 503 and b"connection failure" in reply.body


async def test_per_try_timeout_then_success() -> None:
    objects = [vs("echo", [{"retries": {"attempts": 2, "perTryTimeout": "0.1s",
                                        "retryOn": "5xx"},
                            "route": [{"destination": {"host": "echo"}}]}])]
    slow_first = [0]

    def answer(seen: Seen) -> Answer:
        slow_first[0] += 1
        return Answer(delay=10.0) if slow_first[0] == 1 else Answer()

    backend = FakeBackend("a", answer)
    async with trio.open_nursery() as nursery:
        h = await harness(nursery, objects, {A: backend})
        start = trio.current_time()
        reply = await h.client().request("/")
        assert reply.status == 200
        assert 0.1 <= trio.current_time() - start < 0.5
        assert len(backend.seen) == 2
        nursery.cancel_scope.cancel()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_route_timeout_answers_504_at_the_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    objects = [vs("echo", [{"timeout": "0.5s",
                            "route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a", lambda seen: Answer(delay=2.0))
    async with trio.open_nursery() as nursery:
        h = await harness(nursery, objects, {A: backend})
        start = trio.current_time()
        reply = await h.client().request("/?delay=2s")
        assert reply.status == 504 and reply.body == b"upstream request timeout"
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)
        assert h.waypoint.metrics.total(response_code="504", response_flags="UT") == 1
        nursery.cancel_scope.cancel()


async def test_fault_delay_respects_the_route_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    objects = [vs("echo", [{"timeout": "1s",
                            "fault": {"delay": {"fixedDelay": "5s",
                                                "percentage": {"value": 100}}},
                            "route": [{"destination": {"host": "echo"}}]}])]
    backend = FakeBackend("a")
    async with trio.open_nursery() as nursery:
        h = await harness(nursery, objects, {A: backend})
        start = trio.current_time()
        reply = await h.client().request("/")
        assert reply.status == 504
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
        assert backend.seen == []
        nursery.cancel_scope.cancel()


async def test_pool_overflow_is_503_overloaded_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    objects = [dr("echo", {"connectionPool": {"tcp": {"maxConnections": 1},
                                              "http": {"http1MaxPendingRequests": 1,
                                                       "maxRequestsPerConnection": 1}}})]
    backend = FakeBackend("a", lambda seen: Answer(delay=1.0))
    async with trio.open_nursery() as nursery:
        h = await harness(nursery, objects, {A: backend})
        results: list[tuple[int, str | None, float]] = []

        async def one() -> None:
            start = trio.current_time()
            reply = await h.client().request("/")
            results.append((reply.status, reply.headers.get("x-envoy-overloaded"),
                            trio.current_time() - start))

        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(one)
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 503]
        overflow = next(r for r in results if r[0] == 503)
        assert overflow[1] == "true" and overflow[2] < 0.01
        assert h.waypoint.metrics.total(response_flags="UO") == 1
        nursery.cancel_scope.cancel()


async def test_outlier_detection_ejects_the_failing_host(nursery: trio.Nursery) -> None:
    objects = [
        vs("echo", [{"retries": {"attempts": 0}, "route": [{"destination": {"host": "echo"}}]}]),
        dr("echo", {"loadBalancer": {"simple": "ROUND_ROBIN"},
                    "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s",
                                         "baseEjectionTime": "30s",
                                         "maxEjectionPercent": 100}})]
    bad = FakeBackend("bad", lambda seen: Answer(status=500))
    good = FakeBackend("good")
    h = await harness(nursery, objects, {A: bad, B: good}, [service("echo", A, B)])
    client = h.client()
    statuses = [(await client.request("/")).status for _ in range(20)]
    assert statuses.count(500) == 2
    assert all(s == 200 for s in statuses[-10:])


async def test_mirror_never_blocks_or_fails_the_client(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"route": [{"destination": {"host": "echo"}}],
                            "mirror": {"host": "shadow"}}])]
    primary = FakeBackend("primary")
    shadow = FakeBackend("shadow", lambda seen: Answer(delay=3600.0))
    broken = FakeBackend("broken")
    broken.refuse = True
    h = await harness(nursery, objects, {A: primary, B: shadow},
                      [service("echo", A), service("shadow", B)])
    client = h.client()
    with trio.fail_after(1):
        for _ in range(3):
            assert (await client.request("/m", host="echo:80")).status == 200
    mirror = h.waypoint.proxy.mirror
    assert mirror is not None
    with trio.fail_after(1):
        while len(shadow.seen) < 3:  # noqa: ASYNC110 -- counted by another task
            await trio.sleep(0.01)
    assert shadow.seen[0].header("host") == "echo-shadow:80"
    assert all(s.head.target == b"/m" for s in shadow.seen)
    assert len(primary.seen) == 3


async def test_mirror_to_unreachable_host_is_invisible(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"route": [{"destination": {"host": "echo"}}],
                            "mirror": {"host": "shadow"}}])]
    primary = FakeBackend("primary")
    broken = FakeBackend("broken")
    broken.refuse = True
    h = await harness(nursery, objects, {A: primary, B: broken},
                      [service("echo", A), service("shadow", B)])
    client = h.client()
    for _ in range(3):
        assert (await client.request("/")).status == 200
    mirror = h.waypoint.proxy.mirror
    assert mirror is not None
    with trio.fail_after(1):
        while mirror.failed < 3:  # noqa: ASYNC110 -- counted by another task
            await trio.sleep(0.01)


async def test_weighted_split_follows_weights(nursery: trio.Nursery) -> None:
    objects = [vs("echo", [{"route": [{"destination": {"host": "echo", "subset": "v1"},
                                       "weight": 90},
                                      {"destination": {"host": "echo", "subset": "v2"},
                                       "weight": 10}]}]),
               dr("echo", {}, [{"name": "v1", "labels": {"version": "v1"}},
                               {"name": "v2", "labels": {"version": "v2"}}])]
    v1, v2 = FakeBackend("v1"), FakeBackend("v2")
    services = [{"name": "echo", "ports": [80],
                 "endpoints": [{"address": A, "labels": {"version": "v1"}},
                               {"address": B, "labels": {"version": "v2"}}]}]
    h = await harness(nursery, objects, {A: v1, B: v2}, services)
    client = h.client()
    for _ in range(400):
        assert (await client.request("/")).status == 200
    assert abs(len(v2.seen) / 400 - 0.10) < 0.05


async def test_request_body_is_forwarded_and_100_continue_answered(
        nursery: trio.Nursery) -> None:
    backend = FakeBackend("a")
    h = await harness(nursery, [], {A: backend})
    client = h.client()
    reply = await client.request("/upload", method="POST", body=b"x" * 100_000,
                                 headers={"expect": "100-continue"})
    assert reply.status == 200
    assert backend.seen[0].body == b"x" * 100_000
    assert backend.seen[0].header("expect") is None


async def test_bad_request_gets_the_parser_status(nursery: trio.Nursery) -> None:
    h = await harness(nursery, [], {A: FakeBackend("a")})
    client = h.client()
    await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: echo\r\nx: " + b"a" * 70_000
                                 + b"\r\n\r\n")
    data = b""
    with trio.fail_after(1):
        while b"\r\n\r\n" not in data:
            data += await client.stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 431")


async def test_new_config_applies_to_the_next_request_on_a_live_connection(
        nursery: trio.Nursery) -> None:
    v1, v2 = FakeBackend("v1"), FakeBackend("v2")
    services = [service("echo", A), service("other", B)]
    h = await harness(nursery, [], {A: v1, B: v2}, services)
    client = h.client()
    assert (await client.request("/")).headers["x-backend"] == "v1"
    updated = Harness(nursery, {"services": services, "objects": [
        vs("echo", [{"route": [{"destination": {"host": "other"}}]}])]}, {})
    await h.waypoint.apply_bench(updated.config)
    assert (await client.request("/")).headers["x-backend"] == "v2"  # same connection
    assert v1.connections == 1 and v2.connections == 1


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    backend = FakeBackend("a", lambda seen: Answer(body=seen.head.target))
    h = await harness(nursery, [], {A: backend})
    client = h.client()
    await client.stream.send_all(b"GET /first HTTP/1.1\r\nhost: echo\r\n\r\n"
                                 b"GET /second HTTP/1.1\r\nhost: echo\r\n\r\n")
    data = b""
    with trio.fail_after(2):
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"/second"):
            data += await client.stream.receive_some(65536)
    assert data.index(b"/first") < data.index(b"/second")


async def test_slow_header_gets_408_at_the_header_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        h = await harness(nursery, [], {A: FakeBackend("a")})
        client = h.client()
        start = trio.current_time()
        await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: ec")
        data = b""
        with trio.fail_after(120):
            while b"\r\n\r\n" not in data:
                data += await client.stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 408")
        assert trio.current_time() - start == pytest.approx(30.0, abs=0.1)
        nursery.cancel_scope.cancel()
