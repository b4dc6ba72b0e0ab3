"""The Deployment controller and scheduler of the local cluster.

Pure core: :func:`plan_deployment` compares a Deployment with the pods it owns and says
which pods to create and which to delete; :class:`RoundRobin` picks nodes.  A changed
pod template gets a new ``pod-template-hash``: old pods are replaced all at once (a
local cluster has no capacity to protect).  Pods are named like Kubernetes'
(``<deployment>-<hash>-<5 chars>``, the suffix drawn by the API server's generateName).

Shell: :class:`DeploymentController` creates, deletes and binds pods through the API, and
writes the Deployment's status (replicas, readyReplicas, ...).  Pods nobody owns any more
(their Deployment or Namespace is gone) are deleted here as well, the garbage collector's
job in Kubernetes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from common.errors import KubeApiError
from common.kube import Deployment, KubeClient, Namespace, Node, Pod
from common.kube.objects import ObjectMeta, OwnerReference, PodSpec
from common.logging import get_logger
from deploy.local.informer import Cache

log = get_logger("local.deployments")

TEMPLATE_HASH_LABEL = "pod-template-hash"


def template_hash(dep: Deployment) -> str:
    data = json.dumps(dep.spec.template.model_dump(by_alias=True, exclude_none=True,
                                                   mode="json"), sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:10]


def owned_by(pod: Pod, uid: str | None) -> bool:
    return any(ref.uid == uid and ref.kind == "Deployment"
               for ref in pod.metadata.owner_references)


def is_ready(pod: Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


@dataclass
class Plan:
    create: int = 0
    delete: list[Pod] = field(default_factory=list)


def plan_deployment(dep: Deployment, pods: list[Pod]) -> Plan:
    """How many pods of the current template to create, which pods to delete."""
    want = 1 if dep.spec.replicas is None else max(0, dep.spec.replicas)
    current_hash = template_hash(dep)
    current = [p for p in pods if p.metadata.labels.get(TEMPLATE_HASH_LABEL) == current_hash]
    stale = [p for p in pods if p.metadata.labels.get(TEMPLATE_HASH_LABEL) != current_hash]
    plan = Plan(delete=list(stale))
    if len(current) < want:
        plan.create = want - len(current)
    elif len(current) > want:
        # Not-ready pods go first, then the youngest (Kubernetes' preference order).
        youngest_first = sorted(current, key=lambda p: (p.metadata.creation_timestamp or "",
                                                        p.metadata.name), reverse=True)
        ranked = sorted(youngest_first, key=is_ready)  # stable: keeps age order per group
        plan.delete.extend(ranked[:len(current) - want])
    return plan


def new_pod(dep: Deployment, node: str) -> Pod:
    """A pod of ``dep``'s current template, bound to ``node``."""
    template = dep.spec.template
    labels = {**template.metadata.labels, TEMPLATE_HASH_LABEL: template_hash(dep)}
    spec = PodSpec.model_validate(template.spec.model_dump(by_alias=True, exclude_none=True))
    spec.node_name = node
    # The API server's admission would fill this in; pod identity (SPIFFE) depends on it.
    spec.service_account_name = spec.service_account_name or "default"
    return Pod(
        metadata=ObjectMeta(
            generate_name=f"{dep.metadata.name}-{template_hash(dep)}-",
            namespace=dep.metadata.namespace, labels=labels,
            annotations=dict(template.metadata.annotations),
            owner_references=[OwnerReference(
                api_version="apps/v1", kind="Deployment", name=dep.metadata.name,
                uid=dep.metadata.uid or "", controller=True, block_owner_deletion=True)]),
        spec=spec)


def deployment_status(dep: Deployment, pods: list[Pod]) -> dict[str, object]:
    current_hash = template_hash(dep)
    ready = sum(1 for p in pods if is_ready(p))
    return {
        "observedGeneration": dep.metadata.generation or 1,
        "replicas": len(pods),
        "updatedReplicas": sum(1 for p in pods
                               if p.metadata.labels.get(TEMPLATE_HASH_LABEL) == current_hash),
        "readyReplicas": ready, "availableReplicas": ready,
        "unavailableReplicas": max(0, len(pods) - ready),
    }


@dataclass
class RoundRobin:
    """Spreads new pods over the ready nodes in name order."""

    counter: int = 0

    def pick(self, nodes: list[str]) -> str | None:
        if not nodes:
            return None
        node = sorted(nodes)[self.counter % len(nodes)]
        self.counter += 1
        return node


class DeploymentController:
    """Deployments to pods, pod binding, and removal of orphaned pods."""

    def __init__(self, client: KubeClient, deployments: Cache[Deployment], pods: Cache[Pod],
                 nodes: Cache[Node], namespaces: Cache[Namespace]) -> None:
        self.client = client
        self.deployments = deployments
        self.pods = pods
        self.nodes = nodes
        self.namespaces = namespaces
        self.scheduler = RoundRobin()

    def _node_names(self) -> list[str]:
        return [n.metadata.name for n in self.nodes.values()]

    async def reconcile(self) -> None:
        for tracked in (self.deployments, self.pods, self.nodes, self.namespaces):
            await tracked.synced.wait()
        pods = self.pods.values()
        namespaces = {n.metadata.name for n in self.namespaces.values()}
        newest = "0"
        for dep in self.deployments.values():
            if dep.metadata.namespace not in namespaces:
                continue  # being purged by the namespace controller
            mine = [p for p in pods if p.metadata.namespace == dep.metadata.namespace
                    and owned_by(p, dep.metadata.uid)]
            plan = plan_deployment(dep, mine)
            for pod in plan.delete:
                await self._delete(pod)
            for _ in range(plan.create):
                node = self.scheduler.pick(self._node_names())
                if node is None:
                    break
                created = await self.client.create(new_pod(dep, node))
                newest = created.metadata.resource_version or newest
            status = deployment_status(dep, mine)
            if any(dep.status.get(k) != v for k, v in status.items()):
                try:
                    await self.client.patch(Deployment, dep.metadata.name, {"status": status},
                                            dep.metadata.namespace, status=True)
                except KubeApiError as exc:
                    if exc.code != 404:
                        raise
        await self._bind_and_collect(pods, namespaces)
        if newest != "0":
            await self.pods.wait_seen(newest)

    async def _bind_and_collect(self, pods: list[Pod], namespaces: set[str]) -> None:
        deployment_uids = {d.metadata.uid for d in self.deployments.values()}
        for pod in pods:
            owners = [r for r in pod.metadata.owner_references if r.kind == "Deployment"]
            if pod.metadata.namespace not in namespaces or (
                    owners and not any(r.uid in deployment_uids for r in owners)):
                await self._delete(pod)
            elif not pod.spec.node_name:
                node = self.scheduler.pick(self._node_names())
                if node is not None:
                    try:
                        await self.client.patch(Pod, pod.metadata.name,
                                                {"spec": {"nodeName": node}},
                                                pod.metadata.namespace)
                    except KubeApiError as exc:
                        if exc.code != 404:
                            raise

    async def _delete(self, pod: Pod) -> None:
        try:
            await self.client.delete(Pod, pod.metadata.name, pod.metadata.namespace)
        except KubeApiError as exc:
            if exc.code != 404:
                raise
