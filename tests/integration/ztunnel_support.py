"""Helpers for ztunnel's tests on the shared local cluster: traffic from inside pods, the
node ztunnels' admin endpoints, packet captures on the fabric bridge."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import trio

from common.kube import KubeClient, Namespace, Pod
from common.netns import call_in_netns
from common.translate import NETNS_ANNOTATION
from deploy.local import network
from deploy.local.netns import NETNS_DIR
from tests.integration.conftest import LocalCluster, wait_for

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def netns_of(pod: Pod) -> str:
    path = (pod.metadata.annotations or {}).get(NETNS_ANNOTATION)
    assert path, f"pod {pod.metadata.name} has no {NETNS_ANNOTATION} annotation"
    return path


async def open_from(netns: str, ip: str, port: int,
                    timeout: float = 5.0) -> trio.SocketStream:  # noqa: ASYNC109
    """A TCP connection made inside ``netns`` (an application's socket: no mark)."""
    sock = trio.socket.from_stdlib_socket(call_in_netns(netns, socket.socket))
    with trio.fail_after(timeout):
        await sock.connect((ip, port))
    return trio.SocketStream(sock)


async def fabric_get(cluster: LocalCluster, ip: str, port: int, path: str) -> str:
    """GET from the cluster's fabric namespace, which routes to every pod (a pod's admin
    and metrics ports, outside any pod's capture); the body as text."""
    fabric = str(NETNS_DIR / network.Names(cluster.name).fabric)
    stream = await open_from(fabric, ip, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nhost: {ip}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data.partition(b"\r\n\r\n")[2].decode(errors="replace")


async def http_get(netns: str, ip: str, port: int, path: str = "/", *,
                   body: bytes = b"", timeout: float = 5.0  # noqa: ASYNC109
                   ) -> dict[str, Any]:
    """One HTTP/1.1 request to the echo app from inside ``netns``; its JSON answer."""
    stream = await open_from(netns, ip, port, timeout)
    async with stream:
        method = "POST" if body else "GET"
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: {ip}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body)
        data = bytearray()
        with trio.fail_after(timeout):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    answer: dict[str, Any] = json.loads(payload)
    return answer


async def reachable(netns: str, ip: str, port: int, path: str = "/") -> dict[str, Any] | None:
    """The answer, or None when the connection is refused, reset or times out."""
    try:
        return await http_get(netns, ip, port, path, timeout=3.0)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError,
            ValueError):
        return None


async def serving(client: Pod, server: Pod, port: int = 8080, within: float = 20.0) -> None:
    """Until ``server``'s application answers ``client``.

    A captured pod's kubelet probe is answered by ztunnel's 15006 listener, so Ready
    does not yet mean the application listens (Istio exempts probes from capture; the
    local cluster does not yet).
    """
    assert server.status.pod_ip

    async def probe() -> bool:
        return await reachable(netns_of(client), str(server.status.pod_ip), port) is not None
    await wait_for(probe, within, what=f"{server.metadata.name} answering")


def node_netns(cluster: LocalCluster, node: str) -> str:
    index = int(node.rsplit("-", 1)[1])
    return f"/run/netns/{network.Names(cluster.name).node(index)}"


async def config_dump(cluster: LocalCluster, node: str) -> dict[str, Any]:
    """The node ztunnel's ``/config_dump`` (admin port, inside the node's namespace)."""
    stream = await open_from(node_netns(cluster, node), "127.0.0.1", 15000)
    async with stream:
        await stream.send_all(b"GET /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    dump: dict[str, Any] = json.loads(bytes(data).partition(b"\r\n\r\n")[2])
    return dump


async def wait_enrolled(cluster: LocalCluster, pod: Pod, enrolled: bool = True,
                        within: float = 20.0) -> None:
    """Until the pod's node ztunnel has (or no longer has) the pod enrolled."""
    node = pod.spec.node_name
    assert node

    async def probe() -> bool:
        try:
            dump = await config_dump(cluster, node)
        except (OSError, trio.BrokenResourceError, ValueError):
            return False  # the node's ztunnel is (re)starting
        uids = {p["uid"] for p in dump["enrolled_pods"]}
        return (pod.metadata.uid in uids) == enrolled
    await wait_for(probe, within, what=f"pod {pod.metadata.name} enrolled={enrolled}")


async def label_namespace(kube: KubeClient, namespace: str, labels: dict[str, str | None]
                          ) -> None:
    await kube.patch(Namespace, namespace, {"metadata": {"labels": labels}})


class Capture:
    """``tcpdump`` on every port of the fabric bridge (each cross-node packet crosses it;
    the bridge device itself does not see frames it forwards between ports)."""

    def __init__(self, cluster: LocalCluster, path: Path, hosts: list[str]) -> None:
        fabric = network.Names(cluster.name).fabric
        expr = " or ".join(f"host {h}" for h in hosts)
        self.path = path
        self.proc = subprocess.Popen(
            # -Z root: tcpdump would drop to its own user, who cannot write tmp_path;
            # --immediate-mode: packets are written as they come, not in ring blocks.
            ["ip", "netns", "exec", fabric, "timeout", "60", "tcpdump", "-Z", "root",
             "--immediate-mode", "-i", "any", "-U", "-n", "-s", "0", "-c", "20000",
             "-w", str(path), expr],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def started(self) -> None:
        """tcpdump prints 'listening on' once the capture runs."""
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def wait_line() -> str:
            lines = []
            for _ in range(5):  # a warning or two may come first
                line = stderr.readline().decode()
                lines.append(line)
                if "listening on" in line or not line:
                    break
            return "".join(lines)
        text = await trio.to_thread.run_sync(wait_line)
        assert "listening on" in text, text

    def stop(self) -> list[str]:
        """Stop the capture and return its packets as ``tcpdump -nn -r`` lines."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        out = subprocess.run(["tcpdump", "-nn", "-r", str(self.path)], capture_output=True,
                             text=True, check=False)
        return [line for line in out.stdout.splitlines() if " IP " in line]
