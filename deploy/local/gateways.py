"""The waypoint Gateway controller of the local cluster: dependants, status, owner GC.

For every ``istio-waypoint`` Gateway it creates the ServiceAccount, Deployment and
Service that are missing (as istiod does, so ``ambientctl apply -f`` of a bare waypoint
Gateway deploys it; it never changes existing ones, which ``ambientctl waypoint apply``
owns), and writes the status Istio would write (the pure core is
:func:`deploy.waypoint_objects.gateway_status`): ``Accepted``, and ``Programmed`` once the
Gateway's Service has a cluster IP and one of its pods is Ready.

Kubernetes' garbage collector deletes objects whose owner is gone; the local API server
has none, so this controller does that job for what a waypoint owns: a Deployment,
Service or ServiceAccount whose owner reference names a Gateway that no longer exists
(or exists under another uid) is deleted, so deleting the Gateway is enough here too.
Its caches may see the dependant before the owner (separate watches), so the owner is
looked up on the API server before anything is deleted, as Kubernetes' collector does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from common.errors import KubeApiError
from common.kube import Deployment, Gateway, KubeClient, Pod, Service, ServiceAccount
from common.kube.client import R
from common.logging import get_logger
from deploy.local.informer import Cache
from deploy.waypoint_objects import GATEWAY_NAME_LABEL, dependants_of, gateway_status

log = get_logger("local.gateways")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GatewayController:
    """Waypoint Gateways' missing objects and status; deletion of what a deleted one owned."""

    def __init__(self, client: KubeClient, gateways: Cache[Gateway], pods: Cache[Pod],
                 services: Cache[Service], deployments: Cache[Deployment],
                 accounts: Cache[ServiceAccount]) -> None:
        self.client = client
        self.gateways = gateways
        self.pods = pods
        self.services = services
        self.deployments = deployments
        self.accounts = accounts

    async def reconcile(self) -> None:
        for tracked in (self.gateways, self.pods, self.services, self.deployments,
                        self.accounts):
            await tracked.synced.wait()
        # Pods by the waypoint they serve, once, rather than every pod for every Gateway.
        serving: dict[tuple[str | None, str], list[Pod]] = {}
        for pod in self.pods.values():
            if (name := pod.metadata.labels.get(GATEWAY_NAME_LABEL)) is not None:
                serving.setdefault((pod.metadata.namespace, name), []).append(pod)
        for gw in self.gateways.values():
            await self._create_missing(gw)
            ns = gw.metadata.namespace
            status = gateway_status(gw, serving.get((ns, gw.metadata.name), []),
                                    self.services.get(ns, gw.metadata.name), now())
            if status is None or status == gw.status:
                continue
            try:
                written = await self.client.patch(Gateway, gw.metadata.name,
                                                  {"status": status}, ns, status=True)
            except KubeApiError as exc:
                if exc.code != 404:
                    raise
                continue
            await self.gateways.wait_seen(written.metadata.resource_version)
        await self._collect(self.deployments)
        await self._collect(self.services)
        await self._collect(self.accounts)

    async def _create_missing(self, gw: Gateway) -> None:
        caches: dict[str, Cache[Any]] = {"ServiceAccount": self.accounts,
                                         "Deployment": self.deployments,
                                         "Service": self.services}
        confirmed = False
        for body in dependants_of(gw):
            cache = caches[body["kind"]]
            if cache.get(gw.metadata.namespace, gw.metadata.name) is not None:
                continue
            # A Gateway just deleted (``ambientctl waypoint delete`` removes it first) may
            # linger in the cache: ask the server before bringing its objects back.
            if not confirmed and not await self._owner_exists(
                    gw.metadata.namespace, gw.metadata.name, gw.metadata.uid or ""):
                return
            confirmed = True
            try:
                created = await self.client.create(cache.kind.model_validate(body))
            except KubeApiError as exc:
                if exc.code in (404, 409):  # namespace going away, or our cache is behind
                    continue
                raise
            log.info("waypoint_dependant_created", kind=body["kind"],
                     namespace=gw.metadata.namespace, name=gw.metadata.name)
            await cache.wait_seen(created.metadata.resource_version)

    async def _collect(self, cache: Cache[R]) -> None:
        live = {(g.metadata.namespace, g.metadata.name): g.metadata.uid
                for g in self.gateways.values()}
        for obj in cache.values():
            ns = obj.metadata.namespace
            for ref in obj.metadata.owner_references:
                if ref.kind != "Gateway" or live.get((ns, ref.name)) == ref.uid:
                    continue
                if await self._owner_exists(ns, ref.name, ref.uid):
                    continue
                try:
                    await self.client.delete(type(obj), obj.metadata.name, ns)
                except KubeApiError as exc:
                    if exc.code != 404:
                        raise
                log.info("owner_gone_deleted", kind=obj.kind, namespace=ns,
                         name=obj.metadata.name, gateway=ref.name)
                break

    async def _owner_exists(self, namespace: str | None, name: str, uid: str) -> bool:
        try:
            owner = await self.client.get(Gateway, name, namespace)
        except KubeApiError as exc:
            if exc.code == 404:
                return False
            raise
        return owner.metadata.uid == uid
