"""``ambientctl waypoint``: against a bare local API server, then on the shared local cluster.

The first tests run the commands against ``python -m deploy.local.apiserver`` alone (no
root needed): objects round-trip, apply is idempotent, delete removes everything, and the
Gateway controller collects what a deleted Gateway owned.  The tests marked ``netns`` use
the session's local cluster: the waypoint pod really runs and writes its Gateway's status.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from common.kube import (
    Deployment,
    Gateway,
    KubeClient,
    KubeConfig,
    Namespace,
    Pod,
    Service,
    ServiceAccount,
)
from deploy import ambientctl
from deploy.ambientctl.waypoint import apply_waypoint, serves_rbac
from deploy.local.gateways import GatewayController
from deploy.local.informer import Cache, Signal
from deploy.waypoint_objects import GATEWAY_NAME_LABEL, WaypointSpec, condition_of, gateway
from tests.integration.conftest import LocalCluster, wait_for

PATHS = {
    "Gateway": "/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/gateways/{name}",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "Service": "/api/v1/namespaces/{ns}/services/{name}",
}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bare API server (no controllers) with namespaces ``shop`` and ``other``."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.local.apiserver",
                             "--db", str(tmp_path / "db.sqlite"), "--port-file", str(port_file),
                             "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, "API server exited"
            assert time.monotonic() < deadline, "API server did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        monkeypatch.setenv("AMBIENT_SERVER", url)
        with httpx.Client(base_url=url) as http:
            for ns in ("shop", "other"):
                http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": ns}}
                          ).raise_for_status()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ambientctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stored(server: str, ns: str = "shop", name: str = "waypoint") -> dict[str, Any]:
    """Each kind's stored object (absent kinds left out)."""
    found = {}
    with httpx.Client(base_url=server) as http:
        for kind, path in PATHS.items():
            answer = http.get(path.format(ns=ns, name=name))
            if answer.status_code == 200:
                found[kind] = answer.json()
    return found


def namespace_labels(server: str, ns: str = "shop") -> dict[str, str]:
    labels: dict[str, str] = httpx.get(f"{server}/api/v1/namespaces/{ns}").json()[
        "metadata"].get("labels", {})
    return labels


def test_apply_creates_four_owned_objects_and_is_idempotent(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "waypoint", "apply", "-n", "shop")
    assert (code, out) == (0, "waypoint shop/waypoint applied\n")
    objects = stored(server)
    assert set(objects) == set(PATHS)
    uid = objects["Gateway"]["metadata"]["uid"]
    for kind in ("ServiceAccount", "Deployment", "Service"):
        [ref] = objects[kind]["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("Gateway", "waypoint", uid)
    # A controller's writes (a cluster IP, a status) are not undone by the next apply.
    with httpx.Client(base_url=server) as http:
        http.patch(PATHS["Service"].format(ns="shop", name="waypoint"),
                   json={"spec": {"clusterIP": "10.96.0.77"}},
                   headers={"Content-Type": "application/merge-patch+json"}).raise_for_status()
    versions = {k: o["metadata"]["resourceVersion"] for k, o in stored(server).items()}
    code, out, _ = run(capsys, "waypoint", "apply", "-n", "shop")
    assert (code, out) == (0, "waypoint shop/waypoint applied (unchanged)\n")
    again = stored(server)
    assert {k: o["metadata"]["resourceVersion"] for k, o in again.items()} == versions
    assert again["Service"]["spec"]["clusterIP"] == "10.96.0.77"

    code, _, _ = run(capsys, "waypoint", "apply", "-n", "shop", "--for", "workload")
    assert code == 0
    assert stored(server)["Gateway"]["metadata"]["labels"] == {
        "istio.io/waypoint-for": "workload"}
    # Back to the default: the label the previous apply set goes away (three-way merge).
    run(capsys, "waypoint", "apply", "-n", "shop")
    assert not stored(server)["Gateway"]["metadata"].get("labels")


def test_objects_round_trip_through_the_api_server_typed(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "waypoint", "apply", "-n", "other", "--name", "wp")[0] == 0
    objects = stored(server, "other", "wp")
    gw = Gateway.model_validate(objects["Gateway"])
    assert gw.spec["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    dep = Deployment.model_validate(objects["Deployment"])
    assert dep.spec.template.spec.service_account_name == "wp"
    assert dep.spec.template.spec.containers[0].command == [
        "python", "-m", "waypoint", "--name", "wp", "--namespace", "other"]
    svc = Service.model_validate(objects["Service"])
    assert svc.spec.selector == {GATEWAY_NAME_LABEL: "wp"}
    ServiceAccount.model_validate(objects["ServiceAccount"])


def test_dry_run_prints_yaml_and_changes_nothing(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    code, out, _ = run(capsys, "waypoint", "apply", "-n", "shop", "--dry-run",
                       "--enroll-namespace", "--image", "example/pyambient:1")
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Gateway", "ServiceAccount", "Deployment", "Service"]
    assert docs[2]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "example/pyambient:1"
    assert stored(server) == {}
    assert "istio.io/use-waypoint" not in namespace_labels(server)


def test_enroll_namespace_labels_it_and_refuses_to_steal_it_without_overwrite(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "waypoint", "apply", "-n", "shop", "--enroll-namespace")
    assert code == 0
    assert out.splitlines() == ["waypoint shop/waypoint applied",
                                'namespace shop labeled with "istio.io/use-waypoint: waypoint"']
    assert "not enrolled in ambient" in err
    assert namespace_labels(server)["istio.io/use-waypoint"] == "waypoint"

    code, out, err = run(capsys, "waypoint", "apply", "-n", "shop", "--name", "second",
                         "--enroll-namespace")
    assert code == 1 and out == ""
    assert "already uses waypoint 'waypoint'" in err and "--overwrite" in err
    assert "Gateway" not in stored(server, name="second")  # nothing was written
    code, _, _ = run(capsys, "waypoint", "apply", "-n", "shop", "--name", "second",
                     "--enroll-namespace", "--overwrite")
    assert code == 0 and namespace_labels(server)["istio.io/use-waypoint"] == "second"


def test_delete_removes_objects_and_the_label_that_named_it(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "waypoint", "apply", "-n", "shop", "--enroll-namespace")
    run(capsys, "waypoint", "apply", "-n", "shop", "--name", "keep")
    # A Service of the same name that the waypoint does not own is left alone.
    with httpx.Client(base_url=server) as http:
        http.post("/api/v1/namespaces/other/services", json={
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "waypoint"},
            "spec": {"ports": [{"port": 80}]}}).raise_for_status()
    code, out, _ = run(capsys, "waypoint", "delete", "-n", "shop", "waypoint")
    assert code == 0
    assert out.splitlines() == [
        "waypoint shop/waypoint deleted",
        'namespace shop unlabeled ("istio.io/use-waypoint: waypoint" removed)']
    assert stored(server) == {}
    assert "istio.io/use-waypoint" not in namespace_labels(server)
    assert set(stored(server, name="keep")) == set(PATHS)

    code, _, err = run(capsys, "waypoint", "delete", "-n", "shop", "waypoint")
    assert code == 1 and err.strip() == "error: waypoint shop/waypoint not found"
    code, out, _ = run(capsys, "waypoint", "delete", "-n", "shop", "--all")
    assert code == 0 and out.strip() == "waypoint shop/keep deleted"
    assert stored(server, name="keep") == {}
    assert set(stored(server, "other")) == {"Service"}
    code, _, err = run(capsys, "waypoint", "delete", "-n", "shop")
    assert code == 1 and "--all" in err


def test_list_shows_only_waypoints(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "waypoint", "list", "-n", "shop")[1] == "No waypoints found.\n"
    run(capsys, "waypoint", "apply", "-n", "shop")
    run(capsys, "waypoint", "apply", "-n", "other", "--name", "wl", "--for", "workload",
        "--revision", "canary")
    with httpx.Client(base_url=server) as http:
        http.post("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways", json={
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "ingress"}, "spec": {"gatewayClassName": "istio",
                                                      "listeners": []}}).raise_for_status()
    code, out, _ = run(capsys, "waypoint", "list", "-n", "shop")
    assert code == 0 and out.splitlines() == [
        "NAME       REVISION   TRAFFIC TYPE   PROGRAMMED",
        "waypoint   default    service        Unknown"]
    code, out, _ = run(capsys, "waypoint", "list", "-A")
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["other", "wl", "canary", "workload", "Unknown"],
        ["shop", "waypoint", "default", "service", "Unknown"]]


def test_status_without_a_controller_times_out_and_says_why(
        server: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "waypoint", "apply", "-n", "shop")
    started = time.monotonic()
    code, out, err = run(capsys, "waypoint", "status", "-n", "shop", "--wait-timeout", "300ms")
    assert code == 1 and time.monotonic() - started < 5
    assert out.splitlines()[0].split() == ["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]
    assert "no Programmed condition yet" in err
    code, _, err = run(capsys, "waypoint", "status", "-n", "shop", "--name", "nope",
                       "--wait-timeout", "0")
    assert code == 1 and "waypoint shop/nope not found" in err


async def test_gateway_controller_collects_orphans_and_deploys_bare_gateways(
        server: str) -> None:
    async with KubeClient(KubeConfig.for_server(server)) as client:
        assert not await serves_rbac(client)  # the local API server is not a Kubernetes
        await apply_waypoint(client, WaypointSpec(namespace="shop"), kubernetes=False)

        signal = Signal()
        gateways, pods, services = Cache(Gateway, signal), Cache(Pod, signal), \
            Cache(Service, signal)
        deployments, accounts = Cache(Deployment, signal), Cache(ServiceAccount, signal)
        controller = GatewayController(client, gateways, services, deployments, accounts)
        async with trio.open_nursery() as nursery:
            for cache in (gateways, pods, services, deployments, accounts):
                nursery.start_soon(cache.run, client)
            await controller.reconcile()
            # The status is the waypoint's to write (waypoint.gateway_status), not this
            # controller's.
            assert condition_of(await client.get(Gateway, "waypoint", "shop"),
                                "Programmed") is None

            # An owner that disappears takes what it owned along, a stranger stays.
            await client.create(ServiceAccount.model_validate(
                {"metadata": {"name": "stranger", "namespace": "shop"}}))
            await client.delete(Gateway, "waypoint", "shop")

            async def collected() -> bool:
                await controller.reconcile()
                names = [o.metadata.name for kind in (Deployment, Service, ServiceAccount)
                         for o in (await client.list(kind, "shop")).items]
                return names == ["stranger"]

            await wait_for(collected, within=10, what="dependants collected")

            # A waypoint Gateway applied on its own gets its objects, as istiod would do.
            await client.create(Gateway.model_validate(gateway(WaypointSpec(
                namespace="shop", name="bare"))))

            async def deployed() -> bool:
                await controller.reconcile()
                owned = [o for kind in (Deployment, Service, ServiceAccount)
                         for o in (await client.list(kind, "shop")).items
                         if o.metadata.name == "bare"]
                return len(owned) == 3 and all(
                    [r.name for r in o.metadata.owner_references] == ["bare"] for o in owned)

            await wait_for(deployed, within=10, what="bare Gateway's objects created")
            nursery.cancel_scope.cancel()


# -- on the local cluster ----------------------------------------------------------------------


async def waypoint_pods(kube: KubeClient, namespace: str, name: str) -> list[Pod]:
    return (await kube.list(Pod, namespace, label_selector=f"{GATEWAY_NAME_LABEL}={name}")
            ).items


@pytest.mark.netns
async def test_apply_on_the_cluster_runs_the_waypoint_pod_and_delete_removes_it(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(
        "waypoint", "apply", "-n", namespace, "--enroll-namespace", "--wait",
        "--wait-timeout", "60s", timeout=90))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"waypoint {namespace}/waypoint applied", f"waypoint {namespace}/waypoint is ready!",
        f'namespace {namespace} labeled with "istio.io/use-waypoint: waypoint"']

    async def running() -> Pod | None:
        pods = await waypoint_pods(kube, namespace, "waypoint")
        return pods[0] if len(pods) == 1 and pods[0].status.phase == "Running" else None

    pod = await wait_for(running, within=60, what="waypoint pod Running")
    assert pod.spec.service_account_name == "waypoint"
    assert pod.metadata.labels["istio.io/dataplane-mode"] == "none"
    assert pod.status.pod_ip

    async def accepted() -> Gateway | None:
        gw = await kube.get(Gateway, "waypoint", namespace)
        cond = condition_of(gw, "Accepted")
        return gw if cond and cond["status"] == "True" and gw.status.get("addresses") else None

    gw = await wait_for(accepted, within=30, what="Gateway Accepted with an address")
    svc = await kube.get(Service, "waypoint", namespace)
    assert gw.status["addresses"] == [{"type": "IPAddress", "value": svc.spec.cluster_ip}]
    ns = await kube.get(Namespace, namespace)
    assert ns.metadata.labels["istio.io/use-waypoint"] == "waypoint"

    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(
        "waypoint", "delete", "-n", namespace, "waypoint"))
    assert done.returncode == 0, done.stderr

    async def gone() -> bool:
        return not await waypoint_pods(kube, namespace, "waypoint") and \
            not (await kube.list(Deployment, namespace)).items
    await wait_for(gone, within=30, what="waypoint pod and Deployment gone")
    assert "istio.io/use-waypoint" not in (await kube.get(Namespace, namespace)).metadata.labels


@pytest.mark.netns
async def test_a_bare_gateway_deploys_a_waypoint_and_deleting_it_removes_all(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    name = f"wp-{uuid.uuid4().hex[:4]}"
    # What Istio's docs offer besides istioctl: apply the Gateway alone.
    await kube.create(Gateway.model_validate(gateway(WaypointSpec(namespace=namespace,
                                                                  name=name))))

    async def has_pod() -> bool:
        return bool(await waypoint_pods(kube, namespace, name))
    await wait_for(has_pod, within=30, what="waypoint pod created")
    await kube.delete(Gateway, name, namespace)

    async def collected() -> bool:
        left = [o for kind in (Deployment, Service, ServiceAccount)
                for o in (await kube.list(kind, namespace)).items if o.metadata.name == name]
        return not left and not await waypoint_pods(kube, namespace, name)
    await wait_for(collected, within=30, what="owned objects and pod collected")


@pytest.mark.netns
async def test_status_waits_until_the_waypoint_is_programmed(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(
        "waypoint", "apply", "-n", namespace))
    assert done.returncode == 0, done.stderr
    done = await trio.to_thread.run_sync(lambda: cluster.ambientctl(
        "waypoint", "status", "-n", namespace, "--wait-timeout", "60s", timeout=90))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:4] == ["waypoint", "True", "Programmed",
                                                        "Programmed"]
