"""Properties of outbound decisions over randomly wired meshes.

Following a connection hop by hop (each waypoint reached becomes the source of the
next hop, towards the authority it was given) must end at a pod or outside the mesh
within a few hops, and never visit the same waypoint twice.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from common.kube.objects import Resource
from common.model import Snapshot, WaypointRef
from common.translate import translate
from tests.unit.mesh_objects import (
    endpoint,
    endpoint_slice,
    namespace,
    node,
    pod,
    service,
    waypoint_gateway,
    waypoint_pod,
)
from ztunnel.decide import Outbound, Passthrough, Refused, ToWorkload, ViaWaypoint, decide_outbound

USE = "istio.io/use-waypoint"
WAYPOINTS = ("wp-a", "wp-b")
use_label = st.sampled_from((None, "none", *WAYPOINTS))


def labels_for(use: str | None, **more: str) -> dict[str, str]:
    return {**more, **({USE: use} if use else {})}


@st.composite
def meshes(draw: st.DrawFn) -> Snapshot:
    objs: list[Resource] = [
        namespace("demo", **labels_for(draw(use_label), **{
            "istio.io/dataplane-mode": draw(st.sampled_from(("ambient", "none")))})),
        node("n1", "eu", "a"), node("n2", "eu", "b"),
    ]
    for i, name in enumerate(WAYPOINTS):
        if draw(st.booleans()):
            objs.append(waypoint_gateway(name, waypoint_for=draw(st.sampled_from(
                (None, "service", "workload", "all", "none")))))
            objs.append(waypoint_pod(f"{name}-pod", name, ip=f"10.9.0.{i + 1}",
                                     node_name=draw(st.sampled_from(("n1", "n2")))))
    pods = draw(st.integers(1, 4))
    for i in range(pods):
        objs.append(pod(f"p{i}", ip=f"10.1.0.{i + 1}", node_name=draw(st.sampled_from(
            ("n1", "n2"))), labels=labels_for(draw(use_label), app="web",
                                           **{"istio.io/dataplane-mode": draw(st.sampled_from(
                                               ("ambient", "none", "default")))})))
    objs.append(service("web", vip="10.96.0.1", labels=labels_for(draw(use_label))))
    objs.append(endpoint_slice("web", [endpoint(f"10.1.0.{i + 1}", f"p{i}",
                                                ready=draw(st.booleans()))
                                       for i in range(pods)]))
    return translate(objs)


def follow(snap: Snapshot, first: Outbound, seed: int) -> list[Outbound]:
    hops = [first]
    rng = random.Random(seed)
    while isinstance(hops[-1], ViaWaypoint) and len(hops) < 6:
        hop = hops[-1]
        assert isinstance(hop, ViaWaypoint)
        source = snap.workloads_by_ip[hop.hbone_addr[0]]
        ip, _, port = hop.authority.rpartition(":")
        hops.append(decide_outbound(snap, source, ip, int(port), rng))
    return hops


@settings(max_examples=150, deadline=None)
@given(meshes(), st.integers(0, 2**32 - 1))
def test_connections_never_pass_the_same_waypoint_twice(snap: Snapshot, seed: int) -> None:
    rng = random.Random(seed)
    sources = [w for w in snap.workloads_by_uid.values() if w.ips]
    destinations = [("10.96.0.1", 80)] + [(w.ips[0], 8080) for w in sources]
    for source in sources:
        for ip, port in destinations:
            hops = follow(snap, decide_outbound(snap, source, ip, port, rng), seed)
            assert isinstance(hops[-1], ToWorkload | Passthrough | Refused), hops
            visited: list[WaypointRef] = [h.waypoint.ref for h in hops
                                          if isinstance(h, ViaWaypoint)]
            assert len(visited) == len(set(visited)), visited
            if source.gateway is not None:
                assert source.gateway not in visited[:1]
            for hop in hops:
                if isinstance(hop, ToWorkload):
                    assert hop.workload.captured
                    assert hop.expected == frozenset({hop.workload.identity})
                    assert hop.hbone_addr[0] in hop.workload.ips
                if isinstance(hop, ViaWaypoint):
                    assert hop.expected == frozenset({hop.waypoint.identity})
