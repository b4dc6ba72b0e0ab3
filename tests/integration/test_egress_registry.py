"""Egress on the shared local cluster: a ServiceEntry host answered by ztunnel's DNS proxy
inside a pod (auto-allocated VIP), and REGISTRY_ONLY refusing an unregistered destination
with the documented error (logged by the node's ztunnel, connection reset)."""

from __future__ import annotations

import ipaddress

import pytest
import trio

from common.kube import KubeClient, Pod, ServiceEntry
from common.service_entries import AUTO_RANGE, allocate_addresses
from deploy.local.network import APISERVER_FABRIC_PORT, FABRIC_GATEWAY
from tests.integration.conftest import LocalCluster, ready_pods, wait_for
from tests.integration.ztunnel_support import AMBIENT, label_namespace
from ztunnel.decide import OUTBOUND_POLICY_LABEL

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RESOLVE = "import socket, sys; print(socket.gethostbyname(sys.argv[1]))"
# Connect, send a request, report how many bytes came back (0 or an error: reset).
TALK = ("import socket, sys\n"
        "try:\n"
        "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "    s.sendall(b'GET /version HTTP/1.0\\r\\n\\r\\n')\n"
        "    print('BYTES', len(s.recv(4096)))\n"
        "except OSError as exc:\n"
        "    print('ERROR', type(exc).__name__)\n")


async def test_service_entry_resolves_and_registry_only_blocks_the_rest(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    await label_namespace(kube, namespace, dict(AMBIENT))
    # The entry first: a query answered before ztunnel knows the entry would be forwarded
    # upstream and its failure cached.
    await kube.create(ServiceEntry.model_validate({
        "metadata": {"name": "api", "namespace": namespace},
        "spec": {"hosts": ["api.example.com"], "location": "MESH_EXTERNAL",
                 "resolution": "DNS",
                 "ports": [{"number": 443, "name": "https", "protocol": "TLS"}]}}))
    await kube.create(Pod.model_validate({
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "ambient/echo"}]}}))
    await ready_pods(cluster, namespace, 1, within=120)

    async def resolved() -> str | None:
        done = await cluster.exec(namespace, "client", "python3", "-c", RESOLVE,
                                  "api.example.com")
        answer = done.stdout.strip()
        return answer if done.returncode == 0 and answer else None

    address = await wait_for(resolved, 60, interval=0.5,
                             what="api.example.com answered by the DNS proxy")
    assert ipaddress.ip_address(address) in AUTO_RANGE, address

    target = (str(FABRIC_GATEWAY), str(APISERVER_FABRIC_PORT))  # not a service, pod or entry

    async def talk() -> str:
        done = await cluster.exec(namespace, "client", "python3", "-c", TALK, *target)
        return done.stdout.strip()

    assert (await talk()).startswith("BYTES") and (await talk()) != "BYTES 0"
    await label_namespace(kube, namespace, {OUTBOUND_POLICY_LABEL: "REGISTRY_ONLY"})

    async def refused() -> str | None:
        out = await talk()
        return out if out.startswith("ERROR") or out == "BYTES 0" else None

    await wait_for(refused, 60, interval=0.5, what="REGISTRY_ONLY in force")
    expected = f"REGISTRY_ONLY: {target[0]}:{target[1]} is not a service, pod or ServiceEntry"

    async def logged() -> bool:
        log = cluster.state_dir / "logs" / "ztunnel-node-0.log"
        text = await trio.to_thread.run_sync(lambda: log.read_text(errors="replace"))
        return expected in text

    await wait_for(logged, 10, interval=0.2, what="the documented error in ztunnel's log")


async def test_a_service_entry_vip_is_dialled_by_its_host(
        cluster: LocalCluster, kube: KubeClient, namespace: str) -> None:
    # The only name this sandbox's node resolver knows is localhost: ztunnel dials it from
    # the pod's namespace, so the client pod's own echo server (8080) answers.
    await label_namespace(kube, namespace, dict(AMBIENT))
    await kube.create(Pod.model_validate({
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "ambient/echo"}]}}))
    await ready_pods(cluster, namespace, 1, within=120)
    await kube.create(ServiceEntry.model_validate({
        "metadata": {"name": "loop", "namespace": namespace},
        "spec": {"hosts": ["localhost"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                 "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}]}}))
    # The VIP the translator allocates: the same pure function over every entry.
    entries = tuple((await kube.list(ServiceEntry)).items)
    vip = next(o.spec["addresses"][0] for o in allocate_addresses(entries)
               if o.metadata.namespace == namespace and o.metadata.name == "loop")

    async def answered() -> str | None:
        done = await cluster.exec(namespace, "client", "python3", "-c", TALK, vip, "8080")
        out = done.stdout.strip()
        return out if out.startswith("BYTES") and out != "BYTES 0" else None

    await wait_for(answered, 60, interval=0.5, what=f"{vip}:8080 dialled as localhost:8080")
