from __future__ import annotations

import pytest

from common.kube import (
    RESOURCES,
    Deployment,
    EndpointSlice,
    Gateway,
    KubeObject,
    ObjectMeta,
    Pod,
    Service,
    by_kind,
    lookup,
    model_for,
    parse_object,
)
from common.kube.resources import by_group_plural, group_versions


@pytest.mark.parametrize(("name", "kind"), [
    ("pods", "Pod"), ("pod", "Pod"), ("po", "Pod"), ("Pod", "Pod"), ("svc", "Service"),
    ("deploy", "Deployment"), ("deployments.apps", "Deployment"), ("ns", "Namespace"),
    ("httproute", "HTTPRoute"), ("vs", "VirtualService"), ("dr", "DestinationRule"),
    ("ap", "AuthorizationPolicy"), ("pa", "PeerAuthentication"), ("se", "ServiceEntry"),
    ("gtw", "Gateway"), ("gateways.gateway.networking.k8s.io", "Gateway"),
    ("endpointslices", "EndpointSlice"), ("no", "Node"), ("sa", "ServiceAccount"),
])
def test_kubectl_names_resolve(name: str, kind: str) -> None:
    rt = lookup(name)
    assert rt is not None and rt.kind == kind


def test_paths_and_scopes() -> None:
    assert by_kind("Pod").collection_path("demo") == "/api/v1/namespaces/demo/pods"
    assert by_kind("Pod").collection_path() == "/api/v1/pods"
    assert by_kind("Namespace").object_path("demo", None, "status") == \
        "/api/v1/namespaces/demo/status"
    assert by_kind("HTTPRoute").object_path("r", "demo") == \
        "/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/r"
    assert by_group_plural("networking.istio.io", "v1alpha3", "virtualservices") is not None
    assert by_group_plural("apps", "v1", "pods") is None
    assert group_versions()["networking.istio.io"][0] == "v1"
    assert all(rt.namespaced for rt in RESOURCES if rt.kind not in ("Namespace", "Node"))
    with pytest.raises(ValueError):
        by_kind("Pod").object_path("x")


def test_typed_models_read_kubernetes_json_and_write_it_back() -> None:
    raw = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "demo", "labels": {"app": "web"},
                        "finalizers": ["x"]},
           "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10",
                    "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                    "ports": [{"name": "http", "port": 80, "targetPort": "http",
                               "protocol": "TCP", "appProtocol": "http"}],
                    "sessionAffinity": "None"},
           "status": {"loadBalancer": {}}}
    svc = parse_object(raw)
    assert isinstance(svc, Service)
    assert svc.spec.cluster_ip == "10.96.0.10" and svc.spec.ports[0].target_port == "http"
    assert svc.to_dict() == raw


def test_endpointslice_and_deployment_fields() -> None:
    eps = EndpointSlice.model_validate({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True},
                       "nodeName": "node-1", "zone": "zone-a",
                       "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    assert eps.endpoints[0].conditions.ready is True
    assert eps.endpoints[0].target_ref is not None and eps.endpoints[0].target_ref.name == "web-1"
    dep = Deployment.model_validate({"spec": {"replicas": 2,
                                              "selector": {"matchLabels": {"app": "web"}},
                                              "template": {"metadata": {"labels": {"app": "web"}},
                                                           "spec": {"containers": [
                                                               {"name": "c", "image": "i"}]}}}})
    assert dep.kind == "Deployment" and dep.api_version == "apps/v1"
    assert dep.spec.selector.match_labels == {"app": "web"}
    assert dep.spec.template.spec.containers[0].image == "i"


def test_crd_kinds_keep_spec_as_dict_and_unknown_kinds_parse_generically() -> None:
    gw = Gateway(metadata=ObjectMeta(name="waypoint", namespace="demo"),
                 spec={"gatewayClassName": "istio-waypoint"})
    assert gw.to_dict()["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert model_for("Gateway") is Gateway
    other = parse_object({"apiVersion": "x/v1", "kind": "Widget", "metadata": {"name": "w"},
                          "spec": {"a": 1}})
    assert type(other) is KubeObject and other.spec == {"a": 1}
    with pytest.raises(TypeError):
        KubeObject.resource_type()


def test_empty_metadata_defaults_are_not_written() -> None:
    pod = Pod(metadata=ObjectMeta(name="p"))
    pod.metadata.labels["a"] = "b"
    assert pod.to_dict()["metadata"] == {"name": "p", "labels": {"a": "b"}}


def test_nulls_read_as_absent_fields() -> None:
    bookmark = {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": "9", "creationTimestamp": None},
                "spec": {"containers": None}, "status": {}}
    pod = Pod.model_validate(bookmark)
    assert pod.spec.containers == [] and pod.metadata.creation_timestamp is None
    svc = Service.model_validate({"metadata": {"name": "s"}, "spec": {"ports": None,
                                                                      "selector": None}})
    assert svc.spec.ports == [] and svc.spec.selector is None
