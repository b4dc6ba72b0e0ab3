"""ztunnel's locality preference for services without a waypoint (issue 6), on the shared
local cluster: node-0 is region1/zone-a, node-1 region1/zone-b.

Istio's ztunnel picks a service endpoint at random among the healthy ones, unless the
Service asks for locality: ``spec.trafficDistribution: PreferClose`` (or the annotation
``networking.istio.io/traffic-distribution: PreferClose``) makes istiod send a
``loadBalancing`` of mode FAILOVER over network, region, zone and subzone, so ztunnel
takes the endpoints that match the most of those scopes, in order, and the others only
when none of those is healthy.

The client is a captured pod on node-0 dialling the Service's VIP on new connections
(one request each, ``Connection: close``); the echo app names the pod that answered.
Every wait reads what the client's node ztunnel holds (its ``/config_dump``: the
service's endpoints and their readiness) rather than inferring it from answers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from common.kube import KubeClient, Pod, Service
from tests.integration.conftest import LocalCluster, ready_pods, service_ip, wait_for
from tests.integration.ztunnel_support import (
    AMBIENT,
    config_dump,
    http_get,
    label_namespace,
    netns_of,
    serving,
    wait_enrolled,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 8080
SERVICE = "backend"
ZONE_A, ZONE_B = "node-0", "node-1"
# Connections per phase.  With two pods per zone, a spread pick lands 40 times in one zone
# with probability 2 * 0.5**40: never, in practice.
CONNECTIONS = 40


def server_pod(name: str, namespace: str, node: str) -> Pod:
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": SERVICE}},
        "spec": {"nodeName": node, "containers": [{
            "name": "echo", "image": "ambient/echo", "ports": [{"containerPort": PORT}]}]}})


def client_pod(namespace: str) -> Pod:
    return Pod.model_validate({
        "metadata": {"name": "client", "namespace": namespace, "labels": {"app": "client"}},
        "spec": {"nodeName": ZONE_A, "containers": [{"name": "c", "image": "ambient/echo"}]}})


def backend_service(namespace: str, spec: dict[str, Any]) -> Service:
    # No waypoint in the namespace, and the label says so explicitly: L4 only.
    return Service.model_validate({
        "metadata": {"name": SERVICE, "namespace": namespace,
                     "labels": {"istio.io/use-waypoint": "none"}},
        "spec": {"selector": {"app": SERVICE},
                 "ports": [{"name": "http", "port": PORT, "targetPort": PORT}], **spec}})


async def start_servers(cluster: LocalCluster, kube: KubeClient, namespace: str,
                        client: Pod, placement: dict[str, str]) -> dict[str, Pod]:
    """Create the pods ``name -> node``; return them once Ready, enrolled and answering."""
    for name, node in placement.items():
        await kube.create(server_pod(name, namespace, node))
    wanted = set(placement)

    async def probe() -> dict[str, Pod] | None:
        pods = (await kube.list(Pod, namespace, label_selector=f"app={SERVICE}")).items
        found = {p.metadata.name: p for p in pods
                 if p.metadata.name in wanted and p.status.pod_ip
                 and any(c.type == "Ready" and c.status == "True"
                         for c in p.status.conditions or [])}
        return found if len(found) == len(wanted) else None
    pods = await wait_for(probe, 90, what=f"pods {sorted(wanted)} Ready")
    for pod in pods.values():
        await wait_enrolled(cluster, pod)
        await serving(client, pod)
    return pods


async def wait_ready_endpoints(cluster: LocalCluster, namespace: str, ips: set[str],
                               within: float = 30.0) -> None:
    """Until the client's node ztunnel holds exactly ``ips`` as the service's ready
    endpoints (what its next endpoint pick chooses from)."""
    seen: list[object] = []

    async def probe() -> bool:
        try:
            dump = await config_dump(cluster, ZONE_A)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
            return False  # the node's ztunnel is (re)starting
        for svc in dump["services"]:
            if svc["namespace"] == namespace and svc["name"] == SERVICE:
                seen[:] = svc["endpoints"]
                return {e["ip"] for e in svc["endpoints"] if e["ready"]} == ips
        return False
    try:
        await wait_for(probe, within, what=f"ready endpoints {sorted(ips)} at {ZONE_A}'s ztunnel")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it holds {seen}") from None


async def answering_pods(client: Pod, vip: str) -> Counter[str]:
    """Which pod answered each of CONNECTIONS new connections to the VIP."""
    netns = netns_of(client)
    answers: Counter[str] = Counter()
    with trio.fail_after(60):
        for _ in range(CONNECTIONS):
            answers[str((await http_get(netns, vip, PORT))["pod"])] += 1
    return answers


def ips(pods: dict[str, Pod]) -> set[str]:
    return {str(p.status.pod_ip) for p in pods.values()}


async def mesh(cluster: LocalCluster, kube: KubeClient, namespace: str,
               spec: dict[str, Any]) -> tuple[Pod, str, dict[str, Pod], dict[str, Pod]]:
    """An enrolled namespace: the client on node-0, two backends per zone, the Service.

    Returns the client, the VIP, the zone-a pods and the zone-b pods, once the client's
    ztunnel holds all four as ready endpoints."""
    await label_namespace(kube, namespace, {**AMBIENT})
    await kube.create(client_pod(namespace))
    (client,) = await ready_pods(cluster, namespace, 1, label_selector="app=client")
    await wait_enrolled(cluster, client)
    await kube.create(backend_service(namespace, spec))
    vip = await service_ip(kube, namespace, SERVICE)
    pods = await start_servers(cluster, kube, namespace, client,
                               {"a-0": ZONE_A, "a-1": ZONE_A, "b-0": ZONE_B, "b-1": ZONE_B})
    zone_a = {n: p for n, p in pods.items() if n.startswith("a-")}
    zone_b = {n: p for n, p in pods.items() if n.startswith("b-")}
    await wait_ready_endpoints(cluster, namespace, ips(pods))
    return client, vip, zone_a, zone_b


async def test_prefer_close_service_keeps_l4_traffic_in_the_client_zone_and_fails_over(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    client, vip, zone_a, zone_b = await mesh(cluster, kube, namespace,
                                             {"trafficDistribution": "PreferClose"})

    answers = await answering_pods(client, vip)
    assert set(answers) == set(zone_a), f"zone-a pods only, both of them: {answers}"

    for name in zone_a:
        await kube.delete(Pod, name, namespace)
    await wait_ready_endpoints(cluster, namespace, ips(zone_b))
    answers = await answering_pods(client, vip)
    assert set(answers) == set(zone_b), f"zone-b serves once zone-a is gone: {answers}"

    back = await start_servers(cluster, kube, namespace, client,
                               {"a-2": ZONE_A, "a-3": ZONE_A})
    await wait_ready_endpoints(cluster, namespace, ips(back) | ips(zone_b))
    answers = await answering_pods(client, vip)
    assert set(answers) == set(back), f"back to zone-a once it is Ready again: {answers}"


async def test_service_without_traffic_distribution_spreads_over_zones(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    client, vip, zone_a, zone_b = await mesh(cluster, kube, namespace, {})

    answers = await answering_pods(client, vip)
    in_a = sum(n for pod, n in answers.items() if pod in zone_a)
    in_b = sum(n for pod, n in answers.items() if pod in zone_b)
    assert in_a + in_b == CONNECTIONS, answers
    assert in_a and in_b, f"both zones serve a Service without PreferClose: {answers}"
