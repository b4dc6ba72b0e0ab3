"""Packet loss and delay between the local cluster's nodes (issue 9): bytes stay intact,
throughput degrades, route timeouts behave as configured.

Layout: the namespace's waypoint lands on a node by round robin; the client pod is pinned
to that node (W) and the servers (an HTTP echo behind Service ``web``, a raw TCP echo
``sink``) to the other node (S).  So both the L4 path (client -> ztunnel W == HBONE ==>
ztunnel S -> sink) and the L7 path's upstream hop (waypoint on W == HBONE ==> ztunnel S ->
web) cross the fabric through S's veth, and only S's veth is shaped.

Shaping: this kernel has no ``sch_netem`` (nor ``fq``, nor nftables' native ``queue``), and
``tbf`` can only delay what queues behind a rate limit, not add a fixed delay to every
packet.  So :class:`DelayLine` is a userspace netem: an nftables table in S's namespace
sends pod-to-pod packets crossing S's ``eth0`` (both directions) to an NFQUEUE (the xtables
target through nft_compat, added over netlink because the ``nft`` tool cannot write it);
a thread of this process holds each packet for the delay, or drops it with the loss
probability, and gives the kernel its verdict.  The queue is fail-open and the rule
bypasses the queue when nobody listens, so a stalled or dead helper lets packets through
rather than blackholing the cluster.  Control-plane traffic (API server, DNS, probes) is not
pod-to-pod on that veth and is never touched.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import struct
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio

from common.kube import KubeClient, Pod, VirtualService
from common.netns import call_in_netns
from deploy.local import network
from tests.integration.conftest import (
    LocalCluster,
    client_pod,
    describe_pod,
    echo_service,
    ready_pods,
    service_ip,
    wait_for,
)
from tests.integration.test_waypoint_mesh import WAYPOINT_PODS, Mesh
from tests.integration.ztunnel_support import (
    AMBIENT,
    http_get,
    label_namespace,
    netns_of,
    node_netns,
    open_from,
)
from tests.unit.waypoint_helpers import Client, Reply

pytestmark = [pytest.mark.netns, pytest.mark.slow]

T = TypeVar("T")

WEB_PORT, SINK_PORT, HBONE_PORT = 8080, 9000, 15008
PAYLOAD = 8 * 2**20
POD_NETWORK = str(network.pod_cidr(0).supernet(new_prefix=16))
NODE_DEV = "eth0"  # a node namespace's end of its veth to the fabric bridge
TABLE = "pa_netem"
QUEUE = 9

# Netlink and netfilter facts (linux/netlink.h, netfilter/nfnetlink*.h, nf_tables.h,
# netfilter/xt_NFQUEUE.h).
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_SUBSYS_QUEUE, NFNL_SUBSYS_NFTABLES = 3, 10
NFT_MSG_NEWRULE = 6
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_TARGET_NAME, NFTA_TARGET_REV, NFTA_TARGET_INFO = 1, 2, 3
NFQ_FLAG_BYPASS = 0x1
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_COPY_PACKET, NFQA_CFG_F_FAIL_OPEN = 1, 2, 0x1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1
# Enough of each packet for the IPv4 and TCP headers' ports (the delay line counts
# which packets were HBONE); the rest stays in the kernel.
COPY_RANGE = 64
# Packets held at once: 300 ms of a bulk transfer.  Past it the queue fails open.
QUEUE_MAXLEN = 20000
# Room for the queue's packet messages (past it they fail open too); root may exceed
# net.core.rmem_max with SO_RCVBUFFORCE, which Python's socket module does not name.
RCVBUF = 32 * 2**20
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class Shaping:
    """What every pod-to-pod packet crossing the shaped veth gets (each direction)."""

    delay: float  # seconds added
    loss: float  # probability of being dropped

    def __str__(self) -> str:
        return f"delay {self.delay * 1000:g}ms loss {self.loss * 100:g}%"


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    """An nfnetlink message: nlmsghdr (host order), nfgenmsg (res_id big-endian), attrs."""
    body = struct.pack("!BBH", family, 0, res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload after nlmsghdr) of each message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        size, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if size < 16:
            return
        yield kind, seq, data[offset + 16:offset + size]
        offset += (size + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + 4:offset + size]
        offset += (size + 3) & ~3
    return found


def _netfilter_socket(netns: str) -> socket.socket:
    sock = call_in_netns(netns, lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    sock.bind((0, 0))
    return sock


def _ack(sock: socket.socket, seq: int, what: str) -> None:
    """Wait (bounded) for the kernel's answer to message ``seq``; raise on an error."""
    deadline = time.monotonic() + 5
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        for kind, got, payload in _messages(sock.recv(65536)):
            if kind != NLMSG_ERROR:
                continue
            (error,) = struct.unpack_from("=i", payload)
            if error:
                raise OSError(-error, f"{what}: {os.strerror(-error)}")
            if got == seq:
                return
    raise TimeoutError(f"{what}: no answer from the kernel within 5 s")


def _add_queue_rule(netns: str, chain: str) -> None:
    """Append ``NFQUEUE --queue-num QUEUE --queue-bypass`` to ``chain`` of ``ip TABLE``.

    The xtables target is used through nft_compat (the kernel's nftables may lack the
    native ``queue`` expression), and the ``nft`` tool can list such a rule but not write
    it: one NEWRULE message in a batch does.
    """
    info = struct.pack("=HHH", QUEUE, 1, NFQ_FLAG_BYPASS)  # struct xt_NFQ_info_v3
    target = _nested(NFTA_LIST_ELEM, _attr(NFTA_EXPR_NAME, b"target\0"), _nested(
        NFTA_EXPR_DATA, _attr(NFTA_TARGET_NAME, b"NFQUEUE\0"),
        _attr(NFTA_TARGET_REV, struct.pack("!I", 3)), _attr(NFTA_TARGET_INFO, info)))
    rule = (_attr(NFTA_RULE_TABLE, TABLE.encode() + b"\0")
            + _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
            + _nested(NFTA_RULE_EXPRESSIONS, target))
    nft = NFNL_SUBSYS_NFTABLES << 8
    batch = (_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, socket.AF_UNSPEC,
                      NFNL_SUBSYS_NFTABLES, b"")
             + _message(nft | NFT_MSG_NEWRULE,
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, 2,
                        socket.AF_INET, 0, rule)
             + _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 3, socket.AF_UNSPEC,
                        NFNL_SUBSYS_NFTABLES, b""))
    with _netfilter_socket(netns) as sock:
        sock.send(batch)
        _ack(sock, 2, "adding the NFQUEUE rule (kernel needs nft_compat and xt_NFQUEUE)")


def _ruleset(dev: str) -> str:
    """Pod-to-pod packets crossing ``dev`` (either way) go to chain ``delay``."""
    match = f"ip saddr {POD_NETWORK} ip daddr {POD_NETWORK}"
    return (f"table ip {TABLE} {{\n"
            f"  chain delay {{ }}\n"
            f"  chain egress {{ type filter hook postrouting priority 0; policy accept; "
            f'oifname "{dev}" {match} goto delay; }}\n'
            f"  chain ingress {{ type filter hook prerouting priority 0; policy accept; "
            f'iifname "{dev}" {match} goto delay; }}\n'
            f"}}\n")


class DelayLine:
    """Userspace netem on one NFQUEUE of one network namespace (see the module docstring).

    A thread receives each queued packet's id and first bytes, drops it with probability
    ``loss`` or holds it ``delay`` seconds, then accepts every packet that is due with one
    batch verdict (ids grow in arrival order and the delay is constant, so the due packets
    are exactly those up to the newest due id).  :meth:`close` accepts what is still held.
    Counts: ``flows`` (source, destination, whether TCP port 15008 is on either side) of
    the packets seen, ``dropped``.
    """

    def __init__(self, netns: str, shaping: Shaping, seed: int = 9) -> None:
        self.shaping = shaping
        self.rng = random.Random(seed)
        self.held: deque[tuple[float, int]] = deque()
        self.flows: Counter[tuple[str, str, bool]] = Counter()
        self.dropped = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.sock = _netfilter_socket(netns)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        self._config(1, _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0,
                                                            socket.AF_INET)))
        self._config(2, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE,
                                                               NFQNL_COPY_PACKET))
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)))
        self.thread = threading.Thread(target=self._run, name="netem-delay-line", daemon=True)
        self.thread.start()

    def _config(self, seq: int, attrs: bytes) -> None:
        self.sock.send(_message(NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG,
                                NLM_F_REQUEST | NLM_F_ACK, seq, socket.AF_UNSPEC, QUEUE, attrs))
        _ack(self.sock, seq, f"binding NFQUEUE {QUEUE}")

    def _verdict(self, kind: int, verdict: int, packet_id: int) -> None:
        self.sock.send(_message(NFNL_SUBSYS_QUEUE << 8 | kind, NLM_F_REQUEST, 0,
                                socket.AF_UNSPEC, QUEUE,
                                _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))

    def _release_due(self, now: float) -> None:
        newest = None
        while self.held and self.held[0][0] <= now:
            newest = self.held.popleft()[1]
        if newest is not None:
            self._verdict(NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, newest)

    def _packet(self, payload: bytes, now: float) -> None:
        attrs = _attrs(payload[4:])  # after nfgenmsg
        (packet_id,) = struct.unpack_from("!I", attrs[NFQA_PACKET_HDR])
        self.flows[_flow(attrs.get(NFQA_PAYLOAD, b""))] += 1
        if self.rng.random() < self.shaping.loss:
            self.dropped += 1
            self._verdict(NFQNL_MSG_VERDICT, NF_DROP, packet_id)
        else:
            self.held.append((now + self.shaping.delay, packet_id))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                wait = 0.05 if not self.held else max(0.0, self.held[0][0] - time.monotonic())
                if select.select([self.sock], [], [], min(wait, 0.05))[0]:
                    now = time.monotonic()
                    for kind, _seq, payload in _messages(self.sock.recv(65536)):
                        if kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
                            self._packet(payload, now)
                self._release_due(time.monotonic())
        except BaseException as exc:  # reported by close(): the test must fail, not hang
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        try:
            if self.held:
                self._verdict(NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, self.held[-1][1])
        finally:
            self.sock.close()
        if self.thread.is_alive():
            raise AssertionError("the delay line's thread did not stop within 5 s")
        if self.error is not None:
            raise AssertionError(f"the delay line failed: {self.error!r}") from self.error


def _flow(head: bytes) -> tuple[str, str, bool]:
    """An IPv4 packet's source, destination, and whether it is TCP to or from 15008."""
    if len(head) < 20:
        return "?", "?", False
    source, destination = socket.inet_ntoa(head[12:16]), socket.inet_ntoa(head[16:20])
    start = (head[0] & 0x0F) * 4
    hbone = (head[9] == socket.IPPROTO_TCP and len(head) >= start + 4
             and HBONE_PORT in struct.unpack_from("!HH", head, start))
    return source, destination, hbone


def _nft(netns: str, script: str) -> subprocess.CompletedProcess[str]:
    name = os.path.basename(netns)  # `ip netns exec` takes the name under /run/netns
    return subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=script,
                          text=True, capture_output=True, check=False)


@contextmanager
def shaped(netns: str, shaping: Shaping) -> Iterator[DelayLine]:
    """``shaping`` on pod-to-pod packets crossing the node's fabric veth, undone on exit."""
    line = DelayLine(netns, shaping)
    try:
        done = _nft(netns, _ruleset(NODE_DEV))
        assert done.returncode == 0, f"nft: {done.stderr}"
        _add_queue_rule(netns, "delay")
        yield line
    finally:
        try:
            _nft(netns, f"delete table ip {TABLE}\n")
        finally:
            line.close()


def _nfqueue_unavailable(netns: str) -> str | None:
    """Why this kernel cannot run the delay line, or None."""
    try:
        with shaped(netns, Shaping(0.0, 0.0)):
            pass
    except OSError as exc:
        return (f"cannot queue packets to userspace ({exc}): the kernel needs "
                "nfnetlink_queue, nft_compat and xt_NFQUEUE")
    return None


def _counts(line: DelayLine, ours: set[str]) -> dict[str, int]:
    """Packets the delay line saw between this test's pods: HBONE or not; and drops."""
    mine = [(hbone, n) for (src, dst, hbone), n in line.flows.items() if {src, dst} <= ours]
    return {"hbone": sum(n for hbone, n in mine if hbone),
            "other": sum(n for hbone, n in mine if not hbone), "dropped": line.dropped}



# Bulk: TCP's loss-limited rate (~MSS / RTT * 1.22 / sqrt(loss), about 3.5 MB/s here)
# keeps the shaped 8 MiB within seconds; the clean run moves it in well under one.
BULK = Shaping(delay=0.005, loss=0.005)
# Timeouts: each crossing packet 300 ms late, so a request from the waypoint (on the
# client's node) to the server and its answer take at least 0.6 s.
SLOW = Shaping(delay=0.3, loss=0.0)
ROUTE_TIMEOUT, RAISED_TIMEOUT = 0.5, 10.0


async def _ambientctl(cluster: LocalCluster, *args: str) -> None:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=60))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr or done.stdout}"


def _server_pod(name: str, namespace: str, node: str, labels: dict[str, str], port: int,
                *args: str) -> Pod:
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{
            "name": name, "image": "ambient/echo", "ports": [{"containerPort": port}],
            "args": list(args)}]}})


def _route(timeout: float) -> dict[str, Any]:
    return {"http": [{"timeout": f"{timeout}s", "route": [{"destination": {"host": "web"}}]}]}


async def _echo(netns: str, ip: str, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` to the TCP echo at ``ip`` from ``netns``, read the echo to EOF."""
    stream = await open_from(netns, ip, SINK_PORT)
    received = bytearray()
    started = trio.current_time()
    async with stream:
        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await stream.receive_some(256 * 1024):
                    received += data
    return bytes(received), trio.current_time() - started


async def _get(netns: str, vip: str) -> tuple[Reply, float]:
    """One GET of ``web`` through its VIP (so through the waypoint); reply and seconds."""
    client = Client(await open_from(netns, vip, WEB_PORT))
    async with client.stream:
        started = trio.current_time()
        with trio.fail_after(RAISED_TIMEOUT + 5):
            reply = await client.request("/", host=f"web:{WEB_PORT}")
        return reply, trio.current_time() - started


async def _until(cluster: LocalCluster, kube: KubeClient, namespace: str, what: str,
                 attempt: Callable[[], Awaitable[T]],
                 check: Callable[[T], bool] = lambda _: True, within: float = 30.0) -> T:
    """Retry ``attempt`` until it returns something ``check`` accepts, with a deadline; on
    failure the message carries the last error, the pods and the cluster's log about them
    (CI is read only through its failure messages)."""
    last: list[str] = ["no attempt finished"]

    async def probe() -> T | None:
        try:
            result = await attempt()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError,
                ValueError) as exc:
            last[:] = [repr(exc)]
            return None
        if check(result):
            return result
        last[:] = [f"not yet: {result!r}"[:300]]
        return None
    try:
        return await wait_for(probe, within, interval=0.2, what=what)
    except AssertionError as exc:
        pods = [describe_pod(p) for p in (await kube.list(Pod, namespace)).items]
        raise AssertionError(f"{exc}; last: {last[0]}; pods: {pods}\n"
                             f"{cluster.log_about(namespace)}") from None


async def test_loss_and_delay_between_nodes_keep_bytes_intact_and_timeouts_as_configured(
        cluster: LocalCluster, kube: KubeClient, namespace: str,
        record_property: Callable[[str, object], None]) -> None:
    reason = _nfqueue_unavailable(node_netns(cluster, "node-0"))
    if reason:
        pytest.skip(reason)
    ns = namespace
    enrolled: dict[str, str | None] = {**AMBIENT}
    await label_namespace(kube, ns, enrolled)
    await _ambientctl(cluster, "waypoint", "apply", "-n", ns, "--enroll-namespace")
    (waypoint,) = await ready_pods(cluster, ns, 1, label_selector=WAYPOINT_PODS, within=120)
    near = str(waypoint.spec.node_name)
    far = "node-1" if near == "node-0" else "node-0"
    await kube.create(client_pod("client", ns, near))
    await kube.create(_server_pod("web", ns, far, {"app": "web"}, WEB_PORT))
    await kube.create(_server_pod("sink", ns, far, {"app": "sink"}, SINK_PORT, "--tcp"))
    await kube.create(echo_service("web", ns, {"app": "web"}, WEB_PORT))
    pods = {p.metadata.name: p for p in await ready_pods(cluster, ns, 4, within=120)}
    client, web, sink = pods["client"], pods["web"], pods["sink"]
    source = netns_of(client)
    web_ip, sink_ip = str(web.status.pod_ip), str(sink.status.pod_ip)
    # Ready does not yet mean the application answers through the mesh (see serving()).
    await _until(cluster, kube, ns, "web answering the client",
                 lambda: http_get(source, web_ip, WEB_PORT, timeout=3))
    await _until(cluster, kube, ns, "the sink echoing", lambda: _echo(source, sink_ip, b"ping"),
                 check=lambda echoed: echoed[0] == b"ping")

    vs = await kube.create(VirtualService.model_validate({
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"hosts": ["web"], **_route(ROUTE_TIMEOUT)}}))
    mesh = Mesh(cluster, kube, ns)
    await mesh.served(f"VirtualService/{ns}/web", vs.metadata.resource_version or "")
    vip = await service_ip(kube, ns, "web")
    # Through the waypoint (it stamps x-envoy-upstream-service-time); this also pools its
    # HBONE connection to the far node before shaping starts.
    await _until(cluster, kube, ns, "web answering via the waypoint", lambda: _get(source, vip),
                 check=lambda got: got[0].status == 200
                 and "x-envoy-upstream-service-time" in got[0].headers)
    waypoints = (await kube.list(Pod, ns, label_selector=WAYPOINT_PODS)).items
    assert [(p.metadata.uid, p.spec.node_name) for p in waypoints] == [
        (waypoint.metadata.uid, near)], "the waypoint moved: the layout no longer holds"

    # (1) The same 8 MiB echoed through the tunnel, clean and shaped.
    payload = random.Random(9).randbytes(PAYLOAD)
    digest = hashlib.sha256(payload).digest()
    far_netns = node_netns(cluster, far)
    clean, clean_seconds = await _echo(source, sink_ip, payload)
    with shaped(far_netns, BULK) as line:
        lossy, lossy_seconds = await _echo(source, sink_ip, payload)
    ours = {str(p.status.pod_ip) for p in (*pods.values(), waypoint)}
    bulk_seen = _counts(line, ours)

    # (2) The route timeout under 300 ms per crossing packet, then raised to 10 s.
    with shaped(far_netns, SLOW) as line:
        timed_out, timed_out_seconds = await _get(source, vip)
        raised = await kube.patch(VirtualService, "web", {"spec": _route(RAISED_TIMEOUT)}, ns)
        await mesh.served(f"VirtualService/{ns}/web", raised.metadata.resource_version or "")
        answered, answered_seconds = await _get(source, vip)
    slow_seen = _counts(line, ours)

    lost = abs(len(payload) - len(clean)) + abs(len(payload) - len(lossy))
    record_property("bytes_lost", lost)
    record_property("shaping", f"{BULK} / {SLOW}, nfqueue delay line on {far} eth0")
    record_property("clean_MBps", round(PAYLOAD / clean_seconds / 1e6, 1))
    record_property("netem_MBps", round(PAYLOAD / lossy_seconds / 1e6, 2))
    record_property("timeout_504_s", round(timed_out_seconds, 2))
    record_property("timeout_10s_ok_s", round(answered_seconds, 2))
    print(f"clean {PAYLOAD / clean_seconds / 1e6:.1f} MB/s, {BULK}: "
          f"{PAYLOAD / lossy_seconds / 1e6:.2f} MB/s (packets {bulk_seen}); "
          f"{SLOW}: 504 after {timed_out_seconds:.2f} s, 10 s route: "
          f"{answered.status} after {answered_seconds:.2f} s (packets {slow_seen})")
    assert hashlib.sha256(clean).digest() == digest
    assert hashlib.sha256(lossy).digest() == digest, f"{len(lossy)} bytes came back"
    assert lossy_seconds > clean_seconds
    # Between this test's pods, everything shaped was HBONE (ztunnel to ztunnel, waypoint
    # to ztunnel): the traffic crossed the fabric inside the tunnel.
    assert bulk_seen["hbone"] > 0 and bulk_seen["other"] == 0, bulk_seen
    assert bulk_seen["dropped"] > 0, bulk_seen
    assert slow_seen["hbone"] > 0 and slow_seen["other"] == 0, slow_seen
    assert (timed_out.status, timed_out.body) == (504, b"upstream request timeout")
    assert ROUTE_TIMEOUT - 0.05 <= timed_out_seconds <= 1.5, timed_out_seconds
    assert answered.status == 200, answered
    # At least one round trip across the shaped veth, well within the raised timeout.
    assert 2 * SLOW.delay <= answered_seconds < RAISED_TIMEOUT, answered_seconds
