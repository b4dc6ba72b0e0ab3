"""The namespace controller: deleting a Namespace deletes everything in it.

The local API server deletes a Namespace at once and leaves its contents in place (it
has no finalizers); this controller notices a namespace that disappeared and deletes the
namespaced objects of every kind the API serves in it, so pods stop, Services lose
their VIP rules and nothing is left for a later namespace of the same name.  It also
gives every new namespace its ``default`` ServiceAccount.
"""

from __future__ import annotations

from common.errors import KubeApiError
from common.kube import KubeClient, Namespace, ServiceAccount
from common.kube.resources import RESOURCES
from common.logging import get_logger
from deploy.local.informer import Cache

log = get_logger("local.namespaces")


class NamespaceController:
    def __init__(self, client: KubeClient, namespaces: Cache[Namespace]) -> None:
        self.client = client
        self.namespaces = namespaces
        self.known: set[str] = set()

    async def reconcile(self) -> None:
        await self.namespaces.synced.wait()
        current = {n.metadata.name for n in self.namespaces.values()}
        for ns in sorted(self.known - current):
            await self.purge(ns)
            self.known.discard(ns)  # only once purged: a failure is retried
        for ns in sorted(current - self.known):
            await self.default_service_account(ns)
            self.known.add(ns)

    async def default_service_account(self, namespace: str) -> None:
        """Every namespace has a ``default`` ServiceAccount, as in Kubernetes."""
        try:
            await self.client.create(ServiceAccount.model_validate(
                {"metadata": {"name": "default", "namespace": namespace}}))
        except KubeApiError as exc:
            if exc.code not in (404, 409):  # namespace just deleted, or it exists
                raise

    async def purge(self, namespace: str) -> None:
        deleted = 0
        for rt in RESOURCES:
            if not rt.namespaced:
                continue
            data = await self.client.request("GET", rt.collection_path(namespace))
            for item in data.get("items") or []:
                try:
                    await self.client.request(
                        "DELETE", rt.object_path(item["metadata"]["name"], namespace))
                    deleted += 1
                except KubeApiError as exc:
                    if exc.code != 404:
                        raise
        log.info("namespace_purged", namespace=namespace, objects=deleted)
