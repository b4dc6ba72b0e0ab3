"""Hand-built workloads and snapshots for ztunnel's unit tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from common.authz.compile import PolicyObject, compile_authorization_policies
from common.authz.model import WorkloadRef
from common.authz.peer import compile_peer_authentications
from common.identity import SpiffeId
from common.model import EMPTY_LOCALITY, Snapshot, Workload

_next_ip = iter(range(2, 250))


def workload(name: str, *, namespace: str = "default", sa: str = "default",
             node: str = "node1", ip: str | None = None, captured: bool = True,
             netns: str | None = None, labels: Mapping[str, str] | None = None) -> Workload:
    labels = dict(labels or {"app": name})
    return Workload(
        uid=f"uid-{namespace}-{name}", name=name, namespace=namespace, node=node,
        service_account=sa, identity=SpiffeId("cluster.local", namespace, sa),
        ips=(ip or f"10.9.0.{next(_next_ip)}",), labels=labels, locality=EMPTY_LOCALITY,
        captured=captured, waypoint=None, netns=netns, ready=True, gateway=None,
        named_ports={}, authz_ref=WorkloadRef(namespace, labels, name))


def snapshot_of(version: int, workloads: Iterable[Workload], *,
                authz: Iterable[tuple[str, str, Mapping[str, Any]]] = (),
                peer_auth: Iterable[tuple[str, str, Mapping[str, Any]]] = ()) -> Snapshot:
    wls = list(workloads)
    by_node: dict[str, list[str]] = {}
    for w in wls:
        by_node.setdefault(w.node, []).append(w.uid)
    return Snapshot(
        version=version,
        workloads_by_ip={ip: w for w in wls for ip in w.ips},
        workloads_by_uid={w.uid: w for w in wls},
        workloads_by_node={n: tuple(u) for n, u in by_node.items()},
        ztunnel_policies=compile_authorization_policies(
            [PolicyObject(ns, name, spec) for ns, name, spec in authz]).ztunnel,
        peer_authentication=compile_peer_authentications(
            [PolicyObject(ns, name, spec) for ns, name, spec in peer_auth]))
