"""Outbound (15001): a connection the pod's application opened, captured by nftables.

The original destination comes from ``SO_ORIGINAL_DST``; :func:`ztunnel.decide.decide_outbound`
says where it goes: HBONE through the pod's pool (to a waypoint or to the destination
pod's ztunnel), plain TCP from the pod's namespace (outside the mesh), or nowhere (the
client is reset and the reason logged).  Then bytes are relayed both ways, each
direction closing on its own.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from common.errors import ConfigError, MeshError, TunnelRejectedError, UpstreamError
from common.hbone import Baggage
from common.logging import get_logger
from common.metrics import workload_name
from common.relay import relay
from common.service_entries import resolve_entry_host
from common.tcp import TcpStream
from ztunnel.decide import Passthrough, Refused, decide_outbound, format_authority
from ztunnel.inpod.origdst import original_destination
from ztunnel.proxy.dial import connect, family_of, reset
from ztunnel.proxy.observe import Observed, outbound_labels

if TYPE_CHECKING:
    from common.model import Snapshot, Workload
    from ztunnel.proxy.pod import EnrolledPod

_log = get_logger("ztunnel.outbound")

_LOOPBACK = ("127.", "::1")


async def handle_outbound(pod: EnrolledPod, sock: socket.socket,
                          peer: tuple[str, int]) -> None:
    """Serve one captured outbound connection; ``sock`` is consumed."""
    state = pod.state
    snapshot = state.snapshot()
    source = pod.current(snapshot)
    src = format_authority(*peer)
    try:
        dst_ip, dst_port = original_destination(sock)
    except ConfigError as exc:
        state.metrics.refusal("outbound", "no_original_destination")
        _log.warning("outbound refused", pod=pod.name, src=src, reason=str(exc))
        reset(sock)
        return
    dst = format_authority(dst_ip, dst_port)
    if source.ips and peer[0] not in source.ips and not peer[0].startswith(_LOOPBACK):
        # 15001 is reachable from outside the pod; only the pod itself may use it, or any
        # host could borrow the pod's identity.  (Before the pod's IP is known, nothing
        # can be checked.)
        state.metrics.refusal("outbound", "not_from_pod")
        _log.warning("outbound refused", pod=pod.name, src=src, dst=dst,
                     reason=f"{peer[0]} is not an address of the pod")
        reset(sock)
        return

    try:
        upstream, observed = await open_upstream(pod, snapshot, source, src, (dst_ip, dst_port),
                                                 "outbound")
    except MeshError:
        reset(sock)  # open_upstream logged and counted why
        return

    client = TcpStream(sock)
    observed.opened()
    sent = received = 0
    outcome = "cancelled"
    try:
        async with client, upstream:
            sent, received = await relay(client, upstream, label=dst)
            outcome = "closed"
    finally:
        observed.finished(sent, received, outcome)


async def open_upstream(pod: EnrolledPod, snapshot: Snapshot, source: Workload, src: str,
                        dst: tuple[str, int], direction: str
                        ) -> tuple[trio.abc.HalfCloseableStream, Observed]:
    """Decide where a pod's connection to ``dst`` goes and connect there:
    HBONE through the pod's pool, or plain TCP from the pod's namespace.

    Shared by the captured path and the pod's SOCKS5 proxy (``direction`` labels the
    logs).  A refusal or a failed connect is logged and counted here, then raised as the
    MeshError the caller maps to its own answer (a reset, a SOCKS5 reply code).
    """
    state = pod.state
    decision = decide_outbound(snapshot, source, dst[0], dst[1], state.rng)
    dst_text = format_authority(*dst)
    if isinstance(decision, Refused):
        Observed(state.metrics, direction, src, dst_text, outbound_labels(
            source, None, decision.service, None, mtls=False)).refused("no_route",
                                                                        decision.reason)
        raise UpstreamError(decision.reason)
    if isinstance(decision, Passthrough):
        observed = Observed(state.metrics, direction, src, dst_text, outbound_labels(
            source, decision.workload, decision.service, None, mtls=False))
        addr = decision.addr
        try:
            if decision.resolve is not None:  # a ServiceEntry VIP: dial what its host names
                addr = await resolve_entry_host(decision.resolve, addr[1])
            return await connect(pod.netns.tcp_socket(family_of(addr[0])), addr,
                                 timeout=state.config.connect_timeout), observed
        except MeshError as exc:
            observed.refused("connect_failed", f"passthrough to {addr[0]}:{addr[1]}: {exc}")
            raise
    workload = decision.workload  # for a waypoint: set only for a workload waypoint
    principal = next(iter(decision.expected), None)
    observed = Observed(state.metrics, direction, src, dst_text, outbound_labels(
        source, workload, decision.service, principal, mtls=True))
    baggage = Baggage(namespace=source.namespace,
                      workload_name=workload_name(source.name, source.labels),
                      service_name=source.labels.get("app"))
    try:
        return await pod.pool.connect(
            source.identity, decision.hbone_addr, expected=decision.expected,
            authority=decision.authority, forwarded_for=src, baggage=baggage), observed
    except TunnelRejectedError as exc:
        observed.refused("policy_denied" if exc.status in (401, 403)
                         else f"tunnel_{exc.status}", str(exc))
        raise
    except MeshError as exc:
        observed.refused("hbone_failed", str(exc))
        raise
