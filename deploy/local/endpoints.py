"""Service VIPs and EndpointSlices: the job of the service IP allocator and the
EndpointSlice controller.

Pure core: :func:`allocate_cluster_ip` picks the lowest free address of the service CIDR
(``.1`` and ``.10`` are reserved for ``kubernetes`` and ``kube-dns``);
:func:`desired_slice` builds the one slice of a selector Service from the pods it
selects (address, readiness, node, zone from the node's topology label, targetRef).
Services without a selector keep the slices someone else wrote (``kubernetes``,
``kube-dns`` are written that way by the cluster itself).

Shell: :class:`EndpointsController` writes clusterIPs, creates/updates/deletes the slices
it manages (label ``endpointslice.kubernetes.io/managed-by``).
"""

from __future__ import annotations

from typing import Any

from common.errors import KubeApiError
from common.kube import EndpointSlice, KubeClient, Node, Pod, Service
from common.kube.objects import (
    Endpoint,
    EndpointConditions,
    EndpointPort,
    ObjectMeta,
    ObjectReference,
    OwnerReference,
)
from common.logging import get_logger
from deploy.local.deployments import is_ready
from deploy.local.errors import ClusterError
from deploy.local.informer import Cache
from deploy.local.network import DNS_VIP, KUBERNETES_VIP, SERVICE_CIDR

log = get_logger("local.endpoints")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.pyambient.io"
ZONE_LABEL = "topology.kubernetes.io/zone"
_RESERVED = {KUBERNETES_VIP, DNS_VIP}


def allocate_cluster_ip(used: set[str]) -> str:
    for addr in SERVICE_CIDR.hosts():
        text = str(addr)
        if text not in used and text not in _RESERVED:
            return text
    raise ClusterError(f"the service CIDR {SERVICE_CIDR} is full: delete unused Services")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _target_port(port: Any, pods: list[Pod]) -> int | None:
    """A numeric targetPort, or a named one resolved through the pods' container ports."""
    target = port.target_port if port.target_port is not None else port.port
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for pod in pods:
        for container in pod.spec.containers:
            for cp in container.ports or []:
                if cp.name == target:
                    return cp.container_port
    return None


def desired_slice(svc: Service, pods: list[Pod], zones: dict[str, str]) -> EndpointSlice:
    """The slice for a selector Service; ``pods`` are already those it selects."""
    live = [p for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp
            and p.status.phase in ("Running", "Pending")]
    live.sort(key=lambda p: p.metadata.name)
    endpoints = [Endpoint(
        addresses=[p.status.pod_ip or ""],
        conditions=EndpointConditions(ready=is_ready(p), serving=is_ready(p), terminating=False),
        node_name=p.spec.node_name, zone=zones.get(p.spec.node_name or ""),
        target_ref=ObjectReference(kind="Pod", name=p.metadata.name,
                                   namespace=p.metadata.namespace, uid=p.metadata.uid))
        for p in live]
    ports = [EndpointPort(name=sp.name or "", port=_target_port(sp, live),
                          protocol=sp.protocol or "TCP", app_protocol=sp.app_protocol)
             for sp in svc.spec.ports]
    return EndpointSlice(
        metadata=ObjectMeta(
            name=svc.metadata.name, namespace=svc.metadata.namespace,
            labels={SERVICE_NAME_LABEL: svc.metadata.name, MANAGED_BY_LABEL: MANAGED_BY},
            owner_references=[OwnerReference(api_version="v1", kind="Service",
                                             name=svc.metadata.name, uid=svc.metadata.uid or "",
                                             controller=True, block_owner_deletion=True)]),
        address_type="IPv4", endpoints=endpoints, ports=ports)


def _content(s: EndpointSlice) -> tuple[Any, ...]:
    d = s.to_dict()
    return (d.get("endpoints"), d.get("ports"), d["metadata"].get("labels"),
            d["metadata"].get("ownerReferences"))


class EndpointsController:
    """ClusterIPs for Services, EndpointSlices for selector Services."""

    def __init__(self, client: KubeClient, services: Cache[Service], pods: Cache[Pod],
                 slices: Cache[EndpointSlice], nodes: Cache[Node]) -> None:
        self.client = client
        self.services = services
        self.pods = pods
        self.slices = slices
        self.nodes = nodes

    async def reconcile(self) -> None:
        for tracked in (self.services, self.pods, self.slices, self.nodes):
            await tracked.synced.wait()
        await self._cluster_ips()
        zones = {n.metadata.name: n.metadata.labels.get(ZONE_LABEL, "")
                 for n in self.nodes.values()}
        pods_by_ns: dict[str, list[Pod]] = {}
        for pod in self.pods.values():
            pods_by_ns.setdefault(pod.metadata.namespace or "", []).append(pod)
        wanted: set[tuple[str, str]] = set()
        for svc in self.services.values():
            if not svc.spec.selector:
                continue
            ns = svc.metadata.namespace or ""
            selected = [p for p in pods_by_ns.get(ns, [])
                        if selects(svc.spec.selector, p.metadata.labels)]
            desired = desired_slice(svc, selected, zones)
            wanted.add((ns, svc.metadata.name))
            current = self.slices.get(ns, svc.metadata.name)
            if current is None:
                await self._write(self.client.create(desired))
            elif _content(current) != _content(desired):
                desired.metadata.resource_version = current.metadata.resource_version
                await self._write(self.client.update(desired))
        for sl in self.slices.values():
            key = (sl.metadata.namespace or "", sl.metadata.name)
            if sl.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY and key not in wanted:
                try:
                    await self.client.delete(EndpointSlice, sl.metadata.name,
                                             sl.metadata.namespace)
                except KubeApiError as exc:
                    if exc.code != 404:
                        raise

    async def _write(self, call: Any) -> None:
        try:
            written: EndpointSlice = await call
        except KubeApiError as exc:
            if exc.code in (404, 409):  # the Service went away, or a newer write raced us
                return
            raise
        await self.slices.wait_seen(written.metadata.resource_version)

    async def _cluster_ips(self) -> None:
        used = {s.spec.cluster_ip for s in self.services.values() if s.spec.cluster_ip}
        for svc in self.services.values():
            if svc.spec.cluster_ip:
                continue
            ip = allocate_cluster_ip({u for u in used if u})
            used.add(ip)
            try:
                written = await self.client.patch(
                    Service, svc.metadata.name,
                    {"spec": {"clusterIP": ip, "clusterIPs": [ip]}}, svc.metadata.namespace)
            except KubeApiError as exc:
                if exc.code == 404:
                    continue
                raise
            await self.services.wait_seen(written.metadata.resource_version)

