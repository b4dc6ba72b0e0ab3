"""The in-pod capture rules, checked in two real network namespaces joined by veth."""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from common.netns import call_in_netns
from ztunnel.inpod.install import install_capture, remove_capture
from ztunnel.inpod.origdst import original_destination
from ztunnel.inpod.rules import PROBE_SOURCE, RULE_PRIORITY, ZTUNNEL_MARK, ip_route_commands

pytestmark = pytest.mark.netns

POD_IP, PEER_IP = "10.213.0.2", "10.213.0.1"


@dataclass
class Pair:
    pod: str
    peer: str


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = secrets.token_hex(3)
    pod, peer = f"pa-t{tag}-pod", f"pa-t{tag}-peer"
    _sh("ip", "netns", "add", pod)
    _sh("ip", "netns", "add", peer)
    try:
        _sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", peer)
        for ns, ip in ((pod, POD_IP), (peer, PEER_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield Pair(f"/run/netns/{pod}", f"/run/netns/{peer}")
    finally:
        subprocess.run(["ip", "netns", "del", pod], check=False)
        subprocess.run(["ip", "netns", "del", peer], check=False)


def _listen(ns: str, ip: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(8)
        s.settimeout(5)
        return s
    return call_in_netns(ns, make)


def _dial(ns: str, dst: tuple[str, int], mark: bool = False,
          source: str | None = None) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.settimeout(5)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        if source:
            s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            s.bind((source, 0))
        s.connect(dst)
        return s
    return call_in_netns(ns, make)


async def test_capture_redirects_outbound_inbound_and_spares_ztunnel(pair: Pair) -> None:
    await install_capture(pair.pod)
    out_l = _listen(pair.pod, "0.0.0.0", 15001)
    in_l = _listen(pair.pod, "0.0.0.0", 15006)
    hbone_l = _listen(pair.pod, "0.0.0.0", 15008)
    app_l = _listen(pair.pod, "0.0.0.0", 8080)
    dest_l = _listen(pair.peer, PEER_IP, 9000)
    with out_l, in_l, hbone_l, app_l, dest_l:
        # The application's outbound TCP lands on 15001 with its destination intact.
        with _dial(pair.pod, (PEER_IP, 9000)):
            conn, _ = out_l.accept()
            with conn:
                assert original_destination(conn) == (PEER_IP, 9000)
        # ztunnel's own (marked) socket goes straight out.
        with _dial(pair.pod, (PEER_IP, 9000), mark=True):
            conn, src = dest_l.accept()
            conn.close()
            assert src[0] == POD_IP
        # Inbound plaintext to an application port lands on 15006.
        with _dial(pair.peer, (POD_IP, 8080)):
            conn, src = in_l.accept()
            with conn:
                assert src[0] == PEER_IP
                assert original_destination(conn) == (POD_IP, 8080)
        # A kubelet probe (from the probe address) reaches the application itself.
        _sh("ip", "-n", pair.peer.rsplit("/", 1)[1], "addr", "add", f"{PROBE_SOURCE}/32",
            "dev", "eth0")
        _sh("ip", "-n", pair.pod.rsplit("/", 1)[1], "route", "add", PROBE_SOURCE, "dev", "eth0")
        with _dial(pair.peer, (POD_IP, 8080), source=PROBE_SOURCE):
            conn, src = app_l.accept()
            conn.close()
            assert src[0] == PROBE_SOURCE
        # HBONE is served directly.
        with _dial(pair.peer, (POD_IP, 15008)):
            conn, _ = hbone_l.accept()
            conn.close()
        # ztunnel's inbound connect keeps the real source IP, and replies come back to it.
        with _dial(pair.pod, (POD_IP, 8080), mark=True, source=PEER_IP) as spoofed:
            conn, src = app_l.accept()
            with conn:
                assert src[0] == PEER_IP
                conn.sendall(b"reply")
                assert spoofed.recv(16) == b"reply"

    await remove_capture(pair.pod)
    dest_l = _listen(pair.peer, PEER_IP, 9000)
    with dest_l, _dial(pair.pod, (PEER_IP, 9000)):
        conn, src = dest_l.accept()
        conn.close()
        assert src[0] == POD_IP


async def test_installing_again_over_live_rules_keeps_replies_steered(pair: Pair) -> None:
    """A restarted ztunnel installs over the rules its predecessor left while the pod's
    connections carry traffic: nothing is removed first, so a transparent connection
    exchanging messages all the while loses none (a reply routed away meets a reset),
    and the pod ends with one steering rule per family, not two."""
    assert not any("del" in cmd for cmd in ip_route_commands(add=True))
    await install_capture(pair.pod)
    app_l = _listen(pair.pod, "0.0.0.0", 8080)
    with app_l, _dial(pair.pod, (POD_IP, 8080), mark=True, source=PEER_IP) as spoofed:
        conn, _ = app_l.accept()
        done = threading.Event()

        def ping_pong() -> int:
            exchanges = 0
            while not done.is_set() and exchanges < 1_000_000:
                conn.sendall(b"reply")
                assert spoofed.recv(16) == b"reply"
                exchanges += 1
            return exchanges

        with conn:
            async with trio.open_nursery() as nursery:
                async def exchange() -> None:
                    assert await trio.to_thread.run_sync(ping_pong) > 0

                nursery.start_soon(exchange)
                try:
                    for _ in range(3):
                        await install_capture(pair.pod)
                finally:
                    done.set()
    shown = await trio.run_process(["ip", "-n", pair.pod.rsplit("/", 1)[1], "-4", "rule",
                                    "show", "pref", str(RULE_PRIORITY)], capture_stdout=True)
    rules = shown.stdout.decode()
    assert len(rules.strip().splitlines()) == 1, rules
    await remove_capture(pair.pod)


def _tracked(ns: str) -> str:
    """The pod namespace's conntrack table (what the kernel tracks for it)."""
    name = ns.rsplit("/", 1)[1]
    return subprocess.run(["ip", "netns", "exec", name, "cat", "/proc/net/nf_conntrack"],
                          check=True, capture_output=True, text=True).stdout


async def test_hbone_is_not_tracked_while_captured_traffic_is(pair: Pair) -> None:
    await install_capture(pair.pod)
    hbone_l = _listen(pair.pod, "0.0.0.0", 15008)
    out_l = _listen(pair.pod, "0.0.0.0", 15001)
    peer_hbone_l = _listen(pair.peer, PEER_IP, 15008)
    # HBONE in (a peer ztunnel dialling this pod) and out (ztunnel's marked dial), each
    # with data both ways: no conntrack entry in the pod for either.
    with hbone_l, out_l, peer_hbone_l, _dial(pair.peer, (POD_IP, 15008)) as inbound, \
            _dial(pair.pod, (PEER_IP, 15008), mark=True) as outbound:
        for client, listener in ((inbound, hbone_l), (outbound, peer_hbone_l)):
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
        # The application's redirected connection still is (the redirect needs it).
        with _dial(pair.pod, (PEER_IP, 9000)):
            conn, _ = out_l.accept()
            conn.close()
            table = _tracked(pair.pod)
    assert "dport=9000" in table
    assert "port=15008" not in table
