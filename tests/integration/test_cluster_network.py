"""Pod-to-pod, pod-to-VIP and DNS on the shared local cluster."""

from __future__ import annotations

import pytest

from common.kube import KubeClient, Pod
from tests.integration.conftest import (
    LocalCluster,
    client_pod,
    echo_deployment,
    echo_service,
    fetch,
    json_of,
    ready_pods,
    service_ip,
)

pytestmark = [pytest.mark.netns]


async def _setup(cluster: LocalCluster, kube: KubeClient, ns: str) -> tuple[Pod, list[Pod], str]:
    """A client pod on node-0 and two echo pods (one per node) behind Service ``echo``."""
    await kube.create(client_pod("client", ns, "node-0"))
    await kube.create(echo_deployment("echo", ns, replicas=2, labels={"app": "echo"}))
    await kube.create(echo_service("echo", ns, {"app": "echo"}))
    echoes = await ready_pods(cluster, ns, 2, "app=echo")
    client = (await ready_pods(cluster, ns, 1, "app=client"))[0]
    return client, echoes, await service_ip(kube, ns, "echo")


async def test_pod_to_pod_across_nodes_keeps_the_client_address(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    client, echoes, _ = await _setup(cluster, kube, namespace)
    assert {p.spec.node_name for p in echoes} == {"node-0", "node-1"}
    remote = next(p for p in echoes if p.spec.node_name == "node-1")
    answer = json_of(await cluster.exec(
        namespace, "client", *fetch(f"http://{remote.status.pod_ip}:8080/hi")))
    assert answer["pod"] == remote.metadata.name
    assert answer["node"] == "node-1" and answer["namespace"] == namespace
    assert answer["path"] == "/hi"
    assert answer["source"].split(":")[0] == client.status.pod_ip


async def test_service_vip_balances_over_endpoints_on_both_nodes(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    client, echoes, vip = await _setup(cluster, kube, namespace)
    seen = set()
    for _ in range(12):
        answer = json_of(await cluster.exec(namespace, "client", *fetch(f"http://{vip}:8080/")))
        assert answer["source"].split(":")[0] == client.status.pod_ip
        seen.add(answer["pod"])
        if len(seen) == 2:
            break
    assert seen == {p.metadata.name for p in echoes}


@pytest.mark.parametrize("form", ["echo", "echo.{ns}", "echo.{ns}.svc",
                                  "echo.{ns}.svc.cluster.local"])
async def test_service_names_resolve_inside_pods(
        cluster: LocalCluster, kube: KubeClient, namespace: str, form: str) -> None:
    _, _, vip = await _setup(cluster, kube, namespace)
    host = form.format(ns=namespace)
    done = await cluster.exec(namespace, "client", "python3", "-c",
                              f"import socket; print(socket.gethostbyname({host!r}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == vip
    answer = json_of(await cluster.exec(namespace, "client", *fetch(f"http://{host}:8080/")))
    assert answer["host"] == f"{host}:8080"


async def test_unknown_service_name_does_not_resolve(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(client_pod("client", namespace, "node-1"))
    await ready_pods(cluster, namespace, 1)
    done = await cluster.exec(namespace, "client", "python3", "-c",
                              "import socket; socket.gethostbyname('nosuch')")
    assert done.returncode != 0
    assert "gaierror" in done.stderr


async def test_pods_see_the_api_server_through_the_kubernetes_service(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(client_pod("client", namespace, "node-0"))
    await ready_pods(cluster, namespace, 1)
    done = await cluster.exec(namespace, "client", *fetch(
        f"http://kubernetes.default:443/api/v1/namespaces/{namespace}"))
    assert json_of(done)["metadata"]["name"] == namespace
