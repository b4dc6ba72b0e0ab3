"""Deployments scale, crashed containers restart, `cluster down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest
import trio

from common.errors import KubeApiError
from common.kube import (
    Deployment,
    EndpointSlice,
    KubeClient,
    KubeConfig,
    Namespace,
    Pod,
    Service,
    ServiceAccount,
)
from deploy.local import cluster as local_cluster
from deploy.local import netns, network
from tests.integration.conftest import (
    LocalCluster,
    echo_deployment,
    echo_service,
    fetch,
    is_ready,
    json_of,
    ready_pods,
    wait_for,
)

pytestmark = [pytest.mark.netns]


def _pod_netns(cluster: LocalCluster, pod: Pod) -> str:
    return network.Names(cluster.name).pod(pod.metadata.uid or "")


async def test_scaling_a_deployment_creates_and_removes_pods_and_namespaces(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(echo_deployment("web", namespace, replicas=1))
    first = await ready_pods(cluster, namespace, 1)
    await kube.patch(Deployment, "web", {"spec": {"replicas": 4}}, namespace)
    pods = await ready_pods(cluster, namespace, 4)
    assert {p.spec.node_name for p in pods} == {"node-0", "node-1"}
    assert len({p.status.pod_ip for p in pods}) == 4
    assert all(p.metadata.labels["app"] == "web" for p in pods)
    assert all(p.metadata.owner_references[0].kind == "Deployment" for p in pods)
    assert all(netns.exists(_pod_netns(cluster, p)) for p in pods)

    async def status_counts() -> bool:
        dep = await kube.get(Deployment, "web", namespace)
        return dep.status.get("readyReplicas") == 4
    await wait_for(status_counts, what="deployment status readyReplicas=4")

    await kube.patch(Deployment, "web", {"spec": {"replicas": 1}}, namespace)
    remaining = await ready_pods(cluster, namespace, 1)
    gone = [p for p in pods if p.metadata.name != remaining[0].metadata.name]

    async def namespaces_removed() -> bool:
        return not any(netns.exists(_pod_netns(cluster, p)) for p in gone)
    await wait_for(namespaces_removed, what="netns of removed pods deleted")
    assert first[0].metadata.name in {p.metadata.name for p in pods}


async def test_a_crashed_container_is_restarted(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(echo_deployment("crashy", namespace, replicas=1))
    pod = (await ready_pods(cluster, namespace, 1))[0]
    inode = netns.inode(_pod_netns(cluster, pod))
    assert inode is not None
    victims = netns.pids_in({inode})
    assert victims, "the echo process should live in the pod's namespace"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    async def restarted() -> Pod | None:
        current = await kube.get(Pod, pod.metadata.name, namespace)
        statuses = (current.status.model_extra or {}).get("containerStatuses") or []
        restarts = statuses[0].get("restartCount") if statuses else None
        return current if restarts == 1 and is_ready(current) else None
    again = await wait_for(restarted, what="restartCount 1 and Ready again")
    assert again.status.pod_ip == pod.status.pod_ip
    answer = json_of(await cluster.exec(namespace, pod.metadata.name,
                                        *fetch(f"http://{pod.status.pod_ip}:8080/")))
    assert answer["pod"] == pod.metadata.name


async def test_logs_and_exec_exit_code(cluster: LocalCluster, kube: KubeClient,
                                      namespace: str) -> None:
    await kube.create(echo_deployment("talk", namespace, replicas=1))
    pod = (await ready_pods(cluster, namespace, 1))[0]
    done = await cluster.exec(namespace, "deploy/talk", "sh", "-c",
                              'cat /etc/resolv.conf; "$@" >/dev/null; exit 7', "sh",
                              *fetch("http://localhost:8080/logged"))
    assert done.returncode == 7
    assert f"search {namespace}.svc.cluster.local" in done.stdout
    logs = await trio.to_thread.run_sync(
        lambda: cluster.ambientctl("logs", "--cluster", cluster.name, "-n", namespace,
                                   pod.metadata.name))
    assert logs.returncode == 0
    assert "GET /logged 200" in logs.stdout


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def _started_with_argument_under(directory: str) -> set[int]:
    """Processes of the cluster in the host namespace (e.g. ztunnels): args in its state dir."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.decode(errors="replace").startswith(directory) for a in argv):
                found.add(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("supervisor_crashed", [False, True], ids=["graceful", "crashed"])
async def test_cluster_down_leaves_no_namespace_link_process_or_file(
        cluster: LocalCluster, supervisor_crashed: bool) -> None:
    name = f"dn{uuid.uuid4().hex[:6]}"
    links_before = _host_links()
    up = await trio.to_thread.run_sync(
        lambda: cluster.ambientctl("cluster", "up", "--nodes", "2", "--name", name, timeout=90))
    assert up.returncode == 0, up.stderr
    state_dir = local_cluster.state_dir(name)
    state = json.loads((state_dir / "state.json").read_text())
    async with KubeClient(KubeConfig.for_server(state["server"])) as client:
        await client.create(echo_deployment("web", "default", replicas=2))
        await ready_pods(LocalCluster(name, state["server"], 0.0), "default", 2)
    owned = local_cluster.owned_namespaces(name)
    assert len(owned) == 1 + 2 + 2  # fabric, nodes, pods
    inodes = {i for i in map(netns.inode, owned) if i is not None}
    pids = set(netns.pids_in(inodes)) | _started_with_argument_under(str(state_dir))
    assert int(state["pid"]) in pids and len(pids) >= 3

    if supervisor_crashed:
        os.kill(int(state["pid"]), signal.SIGKILL)
    else:
        status = await trio.to_thread.run_sync(
            lambda: cluster.ambientctl("cluster", "status", "--name", name))
        assert status.returncode == 0 and "alive" in status.stdout, status.stdout + status.stderr
        assert "pod default/web-" in status.stdout and "processes=1" in status.stdout
        again = await trio.to_thread.run_sync(
            lambda: cluster.ambientctl("cluster", "up", "--nodes", "2", "--name", name))
        assert again.returncode == 0 and "already up" in again.stdout

    down = await trio.to_thread.run_sync(
        lambda: cluster.ambientctl("cluster", "down", "--name", name, timeout=60))
    assert down.returncode == 0, down.stderr
    listed = (await trio.run_process(["ip", "netns", "list"], capture_stdout=True)
              ).stdout.decode()
    assert f"pa-{name}-" not in listed
    assert not netns.pids_in(inodes)

    async def all_exited() -> bool:
        return not any(_running(p) for p in pids)
    await wait_for(all_exited, within=5, what="every cluster process exited")
    assert _host_links() == links_before
    assert not state_dir.exists()
    # The shared cluster was not touched.
    assert local_cluster.supervisor_alive(cluster.name)


async def test_deleting_a_namespace_removes_its_pods_and_objects(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await kube.create(echo_deployment("doomed", namespace, replicas=2))
    await kube.create(echo_service("doomed", namespace, {"app": "doomed"}))
    pods = await ready_pods(cluster, namespace, 2)
    await kube.delete(Namespace, namespace)
    names = network.Names(cluster.name)

    async def emptied() -> bool:
        left = [*(await kube.list(Pod, namespace)).items,
                *(await kube.list(Deployment, namespace)).items,
                *(await kube.list(Service, namespace)).items,
                *(await kube.list(EndpointSlice, namespace)).items]
        return not left and not any(netns.exists(names.pod(p.metadata.uid or "")) for p in pods)
    await wait_for(emptied, what=f"namespace {namespace} emptied")


async def test_new_namespaces_get_a_default_service_account(
        kube: KubeClient, namespace: str) -> None:
    async def found() -> ServiceAccount | None:
        try:
            return await kube.get(ServiceAccount, "default", namespace)
        except KubeApiError:
            return None
    sa = await wait_for(found, within=10, what="default ServiceAccount")
    assert sa.metadata.namespace == namespace
