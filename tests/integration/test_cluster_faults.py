"""Faults on the local cluster itself (issue 9): the mesh's own pods and processes die
while traffic flows, and the traffic must end cleanly or recover, never hang.

- A destination pod dies mid-stream behind a Service (deleted through the API, or its
  process SIGKILLed), once through the waypoint and once L4-only (a Service labelled
  ``istio.io/use-waypoint=none``): the client's stream ends (reset or EOF, short of its
  ``Content-Length``) within a bound, every byte it got is the server's, and new
  requests succeed on the pods left.
- The waypoint pod is deleted under a load of GETs and its Deployment makes a new one:
  no request outlives its deadline, and none fails once the new pod has been Ready for
  2 s (timestamps taken by polling the API).
- A node's ztunnel is killed and its supervisor starts it again: once it is back and
  has re-enrolled the node's pods, new connections succeed.

Traffic leaves from a client pod's namespace, the backends are pods of the shared local
cluster; figures go to docs/reliability.md through ``record_property``.  These tests
live beside the cluster fixtures they use (a session fixture imported into another
directory would bring up a second cluster under the same name).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from common.kube import Deployment, KubeClient, Pod
from tests.integration.conftest import (
    LocalCluster,
    client_pod,
    echo_service,
    is_ready,
    ready_pods,
    service_ip,
    wait_for,
)
from tests.integration.stream_server import BLOCK, BLOCKS, expected
from tests.integration.test_waypoint_mesh import WAYPOINT_PODS, Mesh
from tests.integration.ztunnel_support import (
    AMBIENT,
    config_dump,
    fabric_get,
    label_namespace,
    netns_of,
    open_from,
    wait_enrolled,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 8080
STREAM_SERVER = Path(__file__).with_name("stream_server.py")
STREAM_LABELS = {"app": "stream"}
# The waypoint answers with this header; a reply without it came around the waypoint.
VIA_WAYPOINT = "x-envoy-upstream-service-time"
# A request that has not finished by then "hangs": far longer than any answer here takes.
REQUEST_DEADLINE = 5.0
# How long after a kill the client's stream must have ended (reset or EOF).
END_WITHIN = 10.0

# The restart test's load: 4 clients, each starting a GET every 0.1 s at most (40/s):
# this test is about the restart, not throughput.
LOAD_WORKERS = 4
LOAD_INTERVAL = 0.1

Record = Callable[[str, object], None]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_head(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    """Status, headers, and the body bytes read with the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError(f"EOF before the response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    return status, headers, rest


async def get_once(netns: str, ip: str, path: str = "/", host: str = "svc") -> Answer:
    """One GET on a new connection (``Connection: close``), within REQUEST_DEADLINE."""
    with trio.fail_after(REQUEST_DEADLINE):
        stream = await open_from(netns, ip, PORT, REQUEST_DEADLINE)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: {host}:{PORT}\r\n"
                                  f"connection: close\r\n\r\n".encode())
            status, headers, body = await _read_head(stream)
            while chunk := await stream.receive_some(65536):
                body += chunk
    if "content-length" in headers and len(body) != int(headers["content-length"]):
        raise trio.BrokenResourceError(f"answer cut at {len(body)} of "
                                       f"{headers['content-length']} bytes")
    return Answer(status, headers, body)


async def answers(netns: str, ip: str, host: str) -> Answer | None:
    """A 200 answer, or None when the request failed in any way (for polling)."""
    try:
        answer = await get_once(netns, ip, host=host)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError, IndexError):
        return None
    return answer if answer.status == 200 else None


def _proc_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def container_pid(pod: Pod, marker: str) -> int:
    """The pid of the pod's container process: the process whose (main thread's) network
    namespace is the pod's and whose command line contains ``marker``.  ztunnel's threads
    that enter pod namespaces do not count: their process's main thread stays outside."""
    inode = os.stat(netns_of(pod)).st_ino
    found = []
    for pid in _proc_ids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != inode:
                continue
        except OSError:
            continue
        if any(marker in arg for arg in _cmdline(pid)):
            found.append(pid)
    assert len(found) == 1, f"{pod.metadata.name}: processes with {marker!r}: {found}"
    return found[0]


def ztunnel_pid(cluster: LocalCluster, node: str) -> int | None:
    """The pid of the cluster's ztunnel for ``node`` (its supervisor passes the API
    server's address and the node's name on the command line), or None."""
    for pid in _proc_ids():
        argv = _cmdline(pid)
        if ("ztunnel" in argv and "--node" in argv and cluster.server in argv
                and argv[argv.index("--node") + 1] == node):
            return pid
    return None


def stream_deployment(namespace: str, replicas: int = 2) -> Deployment:
    return Deployment.model_validate({
        "metadata": {"name": "stream", "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": STREAM_LABELS},
                 "template": {"metadata": {"labels": STREAM_LABELS}, "spec": {"containers": [{
                     "name": "stream", "image": "pyambient/test",
                     "command": ["python", str(STREAM_SERVER)],
                     "ports": [{"containerPort": PORT}]}]}}}})


async def _ambientctl(cluster: LocalCluster, *args: str) -> None:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=60))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr or done.stdout}"


@dataclass
class StreamMesh:
    """A namespace with a waypoint, two streaming pods behind ``stream`` (through the
    waypoint) and ``stream-l4`` (``use-waypoint=none``), and a client pod on node-0."""

    cluster: LocalCluster
    kube: KubeClient
    ns: str
    client: Pod | None = None

    async def up(self) -> StreamMesh:
        await label_namespace(self.kube, self.ns, AMBIENT)
        await _ambientctl(self.cluster, "waypoint", "apply", "-n", self.ns,
                          "--enroll-namespace")
        await self.kube.create(stream_deployment(self.ns))
        await self.kube.create(echo_service("stream", self.ns, STREAM_LABELS))
        l4 = echo_service("stream-l4", self.ns, STREAM_LABELS)
        l4.metadata.labels = {"istio.io/use-waypoint": "none"}
        await self.kube.create(l4)
        await self.kube.create(client_pod("client", self.ns, "node-0"))
        pods = await ready_pods(self.cluster, self.ns, 4, within=180)
        self.client = next(p for p in pods if p.metadata.name == "client")
        return self

    async def stream_pods(self) -> list[Pod]:
        return await ready_pods(self.cluster, self.ns, 2, label_selector="app=stream", within=120)

    async def dataplane_ips(self, path: str, service: str) -> set[str] | None:
        """The endpoint IPs of ``service`` that the proxy in front of it would pick now:
        the waypoint's cluster for it, or (L4) the client node's ztunnel's service entry."""
        try:
            if path == "l4":
                dump = await config_dump(self.cluster, "node-0")
                svc = next((s for s in dump["services"]
                            if s["namespace"] == self.ns and s["name"] == service), None)
                return None if svc is None else {e["ip"] for e in svc["endpoints"]
                                                 if e["ready"]}
            (waypoint,) = [p for p in (await self.kube.list(
                Pod, self.ns, label_selector=WAYPOINT_PODS)).items if is_ready(p)]
            dump = json.loads(await fabric_get(self.cluster, str(waypoint.status.pod_ip),
                                               15000, "/config_dump"))
            name = f"outbound|{PORT}||{service}.{self.ns}.svc.cluster.local"
            found = dump["clusters"].get(name)
            return None if found is None else {a.rsplit(":", 1)[0] for a in found}
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError, KeyError):
            return None

    async def settled(self, path: str, service: str, victim: Pod, kill: str) -> None:
        """Until two stream pods are Ready again (a replacement for a deleted one, the
        killed one restarted) and the proxy in front of the service picks exactly them."""
        async def probe() -> bool:
            pods = (await self.kube.list(Pod, self.ns, label_selector="app=stream")).items
            ready = [p for p in pods if is_ready(p)]
            if len(ready) != 2 or len(pods) != 2:
                return False
            uids = {p.metadata.uid: p for p in ready}
            if kill == "delete" and victim.metadata.uid in uids:
                return False
            if kill == "sigkill":
                again = uids.get(victim.metadata.uid)
                statuses = (again.status.model_extra or {}).get("containerStatuses", []) \
                    if again else []
                if not any(c.get("restartCount", 0) >= 1 for c in statuses):
                    return False
            return await self.dataplane_ips(path, service) == {
                str(p.status.pod_ip) for p in ready}
        await wait_for(probe, 120, interval=0.2, what=f"{service}'s endpoints settled")


async def _receive_until_end(stream: trio.SocketStream, into: bytearray) -> str:
    """Read until EOF ("eof") or an error ("reset: ..."); bytes go to ``into``."""
    try:
        while chunk := await stream.receive_some(65536):
            into += chunk
    except (OSError, trio.BrokenResourceError) as exc:
        return f"reset: {type(exc).__name__}"
    return "eof"


@pytest.mark.parametrize("kill", ["delete", "sigkill"])
@pytest.mark.parametrize("path", ["waypoint", "l4"])
async def test_destination_pod_killed_mid_stream_ends_the_stream_and_others_serve(
        cluster: LocalCluster, kube: KubeClient, namespace: str, path: str, kill: str,
        record_property: Record) -> None:
    with trio.fail_after(280):
        mesh = await StreamMesh(cluster, kube, namespace).up()
        assert mesh.client is not None
        client_ns = netns_of(mesh.client)
        service = "stream" if path == "waypoint" else "stream-l4"
        vip = await service_ip(kube, namespace, service)
        first = await wait_for(lambda: answers(client_ns, vip, service), 60, interval=0.3,
                               what=f"{service} answering")
        assert (VIA_WAYPOINT in first.headers) == (path == "waypoint"), first.headers
        pods = {p.metadata.name: p for p in await mesh.stream_pods()}

        stream = await open_from(client_ns, vip, PORT)
        async with stream:
            await stream.send_all(f"GET /stream HTTP/1.1\r\nhost: {service}:{PORT}\r\n\r\n"
                                  .encode())
            with trio.fail_after(REQUEST_DEADLINE):
                status, headers, rest = await _read_head(stream)
            assert status == 200, (status, headers)
            length = int(headers["content-length"])
            victim = pods[headers["x-pod"]]
            received = bytearray(rest)
            # In flight: the first MiB has arrived, most of the stream has not.
            with trio.fail_after(REQUEST_DEADLINE):
                while len(received) < 1 << 20:
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"stream ended early after {len(received)} bytes"
                    received += chunk
            if kill == "delete":
                await kube.delete(Pod, victim.metadata.name, namespace)
            else:
                os.kill(container_pid(victim, STREAM_SERVER.name), signal.SIGKILL)
            killed_at = trio.current_time()
            outcome = "hang"
            with trio.move_on_after(END_WITHIN):
                outcome = await _receive_until_end(stream, received)
            ended_ms = (trio.current_time() - killed_at) * 1000
        assert outcome != "hang", (
            f"the stream neither reset nor ended within {END_WITHIN}s of the kill "
            f"({len(received)} of {length} bytes)")
        assert len(received) < length == BLOCK * BLOCKS, \
            f"the whole stream arrived ({len(received)} bytes): the kill came too late"
        intact = expected(len(received))
        same = next((i for i, (a, b) in enumerate(zip(received, intact, strict=True))
                     if a != b), len(received))
        assert same == len(received), f"byte {same} differs from what the server sent"

        # New requests: the first success within a bound, then every request succeeds.
        recovered = await wait_for(lambda: answers(client_ns, vip, service), 30,
                                   interval=0.1, what=f"{service} answering after the kill")
        recovered_ms = (trio.current_time() - killed_at) * 1000
        # Then, once the data plane has caught up with the API, every request succeeds.
        await mesh.settled(path, service, victim, kill)
        served = [recovered]
        for _ in range(20):
            answer = await get_once(client_ns, vip, host=service)
            assert answer.status == 200, answer
            served.append(answer)
        assert all((VIA_WAYPOINT in a.headers) == (path == "waypoint") for a in served)
        if kill == "delete":
            assert victim.metadata.name not in {a.headers["x-pod"] for a in served}
    record_property("bytes_lost", len(received) - same)
    record_property(f"{path}_{kill}_end", f"{outcome.split(':')[0]} {round(ended_ms)}ms")
    record_property(f"{path}_{kill}_recovered_ms", round(recovered_ms))


@dataclass
class Outcome:
    started: float
    ended: float
    result: str  # "ok", "status N", "no waypoint", "timeout", or the error's type
    detail: str = ""


async def _load_worker(netns: str, vip: str, stop: trio.Event, log: list[Outcome],
                       interval: float = 0.0) -> None:
    """GETs through the waypoint until ``stop``, one at a time, starting one at most
    every ``interval`` seconds (0: as fast as they come back)."""
    while not stop.is_set():
        started = trio.current_time()
        detail = ""
        try:
            answer = await get_once(netns, vip, host="reviews")
            result = ("ok" if VIA_WAYPOINT in answer.headers else "no waypoint") \
                if answer.status == 200 else f"status {answer.status}"
        except trio.TooSlowError:
            result = "timeout"
        except (OSError, trio.BrokenResourceError, ValueError, IndexError) as exc:
            result, detail = type(exc).__name__, str(exc)[:120]
        log.append(Outcome(started, trio.current_time(), result, detail))
        # A failing path fails fast: pause rather than spin on it.
        await trio.sleep_until(started + max(interval, 0.05 if result != "ok" else 0.0))


async def test_waypoint_restarted_under_load_errors_stop_within_2s_of_ready(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        record_property: Record) -> None:
    with trio.fail_after(280):
        mesh = await Mesh(cluster, kube, namespace).up()
        await mesh.until(lambda r: r.status == 200 and VIA_WAYPOINT in r.headers,
                         what="reviews answering through the waypoint")
        assert mesh.client_pod is not None
        client_ns = netns_of(mesh.client_pod)
        (old,) = (await kube.list(Pod, namespace, label_selector=WAYPOINT_PODS)).items
        log: list[Outcome] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(LOAD_WORKERS):
                nursery.start_soon(_load_worker, client_ns, mesh.vip, stop, log, LOAD_INTERVAL)
            await trio.sleep(2.0)  # a baseline of the load before the fault
            deleted_at = trio.current_time()
            await kube.delete(Pod, old.metadata.name, namespace)

            async def new_ready() -> Pod | None:
                pods = (await kube.list(Pod, namespace, label_selector=WAYPOINT_PODS)).items
                return next((p for p in pods if p.metadata.uid != old.metadata.uid
                             and is_ready(p) and not p.metadata.deletion_timestamp), None)
            await wait_for(new_ready, 120, interval=0.05, what="a new waypoint pod Ready")
            ready_at = trio.current_time()
            await trio.sleep(5.0)  # the load goes on: 2 s of grace, then 3 s that must be clean
            stop.set()
    baseline = [o for o in log if o.ended < deleted_at]
    settled = [o for o in log if o.started >= ready_at + 2.0]
    errors = [o for o in log if o.result != "ok"]
    late = [o for o in settled if o.result != "ok"]
    kinds = Counter(o.result for o in errors)
    record_property("requests", len(log))
    record_property("errors", len(errors))
    record_property("error_kinds", dict(sorted(kinds.items())))
    record_property("delete_to_ready_s", round(ready_at - deleted_at, 2))
    if errors:
        record_property("error_window_s", round(max(o.started for o in errors)
                                                - min(o.started for o in errors), 2))
        record_property("last_error_after_ready_ms",
                        round((max(o.started for o in errors) - ready_at) * 1000))
        record_property("slowest_failure_ms",
                        round(max(o.ended - o.started for o in errors) * 1000))
    record_property("load_average", round(os.getloadavg()[0], 1))
    assert baseline and all(o.result == "ok" for o in baseline), \
        f"errors before the fault: {sorted({o.result for o in baseline})}"
    assert not kinds["no waypoint"], \
        f"{kinds['no waypoint']} answers came around the waypoint while it was away"
    assert not kinds["timeout"], f"{kinds['timeout']} requests hung past {REQUEST_DEADLINE}s"
    assert len(settled) >= 10, f"only {len(settled)} requests after ready + 2 s"
    assert not late, (f"{len(late)} of {len(settled)} requests failed over 2 s after the new "
                      f"waypoint was Ready ({sorted({(o.result, o.detail) for o in late})}; "
                      f"all errors: {dict(kinds)})")


@pytest.mark.parametrize(("role", "signum"), [("server-node", signal.SIGKILL),
                                              ("client-node", signal.SIGTERM)],
                         ids=["server-node-sigkill", "client-node-sigterm"])
async def test_ztunnel_restarted_on_a_node_new_connections_succeed_once_back(
        cluster: LocalCluster, kube: KubeClient, namespace: str, role: str, signum: int,
        record_property: Record) -> None:
    with trio.fail_after(200):
        await label_namespace(kube, namespace, AMBIENT)
        await kube.create(client_pod("client", namespace, "node-0"))
        server = client_pod("server", namespace, "node-1")
        server.metadata.labels = {"app": "server"}
        await kube.create(server)
        pods = {p.metadata.name: p for p in await ready_pods(cluster, namespace, 2, within=120)}
        client, server = pods["client"], pods["server"]
        client_ns, server_ip = netns_of(client), str(server.status.pod_ip)
        for pod in (client, server):
            await wait_enrolled(cluster, pod)
        await wait_for(lambda: answers(client_ns, server_ip, "server"), 30, interval=0.2,
                       what="server answering")
        node = "node-1" if role == "server-node" else "node-0"
        victim = client if role == "client-node" else server
        old_pid = ztunnel_pid(cluster, node)
        assert old_pid is not None, f"no ztunnel process for {node} of {cluster.name}"
        os.kill(old_pid, signum)
        killed_at = trio.current_time()

        async def restarted() -> int | None:
            pid = ztunnel_pid(cluster, node)
            return pid if pid not in (None, old_pid) else None
        new_pid = await wait_for(restarted, 60, interval=0.1, what=f"{node}'s ztunnel restarted")
        await wait_enrolled(cluster, victim, within=60)
        enrolled_ms = (trio.current_time() - killed_at) * 1000
        await wait_for(lambda: answers(client_ns, server_ip, "server"), 30, interval=0.1,
                       what="server answering after the restart")
        first_ok_ms = (trio.current_time() - killed_at) * 1000
        for _ in range(20):
            answer = await get_once(client_ns, server_ip, host="server")
            assert answer.status == 200, answer
        assert ztunnel_pid(cluster, node) == new_pid, "the new ztunnel exited again"
    record_property(f"{role}_enrolled_ms", round(enrolled_ms))
    record_property(f"{role}_first_success_ms", round(first_ok_ms))
    record_property("load_average", round(os.getloadavg()[0], 1))



async def test_short_requests_at_a_steady_rate_keep_the_pooled_waypoint_connection(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        record_property: Record) -> None:
    """8 clients sending GETs on new connections through the waypoint as fast as they
    come back, for 8 s: every one answered (RST_STREAMs from the server side of a
    tunnel are no attack on its client)."""
    with trio.fail_after(200):
        mesh = await Mesh(cluster, kube, namespace).up()
        await mesh.until(lambda r: r.status == 200 and VIA_WAYPOINT in r.headers,
                         what="reviews answering through the waypoint")
        assert mesh.client_pod is not None
        log: list[Outcome] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(_load_worker, netns_of(mesh.client_pod), mesh.vip, stop,
                                   log)
            await trio.sleep(8.0)  # the duration of the load, not a wait for a condition
            stop.set()
    errors = Counter((o.result, o.detail) for o in log if o.result != "ok")
    record_property("requests_per_s", round(len(log) / 8.0))
    record_property("errors", sum(errors.values()))
    assert not errors, f"{sum(errors.values())} of {len(log)} failed: {dict(errors)}"
