"""How long the local cluster takes to run 100 echo pods (figure printed with -s)."""

from __future__ import annotations

import pytest
import trio

from common.kube import Deployment, KubeClient, Pod
from deploy.local import netns, network
from tests.integration.conftest import LocalCluster, echo_deployment, ready_pods, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PODS = 100


async def test_a_deployment_scaled_to_100_runs_100_pods_with_distinct_ips(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    started = trio.current_time()
    await kube.create(echo_deployment("many", namespace, replicas=PODS))
    pods = await ready_pods(cluster, namespace, PODS, within=240)
    elapsed = trio.current_time() - started
    print(f"\n{PODS} pods Running and Ready with IPs in {elapsed:.1f}s "
          f"(cluster up took {cluster.up_seconds:.1f}s)")
    assert len({p.status.pod_ip for p in pods}) == PODS
    per_node = {n: sum(p.spec.node_name == n for p in pods) for n in ("node-0", "node-1")}
    assert per_node == {"node-0": PODS // 2, "node-1": PODS // 2}

    await kube.patch(Deployment, "many", {"spec": {"replicas": 0}}, namespace)
    names = network.Names(cluster.name)

    async def all_gone() -> bool:
        left = (await kube.list(Pod, namespace)).items
        return not left and not any(netns.exists(names.pod(p.metadata.uid or "")) for p in pods)
    await wait_for(all_gone, within=120, what="all 100 pods and namespaces removed")
