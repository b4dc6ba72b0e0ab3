"""The local cluster shared by every integration test of a run.

``cluster`` (session scope) brings one 2-node local cluster up on first use and tears it
down after the last test; it skips, with the reason, when not root or when ``ip netns``
or ``nft`` is missing.  Its name is unique per test run (``it<pid>``), so runs of several
people on one machine do not meet; set ``AMBIENT_TEST_CLUSTER=NAME`` to reuse a cluster
that is already up (it is then left running).

Tests send requests from pods with :func:`fetch` (Python's urllib, so curl is not needed).

``namespace`` (function scope) gives each test its own Kubernetes namespace and deletes
what the test created in it afterwards (by deleting the namespace).  Clusters left by
earlier runs whose pytest process died are removed first.  Helpers: :meth:`LocalCluster.exec` runs a
command in a pod through ``ambientctl exec``; :func:`wait_for` polls the API with a
deadline; :func:`ready_pods` waits for a cluster's pods to be Ready (a failure quotes that
cluster's log, :meth:`LocalCluster.log_about`); :func:`echo_deployment` and
:func:`echo_service` build the usual objects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from common.kube import Deployment, KubeClient, KubeConfig, Pod, Service
from deploy.local import cluster as local_cluster
from deploy.local import netns

T = TypeVar("T")
# An HTTP GET run inside a pod's namespace (no dependency on curl being installed).
_FETCH = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
REPO = Path(__file__).resolve().parents[2]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` unavailable: {probe.stderr.strip()}"
    return None


@dataclass
class LocalCluster:
    name: str
    server: str
    up_seconds: float

    def client(self) -> KubeClient:
        """A new client (one per test: each test has its own trio loop)."""
        return KubeClient(KubeConfig.for_server(self.server))

    @property
    def state_dir(self) -> Path:
        return local_cluster.state_dir(self.name)

    def log_about(self, text: str, lines: int = 40) -> str:
        """The last lines of this cluster's log that mention ``text``."""
        path = self.state_dir / "supervisor.log"
        try:
            found = [ln for ln in path.read_text(errors="replace").splitlines() if text in ln]
        except OSError as exc:
            return f"(cluster log unreadable: {exc})"
        return "cluster log:\n" + "\n".join(found[-lines:])

    def ambientctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.ambientctl", *args], capture_output=True, text=True,
            timeout=timeout, cwd=REPO, check=False,
            env={**os.environ, "AMBIENT_CLUSTER": self.name})

    async def exec(self, namespace: str, target: str, *cmd: str,
                   within: float = 20.0) -> subprocess.CompletedProcess[str]:
        """``ambientctl exec -n NS TARGET -- CMD`` (pod netns and DNS), off the trio thread."""
        return await trio.to_thread.run_sync(
            lambda: self.ambientctl("exec", "--cluster", self.name, "-n", namespace, target,
                                    "--", *cmd, timeout=within))


def _remove_abandoned_test_clusters() -> None:
    """Clusters of earlier test runs whose pytest process died (killed, timed out)."""
    pids = {int(m.group(1)) for n in netns.list_names("pa-it")
            if (m := re.match(r"^pa-it(\d+)-", n))}
    for pid in pids:
        if not Path(f"/proc/{pid}").exists():
            local_cluster.down(f"it{pid}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    reuse = os.environ.get("AMBIENT_TEST_CLUSTER")
    if reuse:
        state = local_cluster.read_state(reuse)
        yield LocalCluster(reuse, str(state["server"]), 0.0)
        return
    _remove_abandoned_test_clusters()
    name = f"it{os.getpid()}"
    result = local_cluster.up(name, 2)
    try:
        yield LocalCluster(name, result.server, result.seconds)
    finally:
        local_cluster.down(name)


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace; what the test made in it is deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=cluster.server, timeout=10) as http:
        http.post("/api/v1/namespaces",
                  json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                  ).raise_for_status()
        try:
            yield name
        finally:
            # The cluster's namespace controller deletes everything that was in it.
            http.delete(f"/api/v1/namespaces/{name}")


async def wait_for(probe: Callable[[], Awaitable[T | None]], within: float = 30.0,
                   interval: float = 0.1, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something other than None/False, with a deadline."""
    with trio.move_on_after(within):
        while True:
            value = await probe()
            if value is not None and value is not False:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"{what} not reached within {within}s")


def is_ready(pod: Pod) -> bool:
    return pod.status.phase == "Running" and bool(pod.status.pod_ip) and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


async def ready_pods(cluster: LocalCluster, namespace: str, count: int,
                     label_selector: str | None = None, within: float = 60.0) -> list[Pod]:
    """Wait until exactly ``count`` pods (matching the selector) exist in ``cluster`` and
    are Ready.

    On failure the message describes each pod and quotes the cluster's log lines about
    the namespace: a CI run is read only through its failure messages."""
    seen: list[Pod] = []

    async with cluster.client() as client:
        async def probe() -> list[Pod] | None:
            pods = (await client.list(Pod, namespace, label_selector=label_selector)).items
            seen[:] = pods
            return pods if len(pods) == count and all(is_ready(p) for p in pods) else None
        try:
            return await wait_for(probe, within, what=f"{count} ready pods in {namespace}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; pods: {[describe_pod(p) for p in seen]}\n"
                                 f"{cluster.log_about(namespace)}") from None


def describe_pod(pod: Pod) -> str:
    statuses = [(c.get("ready"), c.get("restartCount"), c.get("state"))
                for c in (pod.status.model_extra or {}).get("containerStatuses", [])]
    gone = " deleting" if pod.metadata.deletion_timestamp else ""
    return (f"{pod.metadata.name} on {pod.spec.node_name} {pod.status.phase} "
            f"ip={pod.status.pod_ip} ready={is_ready(pod)}{gone} containers={statuses}")


def echo_deployment(name: str, namespace: str, replicas: int = 1,
                    labels: dict[str, str] | None = None, port: int = 8080,
                    env: dict[str, str] | None = None) -> Deployment:
    labels = labels or {"app": name}
    return Deployment.model_validate({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                     "name": "echo", "image": "ambient/echo",
                     "ports": [{"containerPort": port}],
                     "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}]}}}})


def echo_service(name: str, namespace: str, selector: dict[str, str],
                 port: int = 8080) -> Service:
    return Service.model_validate({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector,
                 "ports": [{"name": "http", "port": port, "targetPort": port}]}})


def client_pod(name: str, namespace: str, node: str) -> Pod:
    """A pod pinned to ``node`` (it runs the echo app; tests exec :func:`fetch` in its netns)."""
    return Pod.model_validate({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "client"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "ambient/echo"}]}})


async def service_ip(client: KubeClient, namespace: str, name: str) -> str:
    async def probe() -> str | None:
        return (await client.get(Service, name, namespace)).spec.cluster_ip or None
    return await wait_for(probe, what=f"clusterIP of {name}")


@pytest.fixture
async def kube(cluster: LocalCluster) -> AsyncIterator[KubeClient]:
    async with cluster.client() as client:
        yield client


def fetch(url: str) -> list[str]:
    """Command line that GETs ``url`` and prints the body (exit status 1 on any failure)."""
    return [sys.executable, "-c", _FETCH, url]


def json_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    import json

    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr or done.stdout}"
    data: dict[str, Any] = json.loads(done.stdout)
    return data
