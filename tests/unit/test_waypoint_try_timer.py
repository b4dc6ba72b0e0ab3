"""Per-try deadlines without a cancel scope per try: the Alarms core, the TryTimer shell,
and the pipeline's timeouts on real TCP upstream connections (where the timer is used)."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from common.tcp import TcpStream
from deploy.local import echo
from tests.unit.waypoint_helpers import Client
from waypoint.app import Options, Waypoint, bench_config_from
from waypoint.listener import serve_stream
from waypoint.proxy import PeerInfo
from waypoint.resilience import Host
from waypoint.resilience.timeouts import Alarms
from waypoint.upstream import EndpointInfo, TryTimer, UpstreamConnection

# --- the sans-I/O core ---------------------------------------------------------------


def test_alarms_give_due_targets_once_in_deadline_order() -> None:
    alarms: Alarms[str] = Alarms()
    late = alarms.add(2.0, "b")
    alarms.add(1.0, "a")
    alarms.cancel(alarms.add(1.5, "cancelled"))
    assert alarms.pop_due(0.5) == [] and alarms.next_deadline() == 1.0
    assert alarms.pop_due(2.0) == ["a", "b"]
    alarms.cancel(late)  # the work ended after its alarm went off: nothing to undo
    assert len(alarms) == 0 and alarms.pop_due(10.0) == []
    assert alarms.next_deadline() == math.inf


def test_alarms_next_deadline_after_pop_is_a_live_one() -> None:
    alarms: Alarms[int] = Alarms()
    entries = [alarms.add(float(i), i) for i in range(1, 6)]
    for entry in entries[:4]:
        alarms.cancel(entry)  # finished early, as nearly every try does
    assert alarms.pop_due(0.0) == []
    assert alarms.next_deadline() == 5.0


def test_alarms_memory_follows_the_live_entries_not_the_history() -> None:
    alarms: Alarms[int] = Alarms()
    keep = [alarms.add(1e9, i) for i in range(3)]
    for i in range(50_000):
        alarms.cancel(alarms.add(float(i), i))
    assert len(alarms) == len(keep)
    assert len(alarms._heap) <= 2 * len(keep) + Alarms._SLACK + 1


# --- the trio shell ------------------------------------------------------------------
# These tests run on pytest-trio's ``autojump_clock``: nothing blocks on real I/O for
# long (socketpairs), so deadlines pass in virtual time and each test takes milliseconds.

Upstream = tuple[UpstreamConnection, socket.socket]


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[], Upstream]]:
    """Makes upstream connections over socketpairs (and the peer's end of each); all
    closed after the test, whatever its outcome."""
    made: list[Upstream] = []

    def make() -> Upstream:
        ours, theirs = socket.socketpair()
        port = len(made) + 1
        conn = UpstreamConnection(TcpStream(ours), Host(f"127.0.0.1:{port}"),
                                  EndpointInfo("127.0.0.1", port))
        made.append((conn, theirs))
        return conn, theirs

    yield make
    for conn, peer in made:
        await conn.aclose()
        peer.close()


async def test_timer_interrupts_a_waiting_receive_at_the_deadline(
        autojump_clock: trio.testing.MockClock,
        upstream: Callable[[], Upstream]) -> None:
    conn, _ = upstream()
    timer = TryTimer()
    start = trio.current_time()
    entry = timer.start(start + 0.25, conn)
    with pytest.raises(trio.ClosedResourceError):
        await conn.stream.receive_some(100)
    timer.stop(entry)
    assert conn.interrupted
    assert trio.current_time() - start == pytest.approx(0.25)


async def test_timer_leaves_a_try_alone_once_stopped(
        autojump_clock: trio.testing.MockClock,
        upstream: Callable[[], Upstream]) -> None:
    conn, peer = upstream()
    timer = TryTimer()
    start = trio.current_time()
    entry = timer.start(start + 0.25, conn)
    peer.send(b"HTTP/1.1 200 OK\r\n")
    assert await conn.stream.receive_some(100) == b"HTTP/1.1 200 OK\r\n"
    timer.stop(entry)
    # Past the stopped deadline in virtual time: the timer wakes for it and must find
    # nothing to interrupt.
    await trio.sleep(1.0)
    assert trio.current_time() - start == pytest.approx(1.0)
    assert not conn.interrupted
    peer.send(b"more")
    assert await conn.stream.receive_some(100) == b"more"


async def test_timer_wakes_early_for_a_deadline_earlier_than_its_alarm(
        autojump_clock: trio.testing.MockClock,
        upstream: Callable[[], Upstream]) -> None:
    conn, _ = upstream()
    other, _ = upstream()
    timer = TryTimer()
    start = trio.current_time()
    far = timer.start(start + 10.0, other)
    await trio.testing.wait_all_tasks_blocked()  # the timer now sleeps until t+10 ...
    timer.start(start + 0.5, conn)  # ... and must wake at t+0.5 for this one
    with pytest.raises(trio.ClosedResourceError):
        await conn.stream.receive_some(100)
    assert trio.current_time() - start == pytest.approx(0.5)
    assert conn.interrupted and not other.interrupted
    timer.stop(far)


# --- the pipeline on real TCP upstream connections ----------------------------------
# These run on the real clock: the upstream is a real echo server over loopback TCP, and a
# mock clock that jumps while tasks wait for the kernel would fire the route timeouts
# before ordinary answers arrive.  So each waits out its short timeouts (0.2-0.3 s).


@pytest.fixture
def timed_tries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Deadlines given to TryTimer.start: proof that the tries ran under the timer."""
    seen: list[float] = []
    original = TryTimer.start

    def start(self: TryTimer, deadline: float, conn: UpstreamConnection) -> list[Any]:
        seen.append(deadline)
        return original(self, deadline, conn)

    monkeypatch.setattr(TryTimer, "start", start)
    return seen


async def _bench_waypoint(nursery: trio.Nursery, route: dict[str, Any]) -> Waypoint:
    """A bench-mode waypoint routing ``echo`` (VIP 10.96.0.9:80) with ``route`` to a real
    echo server over TCP, both served in ``nursery``."""
    server = echo.Server(echo.Identity(pod="echo", namespace="default"))
    ports = await nursery.start(echo.serve, [0], server, "127.0.0.1")
    waypoint = Waypoint(Options(name="waypoint", namespace="default", access_log=False))
    await waypoint.apply_bench(bench_config_from({
        "namespace": "default",
        "services": [{"name": "echo", "ports": [80], "vips": ["10.96.0.9"],
                      "endpoints": [{"address": f"127.0.0.1:{ports[0]}"}]}],
        "objects": [{"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                     "metadata": {"name": "echo", "namespace": "default"},
                     "spec": {"hosts": ["echo"],
                              "http": [{**route,
                                        "route": [{"destination": {"host": "echo"}}]}]}}]}))
    return waypoint


def _connect(nursery: trio.Nursery, waypoint: Waypoint) -> Client:
    """A keep-alive client connection into ``waypoint``, addressed to the echo VIP."""
    ours, theirs = socket.socketpair()
    nursery.start_soon(serve_stream, TcpStream(theirs), waypoint.proxy,
                       PeerInfo(source_ip="127.0.0.1", destination="10.96.0.9", port=80), None)
    return Client(TcpStream(ours))


async def _slow_request_answers_504(client: Client) -> float:
    """One request that leaves an idle upstream connection (the next try runs on it under
    the shared timer rather than a cancel scope), then one the backend delays 5 s: checks
    the waypoint's 504 and returns how long it took."""
    assert (await client.request("/")).status == 200
    start = trio.current_time()
    reply = await client.request("/?delay=5s")
    assert reply.status == 504 and reply.body == b"upstream request timeout"
    return trio.current_time() - start


async def test_route_timeout_on_a_reused_tcp_connection_answers_504_and_recovers(
        nursery: trio.Nursery, timed_tries: list[float]) -> None:
    client = _connect(nursery, await _bench_waypoint(nursery, {"timeout": "0.3s"}))
    with trio.fail_after(10):
        assert 0.3 <= await _slow_request_answers_504(client) < 2.0
        # The timed-out connection is closed, never reused: the next request gets
        # a clean answer, and so does one after it on a reused connection.
        assert (await client.request("/")).status == 200
        assert (await client.request("/")).status == 200
    # Requests 2 and 4 found an idle connection (3 opened a new one, under a scope).
    assert len(timed_tries) == 2


async def test_per_try_timeouts_on_tcp_connections_are_retried_then_answer_504(
        nursery: trio.Nursery, timed_tries: list[float]) -> None:
    client = _connect(nursery, await _bench_waypoint(nursery, {
        "timeout": "10s",
        "retries": {"attempts": 2, "perTryTimeout": "0.2s", "retryOn": "5xx"}}))
    with trio.fail_after(10):
        # Three tries of 0.2 s each (the first on the reused connection), then 504.
        assert 0.6 <= await _slow_request_answers_504(client) < 3.0
        assert (await client.request("/")).status == 200
    assert timed_tries  # the first slow try at least ran under the timer


async def test_concurrent_timeouts_leak_no_connection_or_request_slot(
        nursery: trio.Nursery, timed_tries: list[float]) -> None:
    waypoint = await _bench_waypoint(nursery, {"timeout": "0.3s"})
    statuses: list[int] = []

    async def client_run() -> None:
        client = _connect(nursery, waypoint)
        for path in ("/", "/?delay=5s", "/", "/?delay=5s", "/"):
            statuses.append((await client.request(path)).status)

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for _ in range(12):
                clients.start_soon(client_run)
    assert sorted(set(statuses)) == [200, 504]
    assert statuses.count(504) == 24 and statuses.count(200) == 36
    assert timed_tries  # the timer, not only cancel scopes, was in play
    (state,) = waypoint.clusters.by_name.values()
    # Every connection still counted open is idle in the pool (none leaked by an
    # interrupted try), and no request slot is left taken.
    assert state.breaker.active_connections == state.pool.idle_count()
    assert state.breaker.active_requests == 0
