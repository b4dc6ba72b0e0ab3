"""``ambientctl waypoint|gateway`` with the status the proxies write: readiness reads it,
and on Kubernetes apply grants the right to write it (fake API server, no sockets)."""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from common.kube import Gateway, KubeClient, KubeConfig
from deploy.ambientctl.gateway import apply_gateway, gateway_readiness, spec_from
from deploy.ambientctl.waypoint import readiness
from deploy.gateway_objects import gateway
from deploy.install import DEFAULT_IMAGE
from tests.unit.test_waypoint_objects import FakeKubernetes

RBAC = "/apis/rbac.authorization.k8s.io/v1"
GATEWAYS = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways"
PODS = "/api/v1/namespaces/shop/pods"


class FakeWithPods(FakeKubernetes):
    """Lists pods: one Ready pod of the Gateway ``edge``/``waypoint``."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == PODS:
            return httpx.Response(200, json={"kind": "PodList", "metadata": {}, "items": [{
                "metadata": {"name": "p", "namespace": "shop"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]})
        return super().__call__(request)


def gateway_args(**kw: Any) -> argparse.Namespace:
    defaults: dict[str, Any] = {"name": "edge", "no_http": False, "http_port": 80,
                                "https_port": 443, "tls_secret": ["edge-cert"],
                                "hostname": None, "image": None}
    return argparse.Namespace(**{**defaults, **kw})


async def test_gateway_apply_on_kubernetes_grants_status_and_secrets_by_name() -> None:
    fake = FakeKubernetes()
    config = KubeConfig.for_server("https://kubernetes.invalid")
    async with KubeClient(config, transport=httpx.MockTransport(fake)) as client:
        spec = spec_from(gateway_args(), "shop", kubernetes=True)
        assert spec.image == DEFAULT_IMAGE
        assert await apply_gateway(client, spec, kubernetes=True)
        assert not await apply_gateway(client, spec, kubernetes=True)
    role = fake.objects[f"{RBAC}/namespaces/shop/roles/pyambient-gateway-status-edge"]
    assert role["rules"] == [
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways/status"],
         "resourceNames": ["edge"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["edge-cert"],
         "verbs": ["get"]}]
    assert [(r["kind"], r["name"]) for r in role["metadata"]["ownerReferences"]] == \
        [("Gateway", "edge")]
    assert f"{RBAC}/namespaces/shop/rolebindings/pyambient-gateway-status-edge" in fake.objects
    assert fake.objects[f"{RBAC}/clusterrolebindings/pyambient-waypoint-shop-edge"][
        "roleRef"]["name"] == "pyambient-waypoint"


def stored(body: dict[str, Any], status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {**body, "metadata": {**body["metadata"], "generation": generation,
                                 "resourceVersion": "1"}, "status": status}


def programmed(observed: int) -> dict[str, Any]:
    return {"addresses": [{"type": "IPAddress", "value": "10.96.0.7"}],
            "conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed",
                            "message": "Resource programmed", "observedGeneration": observed}]}


async def test_gateway_status_needs_programmed_for_the_current_generation() -> None:
    fake = FakeWithPods()
    body = gateway(spec_from(gateway_args(tls_secret=[]), "shop"))
    config = KubeConfig.for_server("https://kubernetes.invalid")
    async with KubeClient(config, transport=httpx.MockTransport(fake)) as client:
        fake.objects[f"{GATEWAYS}/edge"] = stored(body, {})
        ok, why = await gateway_readiness(client, "shop", "edge")
        assert not ok and why.startswith("no Programmed condition yet")
        fake.objects[f"{GATEWAYS}/edge"] = stored(body, programmed(1), generation=2)
        ok, why = await gateway_readiness(client, "shop", "edge")
        assert not ok and "generation 1, the Gateway is at 2" in why
        fake.objects[f"{GATEWAYS}/edge"] = stored(body, programmed(2), generation=2)
        ok, why = await gateway_readiness(client, "shop", "edge")
        assert ok and why == "pods ready 1/1, address 10.96.0.7"


async def test_waypoint_readiness_waits_for_the_new_generation_to_be_observed() -> None:
    fake = FakeWithPods()
    body = Gateway.model_validate({
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}).to_dict()
    config = KubeConfig.for_server("https://kubernetes.invalid")
    async with KubeClient(config, transport=httpx.MockTransport(fake)) as client:
        fake.objects[f"{GATEWAYS}/waypoint"] = stored(body, {})
        _, ready, why = await readiness(client, "shop", "waypoint")
        assert not ready and "gateways/status" in why and \
            "Role pyambient-gateway-status-waypoint" in why
        fake.objects[f"{GATEWAYS}/waypoint"] = stored(body, programmed(2), generation=3)
        _, ready, why = await readiness(client, "shop", "waypoint")
        assert not ready and "generation 2, the Gateway is at 3" in why
        fake.objects[f"{GATEWAYS}/waypoint"] = stored(body, programmed(3), generation=3)
        _, ready, why = await readiness(client, "shop", "waypoint")
        assert ready and why == "pods ready 1/1"
