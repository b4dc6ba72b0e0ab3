"""Inbound plaintext (15006): TCP to a local pod that did not come over HBONE.

nftables redirects every inbound TCP connection but HBONE here.  There is no peer
identity, so PeerAuthentication STRICT refuses it (the client is reset and one line
says why) and AuthorizationPolicy sees only addresses and ports; an allowed
connection goes to the application from the client's own IP, like inbound HBONE.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from common.errors import ConfigError
from common.logging import get_logger
from common.tcp import TcpStream
from ztunnel.decide import Deny, decide_inbound, format_authority
from ztunnel.inpod.origdst import original_destination
from ztunnel.proxy.dial import reset
from ztunnel.proxy.inbound import connect_and_relay
from ztunnel.proxy.observe import Observed, inbound_labels

if TYPE_CHECKING:
    from ztunnel.proxy.pod import EnrolledPod

_log = get_logger("ztunnel.inbound_plaintext")


async def handle_plaintext(pod: EnrolledPod, sock: socket.socket,
                           peer: tuple[str, int]) -> None:
    """Serve one redirected inbound plaintext connection; ``sock`` is consumed."""
    state = pod.state
    src = format_authority(*peer)
    try:
        dst_ip, dst_port = original_destination(sock)
    except ConfigError as exc:
        state.metrics.refusal("inbound_plaintext", "no_original_destination")
        _log.warning("plaintext refused", pod=pod.name, src=src, reason=str(exc))
        reset(sock)
        return
    snapshot = state.snapshot()
    local = snapshot.workloads_by_uid.get(pod.uid)
    if local is None:
        state.metrics.refusal("inbound_plaintext", "pod_leaving")
        reset(sock)
        return
    observed = Observed(state.metrics, "inbound_plaintext", src,
                        format_authority(dst_ip, dst_port),
                        inbound_labels(local, snapshot.workloads_by_ip.get(peer[0]), None))
    outcome = decide_inbound(snapshot, local, dst_ip, dst_port, None, peer[0], plaintext=True)
    if isinstance(outcome, Deny):
        # A policy denial carries the authorization decision; the plaintext refusal
        # (PeerAuthentication STRICT) is the only 401 without one.
        if outcome.status == 401 and outcome.decision is None:
            reason = f"plaintext refused: PeerAuthentication STRICT on {pod.name}"
            observed.refused("plaintext_strict", reason)
        else:
            observed.refused("policy_denied", outcome.reason)
        reset(sock)
        return
    client = TcpStream(sock)
    async with client:
        await connect_and_relay(pod, peer[0], dst_ip, dst_port, None, True, observed,
                                client=client)
