"""Re-checking live inbound connections against a new snapshot (no sockets)."""

from __future__ import annotations

from common.identity import SpiffeId
from tests.unit.ztunnel_helpers import snapshot_of, workload
from ztunnel.proxy.live import LiveConnection, LiveConnections

SLEEP = SpiffeId("cluster.local", "client", "sleep")
OTHER = SpiffeId("cluster.local", "client", "other")


async def test_recheck_cancels_only_connections_the_new_policy_denies() -> None:
    server = workload("echo", namespace="server", sa="echo", node="node2")
    live = LiveConnections()
    denied = LiveConnection(server.uid, SLEEP, "10.9.1.1", server.ips[0], 8080, False)
    kept = LiveConnection(server.uid, OTHER, "10.9.1.2", server.ips[0], 8080, False)
    live.add(denied)
    live.add(kept)
    assert live.recheck(snapshot_of(1, [server])) == []
    deny_sleep = ("server", "deny-sleep", {"action": "DENY", "rules": [{"from": [{"source": {
        "principals": ["cluster.local/ns/client/sa/sleep"]}}]}]})
    closed = live.recheck(snapshot_of(2, [server], authz=[deny_sleep]))
    assert closed == [denied]
    assert denied.scope.cancel_called and not kept.scope.cancel_called
    assert denied.closed_reason is not None and "deny-sleep" in denied.closed_reason
    assert len(live) == 1


async def test_recheck_applies_strict_peer_authentication_to_plaintext_connections() -> None:
    server = workload("echo", namespace="server", sa="echo", node="node2")
    live = LiveConnections()
    plain = LiveConnection(server.uid, None, "10.9.1.3", server.ips[0], 8080, True)
    mtls = LiveConnection(server.uid, SLEEP, "10.9.1.1", server.ips[0], 8080, False)
    live.add(plain)
    live.add(mtls)
    strict = ("server", "strict", {"mtls": {"mode": "STRICT"}})
    assert live.recheck(snapshot_of(2, [server], peer_auth=[strict])) == [plain]


async def test_recheck_leaves_connections_of_pods_that_left_to_their_release() -> None:
    server = workload("echo", namespace="server", sa="echo", node="node2")
    live = LiveConnections()
    conn = LiveConnection(server.uid, SLEEP, "10.9.1.1", server.ips[0], 8080, False)
    live.add(conn)
    assert live.recheck(snapshot_of(2, [])) == []
    assert not conn.scope.cancel_called
