"""On the shared local cluster: the waypoint and the ingress gateway write their own
Gateway's status (nothing else does: the local Gateway controller writes none), and
follow a new generation of the Gateway."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from common.kube import Gateway, HTTPRoute, KubeClient, Pod, Service
from deploy.waypoint_objects import GATEWAY_NAME_LABEL, condition_of
from tests.integration.conftest import LocalCluster, wait_for

pytestmark = pytest.mark.netns


async def _ambientctl(cluster: LocalCluster, *args: str) -> str:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(*args, timeout=120))
    assert done.returncode == 0, f"ambientctl {' '.join(args)}: {done.stderr}"
    return done.stdout


async def programmed_at(kube: KubeClient, namespace: str, name: str,
                        generation: int | None = None) -> Gateway | None:
    """The Gateway once Programmed=True for its current generation (or ``generation``)."""
    gw = await kube.get(Gateway, name, namespace)
    cond = condition_of(gw, "Programmed")
    want = generation if generation is not None else gw.metadata.generation
    if cond is None or cond["status"] != "True" or cond["observedGeneration"] != want or \
            gw.metadata.generation != want:
        return None
    return gw


async def written_by_its_pod(cluster: LocalCluster, kube: KubeClient, namespace: str,
                             name: str) -> str:
    """The log of the Gateway's pod, once it says it wrote the status."""
    async def logged() -> str | None:
        pods = (await kube.list(Pod, namespace,
                                label_selector=f"{GATEWAY_NAME_LABEL}={name}")).items
        for pod in pods:
            path = cluster.state_dir / "logs" / namespace / f"{pod.metadata.name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            if "gateway_status_written" in text:
                return text
        return None
    return await wait_for(logged, within=30, what=f"{name}'s pod logging its status write")


async def test_the_waypoint_writes_its_gateway_status_and_follows_generations(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await _ambientctl(cluster, "waypoint", "apply", "-n", namespace)
    gw = await wait_for(lambda: programmed_at(kube, namespace, "waypoint"), within=90,
                        what="waypoint Gateway Programmed")
    svc = await kube.get(Service, "waypoint", namespace)
    assert gw.status["addresses"] == [{"type": "IPAddress", "value": svc.spec.cluster_ip}]
    accepted = condition_of(gw, "Accepted")
    assert accepted is not None and (accepted["status"], accepted["reason"]) == \
        ("True", "Accepted")
    (listener,) = gw.status["listeners"]
    assert listener["name"] == "mesh" and listener["attachedRoutes"] == 0
    await written_by_its_pod(cluster, kube, namespace, "waypoint")

    # A spec change: a new generation, which the waypoint observes and reports.
    before = gw.metadata.generation or 1
    since = {c["type"]: c["lastTransitionTime"] for c in gw.status["conditions"]}
    await kube.patch(Gateway, "waypoint", {"spec": {"listeners": [
        {"name": "mesh", "port": 15008, "protocol": "HBONE",
         "allowedRoutes": {"namespaces": {"from": "All"}}}]}}, namespace)
    gw = await wait_for(lambda: programmed_at(kube, namespace, "waypoint", before + 1),
                        within=30, what=f"generation {before + 1} observed")
    # Still accepted and programmed: the transition times stay.
    assert {c["type"]: c["lastTransitionTime"] for c in gw.status["conditions"]} == since

    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(
        "waypoint", "status", "-n", namespace, "--wait-timeout", "10s", timeout=30))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:4] == ["waypoint", "True", "Programmed",
                                                        "Programmed"]


async def test_the_ingress_gateway_counts_its_attached_routes(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(HTTPRoute.model_validate({
        "metadata": {"name": "to-echo", "namespace": namespace},
        "spec": {"parentRefs": [{"name": "edge", "sectionName": "http"}],
                 "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}}))
    try:
        applied = await _ambientctl(cluster, "gateway", "apply", "-n", namespace, "--name",
                                    "edge", "--http-port", "8080", "--wait",
                                    "--wait-timeout", "90s")
        assert f"gateway {namespace}/edge is ready (pods ready 1/1, address " in applied

        async def counted() -> Gateway | None:
            gw = await programmed_at(kube, namespace, "edge")
            if gw is None:
                return None
            by_name: dict[str, Any] = {x["name"]: x for x in gw.status.get("listeners") or []}
            return gw if by_name.get("http", {}).get("attachedRoutes") == 1 else None

        gw = await wait_for(counted, within=90, what="ingress Programmed with 1 route")
        svc = await kube.get(Service, "edge", namespace)
        assert gw.status["addresses"] == [{"type": "IPAddress", "value": svc.spec.cluster_ip}]
        (listener,) = gw.status["listeners"]
        assert listener["supportedKinds"] == [{"group": "gateway.networking.k8s.io",
                                               "kind": "HTTPRoute"}]
        await written_by_its_pod(cluster, kube, namespace, "edge")
        status = await _ambientctl(cluster, "gateway", "status", "-n", namespace, "--name",
                                   "edge", "--wait-timeout", "10s")
        assert f"address {svc.spec.cluster_ip}" in status

        # A second route: the count follows without any change to the Gateway.
        await kube.create(HTTPRoute.model_validate({
            "metadata": {"name": "also", "namespace": namespace},
            "spec": {"parentRefs": [{"name": "edge"}],
                     "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}}))

        async def two() -> bool:
            gw = await kube.get(Gateway, "edge", namespace)
            return [x["attachedRoutes"] for x in gw.status.get("listeners") or []] == [2]
        await wait_for(two, within=30, what="attachedRoutes 2")
    finally:
        await trio.to_thread.run_sync(lambda: cluster.ambientctl(
            "gateway", "delete", "-n", namespace, "--name", "edge", timeout=60))
