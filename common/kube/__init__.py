"""The Kubernetes API client: config, typed objects, verbs, and the informer loop.

::

    from common.kube import KubeClient, load_config, watch_kind, Pod, Resync, Change

    async with KubeClient(load_config(server)) as client:
        async with aclosing(watch_kind(client, Pod, label_selector="app=web")) as events:
            async for event in events:
                ...  # Resync: replace the cache; Change: apply one event
"""

from __future__ import annotations

from common.kube.client import KubeClient, ObjectList, RawWatchEvent
from common.kube.config import KubeConfig, load_config
from common.kube.objects import (
    AuthorizationPolicy,
    Deployment,
    DestinationRule,
    EndpointSlice,
    Event,
    Gateway,
    HTTPRoute,
    KubeObject,
    Namespace,
    Node,
    ObjectMeta,
    PeerAuthentication,
    Pod,
    Resource,
    Secret,
    Service,
    ServiceAccount,
    ServiceEntry,
    VirtualService,
    model_for,
    parse_object,
)
from common.kube.resources import RESOURCES, ResourceType, by_kind, lookup
from common.kube.watch import Backoff, Change, ObjectCache, Resync, watch_kind

__all__ = [
    "RESOURCES", "AuthorizationPolicy", "Backoff", "Change", "Deployment", "DestinationRule",
    "EndpointSlice", "Event", "Gateway", "HTTPRoute", "KubeClient", "KubeConfig", "KubeObject",
    "Namespace", "Node", "ObjectCache", "ObjectList", "ObjectMeta", "PeerAuthentication", "Pod",
    "RawWatchEvent", "Resource", "ResourceType", "Resync", "Secret", "Service", "ServiceAccount",
    "ServiceEntry", "VirtualService", "by_kind", "load_config", "lookup", "model_for",
    "parse_object", "watch_kind",
]
