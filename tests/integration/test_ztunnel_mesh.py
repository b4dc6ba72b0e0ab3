"""ztunnel on the shared local cluster: HBONE between nodes, enrolment, L4 policy, bulk."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from common.kube import AuthorizationPolicy, KubeClient, Namespace, Pod
from tests.integration.conftest import (
    LocalCluster,
    echo_service,
    ready_pods,
    service_ip,
    wait_for,
)
from tests.integration.ztunnel_support import (
    AMBIENT,
    Capture,
    http_get,
    label_namespace,
    netns_of,
    open_from,
    reachable,
    serving,
    wait_enrolled,
)

pytestmark = [pytest.mark.netns]

_PACKET = re.compile(r" IP (\S+)\.(\d+) > (\S+)\.(\d+):")


def pinned(name: str, namespace: str, node: str, *, sa: str | None = None,
           env: dict[str, str] | None = None) -> Pod:
    spec: dict[str, Any] = {"nodeName": node, "containers": [{
        "name": "echo", "image": "ambient/echo", "ports": [{"containerPort": 8080}],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}]}
    if sa:
        spec["serviceAccountName"] = sa
    return Pod.model_validate({"metadata": {"name": name, "namespace": namespace,
                                            "labels": {"app": name}}, "spec": spec})


async def start(cluster: LocalCluster, kube: KubeClient, namespace: str,
                *pods: Pod) -> dict[str, Pod]:
    for pod in pods:
        await kube.create(pod)
    ready = await ready_pods(cluster, namespace, len(pods))
    return {p.metadata.name: p for p in ready}


def ip(pod: Pod) -> str:
    assert pod.status.pod_ip
    return pod.status.pod_ip


def source_ip(answer: dict[str, Any]) -> str:
    return str(answer["source"]).rsplit(":", 1)[0]


async def test_cross_node_pod_and_service_traffic_is_hbone_only_and_keeps_the_source_ip(
        cluster: LocalCluster, kube: KubeClient, namespace: str, tmp_path: Path) -> None:
    await label_namespace(kube, namespace, AMBIENT)
    pods = await start(cluster, kube, namespace, pinned("server", namespace, "node-1"),
                       pinned("client", namespace, "node-0"))
    await kube.create(echo_service("server", namespace, {"app": "server"}))
    vip = await service_ip(kube, namespace, "server")
    client, server = pods["client"], pods["server"]
    await wait_enrolled(cluster, server)
    await wait_enrolled(cluster, client)
    await serving(client, server)
    marker = f"plaintext-marker-{uuid.uuid4().hex}".encode()
    capture = Capture(cluster, tmp_path / "fabric.pcap", [ip(client), ip(server)])
    try:
        with trio.fail_after(10):
            await capture.started()
        direct = await http_get(netns_of(client), ip(server), 8080, "/pod", body=marker)
        via_vip = await http_get(netns_of(client), vip, 8080, "/svc", body=marker)
    finally:
        packets = capture.stop()
    assert direct["pod"] == via_vip["pod"] == "server"
    assert source_ip(direct) == source_ip(via_vip) == ip(client)
    assert packets, "no packet between the pods crossed the fabric bridge"
    for line in packets:
        match = _PACKET.search(line)
        assert match, line
        ports = {int(match.group(2)), int(match.group(4))}
        assert 15008 in ports, f"a packet between the pods not on HBONE port 15008: {line}"
    assert marker not in (tmp_path / "fabric.pcap").read_bytes()


async def test_enrol_and_release_a_namespace_while_traffic_flows(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    outside = f"{namespace}-out"
    await kube.create(Namespace.model_validate({"metadata": {"name": outside}}))
    try:
        inside = await start(cluster, kube, namespace, pinned("server", namespace, "node-1"),
                             pinned("client", namespace, "node-0"))
        other = await start(cluster, kube, outside, pinned("server", outside, "node-1"),
                            pinned("client", outside, "node-0"))
        outside_failures: list[str] = []
        outside_ok = 0

        async def outsider_traffic() -> None:
            nonlocal outside_ok
            while True:
                answer = await reachable(netns_of(other["client"]), ip(other["server"]), 8080)
                if answer is None or source_ip(answer) != ip(other["client"]):
                    outside_failures.append(repr(answer))
                else:
                    outside_ok += 1
                await trio.sleep(0.05)

        async def inside_works() -> bool:
            answer = await reachable(netns_of(inside["client"]), ip(inside["server"]), 8080)
            return answer is not None and source_ip(answer) == ip(inside["client"])

        await serving(inside["client"], inside["server"])
        await serving(other["client"], other["server"])
        server_ns = netns_of(inside["server"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outsider_traffic)
            await label_namespace(kube, namespace, AMBIENT)
            for pod in inside.values():
                await wait_enrolled(cluster, pod)
            await wait_for(inside_works, 15, what="traffic in the enrolled namespace")
            assert "pyambient_inpod" in _nft_tables(server_ns)
            await label_namespace(kube, namespace, {"istio.io/dataplane-mode": None})
            for pod in inside.values():
                await wait_enrolled(cluster, pod, enrolled=False)
            await wait_for(inside_works, 15, what="traffic after release")
            assert "pyambient_inpod" not in _nft_tables(server_ns)
            nursery.cancel_scope.cancel()
        assert outside_ok > 0
        assert outside_failures == []
    finally:
        await kube.delete(Namespace, outside)


def _nft_tables(netns: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", "nft", "list", "tables"],
                          capture_output=True, text=True, check=True).stdout


def _policy(name: str, namespace: str, spec: dict[str, Any]) -> AuthorizationPolicy:
    return AuthorizationPolicy.model_validate({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec})


async def test_authorization_policy_by_principal_and_namespace_including_a_live_change(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await label_namespace(kube, namespace, AMBIENT)
    pods = await start(cluster, kube, namespace, pinned("server", namespace, "node-1"),
                       pinned("client", namespace, "node-0"),
                       pinned("other", namespace, "node-0", sa="other"))
    for pod in pods.values():
        await wait_enrolled(cluster, pod)
    await serving(pods["client"], pods["server"])
    server = ip(pods["server"])

    async def outcome(client: str, allowed: bool) -> bool:
        answer = await reachable(netns_of(pods[client]), server, 8080)
        return (answer is not None) == allowed

    selector = {"matchLabels": {"app": "server"}}
    await kube.create(_policy("allow-other", namespace, {
        "selector": selector, "action": "ALLOW", "rules": [{"from": [{"source": {
            "principals": [f"cluster.local/ns/{namespace}/sa/other"]}}]}]}))
    await wait_for(lambda: outcome("client", False), 15, what="ALLOW by principal enforced")
    assert await outcome("other", True)

    await kube.delete(AuthorizationPolicy, "allow-other", namespace)
    await kube.create(_policy("deny-ns", namespace, {
        "selector": selector, "action": "DENY", "rules": [{"from": [{"source": {
            "namespaces": [namespace]}}]}]}))
    await wait_for(lambda: outcome("other", False), 15, what="DENY by namespace enforced")
    assert await outcome("client", False)

    await kube.delete(AuthorizationPolicy, "deny-ns", namespace)
    await wait_for(lambda: outcome("client", True), 15, what="policy removed")

    # A keep-alive connection, allowed when opened, is closed once a new policy denies it.
    stream = await open_from(netns_of(pods["client"]), server, 8080)
    async with stream:
        await stream.send_all(f"GET /live HTTP/1.1\r\nHost: {server}\r\n\r\n".encode())
        with trio.fail_after(5):
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        await kube.create(_policy("deny-client", namespace, {
            "selector": selector, "action": "DENY", "rules": [{"from": [{"source": {
                "principals": [f"cluster.local/ns/{namespace}/sa/default"]}}]}]}))
        with trio.fail_after(15):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass  # a reset closes it just as well


@pytest.mark.slow
async def test_one_gib_through_both_ztunnels_arrives_intact(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await label_namespace(kube, namespace, AMBIENT)
    pods = await start(cluster, kube, namespace,
                       pinned("server", namespace, "node-1", env={"ECHO_MODE": "tcp"}),
                       pinned("client", namespace, "node-0"))
    for pod in pods.values():
        await wait_enrolled(cluster, pod)
    await _tcp_serving(pods["client"], pods["server"])
    chunk = os.urandom(1024 * 1024)
    total = 1024 * len(chunk)
    sent_hash = hashlib.sha256()
    received_hash = hashlib.sha256()
    received = 0
    stream = await open_from(netns_of(pods["client"]), ip(pods["server"]), 8080)
    with trio.fail_after(300):
        async with stream, trio.open_nursery() as nursery:
            async def send() -> None:
                for _ in range(1024):
                    sent_hash.update(chunk)
                    await stream.send_all(chunk)
                await stream.send_eof()
            nursery.start_soon(send)
            while data := await stream.receive_some(1024 * 1024):
                received_hash.update(data)
                received += len(data)
    assert received == total
    assert received_hash.hexdigest() == sent_hash.hexdigest()


async def _tcp_serving(client: Pod, server: Pod) -> None:
    """Until the TCP-mode echo app echoes a byte back."""
    async def probe() -> bool:
        try:
            stream = await open_from(netns_of(client), ip(server), 8080, 3.0)
            async with stream:
                await stream.send_all(b"x")
                with trio.fail_after(3):
                    return await stream.receive_some(1) == b"x"
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return False
    await wait_for(probe, 20, what="tcp echo answering")
