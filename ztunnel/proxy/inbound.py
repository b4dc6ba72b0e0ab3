"""Inbound HBONE (15008): a tunnel from another ztunnel or a waypoint to a local pod.

The handler checks the request (:func:`ztunnel.decide.decide_inbound`: the authority
must be this pod, then PeerAuthentication and L4 AuthorizationPolicy with the peer's
certificate identity), connects to the application at ``podIP:port`` *from the
original client's IP* (``IP_TRANSPARENT``: the peer's address, or for a waypoint peer
the address in ``Forwarded``) so the application sees the real source, and only
then answers 200 (401 on a denial, 503 naming the port when the application does not
answer).  The connection is registered for re-checks while it lives
(:mod:`ztunnel.proxy.live`).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import trio

from common.errors import MeshError
from common.hbone import ConnectRequest, Responder
from common.hbone.server import Handler
from common.identity import SpiffeId
from common.model import Snapshot
from common.relay import relay
from ztunnel.decide import Deny, decide_inbound, format_authority
from ztunnel.proxy.dial import connect, family_of
from ztunnel.proxy.live import LiveConnection
from ztunnel.proxy.observe import Observed, inbound_labels

if TYPE_CHECKING:
    from ztunnel.proxy.pod import EnrolledPod


def source_ip_of(request: ConnectRequest, snapshot: Snapshot) -> str:
    """The original client's IP for policy and for the transparent connect.

    A ztunnel dials its tunnels from inside the client pod, so the peer's address *is*
    the client's.  Only a waypoint dials from its own address; for a waypoint peer (a
    waypoint pod in the snapshot, a dict hit) the original client is taken from
    ``Forwarded: for=``.  Anyone else's ``Forwarded`` is ignored, so a peer cannot
    choose the source address that ``ipBlocks`` policies see.
    """
    peer_ip = request.peer_address[0] if request.peer_address is not None else ""
    peer = snapshot.workloads_by_ip.get(peer_ip)
    value = request.forwarded_for
    if not value or peer is None or not peer.is_waypoint:
        return peer_ip
    host = value
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return value  # decide_inbound answers 400 for it


def inbound_handler(pod: EnrolledPod) -> Handler:
    """The HBONE handler of one pod's 15008 listener."""
    async def handle(request: ConnectRequest, responder: Responder) -> None:
        state = pod.state
        snapshot = state.snapshot()
        local = snapshot.workloads_by_uid.get(pod.uid)
        source_ip = source_ip_of(request, snapshot)
        src = request.forwarded_for or source_ip
        if local is None:
            state.metrics.refusal("inbound", "pod_leaving")
            responder.reject(503, f"pod {pod.name} is leaving this node")
            return
        peer = request.peer_identity
        observed = Observed(state.metrics, "inbound", src, request.authority, inbound_labels(
            local, snapshot.workloads_by_ip.get(source_ip), peer))
        outcome = decide_inbound(snapshot, local, request.host, request.port, peer,
                                 source_ip, plaintext=False)
        if isinstance(outcome, Deny):
            observed.refused("policy_denied" if outcome.status == 401 else "bad_request",
                             outcome.reason)
            responder.reject(outcome.status, outcome.reason)
            return
        await connect_and_relay(pod, source_ip, request.host, request.port, peer, False,
                                observed, responder=responder)

    return handle


async def connect_and_relay(pod: EnrolledPod, source_ip: str, dst_ip: str, dst_port: int,
                            peer: SpiffeId | None, plaintext: bool, observed: Observed, *,
                            responder: Responder | None = None,
                            client: trio.abc.HalfCloseableStream | None = None) -> None:
    """Connect to the application from ``source_ip`` and relay; registered as live.

    With ``responder`` (HBONE) the tunnel is accepted after the connect and refused with
    503 when it fails; with ``client`` (plaintext) a failed connect resets the client.
    """
    state = pod.state
    try:
        sock = pod.netns.tcp_socket(family_of(dst_ip), source=source_ip, transparent=True)
        upstream = await connect(sock, (dst_ip, dst_port),
                                 timeout=state.config.connect_timeout)
    except (MeshError, OSError) as exc:
        reason = (f"cannot connect to pod {pod.name} on port {dst_port}: {exc} (is the "
                  f"application listening on port {dst_port}?)")
        observed.refused("app_unreachable", reason)
        if responder is not None:
            responder.reject(503, reason)
        return
    downstream: trio.abc.HalfCloseableStream
    if responder is not None:
        downstream = responder.accept()
    else:
        assert client is not None
        downstream = client
    live = LiveConnection(pod.uid, peer, source_ip, dst_ip, dst_port, plaintext)
    state.live.add(live)
    observed.opened()
    sent = received = 0
    outcome = "cancelled"
    try:
        async with upstream:
            with live.scope:
                received, sent = await relay(downstream, upstream,
                                             label=format_authority(dst_ip, dst_port))
                outcome = "closed"
            if live.scope.cancelled_caught and live.closed_reason is not None:
                outcome = "closed_by_policy"
                state.metrics.policy_closed.inc()
    finally:
        state.live.discard(live)
        observed.finished(sent, received, outcome, live.closed_reason)
