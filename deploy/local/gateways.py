"""The waypoint Gateway controller of the local cluster: dependants and owner GC.

For every ``istio-waypoint`` Gateway it creates the ServiceAccount, Deployment and
Service that are missing (as istiod does, so ``ambientctl apply -f`` of a bare waypoint
Gateway deploys it; it never changes existing ones, which ``ambientctl waypoint apply``
owns).  It writes no status: the waypoint (and the ingress gateway) writes its own
Gateway's status once it is ready (:mod:`waypoint.gateway_status`), here as on
Kubernetes, so both clusters show the same thing from the same code.

Kubernetes' garbage collector deletes objects whose owner is gone; the local API server
has none, so this controller does that job for what a waypoint owns: a Deployment,
Service or ServiceAccount whose owner reference names a Gateway that no longer exists
(or exists under another uid) is deleted, so deleting the Gateway is enough here too.
Its caches may see the dependant before the owner (separate watches), so the owner is
looked up on the API server before anything is deleted, as Kubernetes' collector does.
"""

from __future__ import annotations

from typing import Any

from common.errors import KubeApiError
from common.kube import Deployment, Gateway, KubeClient, Service, ServiceAccount
from common.kube.client import R
from common.logging import get_logger
from deploy.local.informer import Cache
from deploy.waypoint_objects import dependants_of

log = get_logger("local.gateways")


class GatewayController:
    """Waypoint Gateways' missing objects; deletion of what a deleted one owned."""

    def __init__(self, client: KubeClient, gateways: Cache[Gateway],
                 services: Cache[Service], deployments: Cache[Deployment],
                 accounts: Cache[ServiceAccount]) -> None:
        self.client = client
        self.gateways = gateways
        self.services = services
        self.deployments = deployments
        self.accounts = accounts

    async def reconcile(self) -> None:
        for tracked in (self.gateways, self.services, self.deployments,
                        self.accounts):
            await tracked.synced.wait()
        for gw in self.gateways.values():
            await self._create_missing(gw)
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
