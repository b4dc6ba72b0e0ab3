"""The watch client and the translation against kube-apiserver output recorded in the shape
of a kind cluster running the mesh (tests/fixtures/kube/kind-*): typed lists with
managedFields, ownerReferences, status conditions, host-network and unready pods."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import trio

from common.identity import SpiffeId
from common.kube import (
    Change,
    EndpointSlice,
    Gateway,
    KubeClient,
    KubeConfig,
    Namespace,
    Node,
    Pod,
    Resource,
    Resync,
    Service,
    watch_kind,
)
from common.model import Locality, TrafficType, WaypointRef
from common.translate import MeshTranslator, translate

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kube"
LISTS: dict[type[Resource], str] = {
    Namespace: "kind-namespaces-list.json", Node: "kind-nodes-list.json",
    Pod: "kind-pods-list.json", Service: "kind-services-list.json",
    EndpointSlice: "kind-endpointslices-list.json", Gateway: "kind-gateways-list.json",
}
C = "pyambient-e2e"


def _api(request: httpx.Request) -> httpx.Response:
    """Answers lists from the fixtures and the pod watch from the recorded stream."""
    for kind, name in LISTS.items():
        if request.url.path == kind.resource_type().collection_path():
            if request.url.params.get("watch") and kind is Pod:
                assert request.url.params["resourceVersion"] == "2291"
                return httpx.Response(200, content=(FIXTURES / "kind-pods-watch.jsonl")
                                      .read_bytes())
            if request.url.params.get("watch"):
                return httpx.Response(200, content=b"")  # a watch that ends at once
            return httpx.Response(200, content=(FIXTURES / name).read_bytes(),
                                  headers={"content-type": "application/json"})
    return httpx.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})


def _client() -> KubeClient:
    return KubeClient(KubeConfig.for_server("https://127.0.0.1:6443"),
                      transport=httpx.MockTransport(_api))


async def _listed() -> list[Resource]:
    objects: list[Resource] = []
    async with _client() as client:
        for kind in LISTS:
            objects.extend((await client.list(kind)).items)
    return objects


async def test_every_recorded_object_types_and_keeps_unmodelled_fields() -> None:
    objects = await _listed()
    assert len(objects) == 4 + 3 + 6 + 4 + 4 + 1
    pod = next(o for o in objects if isinstance(o, Pod) and o.metadata.name.startswith("echo-v1"))
    assert (pod.kind, pod.api_version) == ("Pod", "v1")  # filled in: list items omit them
    raw: dict[str, Any] = pod.to_dict()
    assert raw["metadata"]["managedFields"][1]["subresource"] == "status"
    assert raw["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    assert pod.metadata.owner_references[0].kind == "ReplicaSet"


async def test_the_kind_cluster_translates_into_the_expected_snapshot() -> None:
    snap = translate(await _listed())
    assert not [i for i in snap.issues if i.severity.value == "error"], snap.issues

    echo = snap.workloads_by_ip["10.244.2.6"]
    assert (echo.name, echo.node, echo.captured, echo.ready) == \
        ("echo-v1-7c8d9b6f4-p9q2r", f"{C}-worker2", True, True)
    assert echo.identity == SpiffeId("cluster.local", "mesh-e2e", "echo")
    assert echo.locality == Locality("region-1", "zone-b")
    assert echo.netns is None  # on Kubernetes the node agent finds it (k8s_netns)
    assert echo.named_ports == {"http": 8080}

    assert snap.workloads_by_ip["10.244.2.7"].ready is False  # ContainersNotReady
    client = snap.workloads_by_ip["10.244.1.5"]
    assert client.captured and client.locality.zone == "zone-a"

    waypoint_pod = snap.workloads_by_ip["10.244.1.8"]
    assert waypoint_pod.is_waypoint and not waypoint_pod.captured

    coredns = snap.workloads_by_ip["10.244.0.3"]
    assert not coredns.captured  # kube-system is not enrolled
    # The host-network ztunnel pod shares its node's IP: it is no workload at that IP.
    assert "172.18.0.3" not in snap.workloads_by_ip
    ztunnel = next(w for w in snap.workloads_by_uid.values() if w.name == "ztunnel-8qv4m")
    assert not ztunnel.captured

    svc = snap.services_by_vip["10.96.120.15"]
    assert svc.hostname == "echo.mesh-e2e.svc.cluster.local"
    assert svc.waypoint == WaypointRef("mesh-e2e", "waypoint")
    assert svc.ports_by_number[80].target_port == 8080
    assert {(e.ip, e.ready, e.node) for e in svc.endpoints} == {
        ("10.244.2.6", True, f"{C}-worker2"), ("10.244.2.7", False, f"{C}-worker2")}
    assert [e.ip for e in svc.ready_endpoints] == ["10.244.2.6"]
    assert snap.services_by_host["kube-dns.kube-system.svc.cluster.local"].vips == ("10.96.0.10",)

    waypoint = snap.waypoints_by_ref[WaypointRef("mesh-e2e", "waypoint")]
    assert waypoint.traffic_type == TrafficType.SERVICE
    assert waypoint.vips == ("10.96.200.8",)
    assert [e.ip for e in waypoint.endpoints] == ["10.244.1.8"]
    assert waypoint.identity == SpiffeId("cluster.local", "mesh-e2e", "waypoint")

    on_worker2 = {w.name for w in snap.node_workloads(f"{C}-worker2")}
    assert on_worker2 >= {"echo-v1-7c8d9b6f4-p9q2r", "echo-v2-5b7f8d9c6-w3e8t"}


async def test_a_new_pod_becomes_a_workload_at_its_ip_event_and_leaves_on_delete() -> None:
    """The informer over the recorded watch: list, then ADDED (unscheduled), scheduled,
    ContainerCreating (no IP), running with an IP, ready, BOOKMARK, terminating, DELETED."""
    translator = MeshTranslator()
    async with _client() as client:
        for kind in (Namespace, Node, Service, EndpointSlice, Gateway):
            translator.replace(kind.KIND, (await client.list(kind)).items)
        seen: list[tuple[str, str | None, bool | None]] = []
        async with aclosing(watch_kind(client, Pod)) as events:
            with trio.fail_after(10):
                async for event in events:
                    translator.apply("Pod", event)
                    wl = translator.snapshot().workloads_by_ip.get("10.244.2.9")
                    if isinstance(event, Resync):
                        assert event.resource_version == "2291"
                        seen.append(("RESYNC", None, None))
                        continue
                    assert isinstance(event, Change)
                    seen.append((event.type, wl.node if wl else None, wl.ready if wl else None))
                    if event.type == "DELETED":
                        break
    assert seen == [
        ("RESYNC", None, None),
        ("ADDED", None, None), ("MODIFIED", None, None), ("MODIFIED", None, None),
        # The pod-IP event: from here the node agent can find and enrol the pod.
        ("MODIFIED", f"{C}-worker2", False),
        ("MODIFIED", f"{C}-worker2", True),
        ("MODIFIED", f"{C}-worker2", True),  # terminating, still serving its connections
        ("DELETED", None, None),
    ]


def test_the_recorded_watch_lines_are_what_kube_apiserver_sends() -> None:
    lines = (FIXTURES / "kind-pods-watch.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events].count("BOOKMARK") == 1
    for event in events:
        obj = event["object"]
        assert (obj["kind"], obj["apiVersion"]) == ("Pod", "v1")  # watch objects carry them
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > 2291
