"""Typed API objects (pydantic v2) for the kinds the mesh reads and writes.

Field names are Python's (``pod_ip``); the JSON keys are Kubernetes' (``podIP``), via
aliases, and either name is accepted on input.  Every model keeps fields it does not
declare (``extra="allow"``) and :meth:`Resource.to_dict` writes them back, so reading,
changing and updating an object never drops what another writer put there.

Kinds with a schema here: Namespace, Node, Pod, Service, EndpointSlice, ServiceAccount,
Secret, Deployment, Event.  The Gateway API and Istio kinds are :class:`KubeObject`
subclasses with ``spec``/``status`` as plain dicts; their spec models live in
``common/api``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from common.kube.resources import ResourceType, by_kind


class KubeModel(BaseModel):
    """Base of every model here: camelCase JSON keys, unknown fields preserved.

    A ``null`` reads as an absent field (as Kubernetes' own types read it), so
    ``"containers": null`` in a bookmark or ``"ports": null`` from some client gets the
    field's default instead of failing the whole object.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class OwnerReference(KubeModel):
    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(KubeModel):
    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    generate_name: str | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[OwnerReference] = Field(default_factory=list)


class Resource(KubeModel):
    """Any API object: apiVersion, kind, metadata, and (kept as extras) everything else."""

    KIND: ClassVar[str] = ""

    api_version: str = ""
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    def model_post_init(self, context: Any, /) -> None:
        if self.KIND:
            rt = by_kind(self.KIND)
            self.kind = self.kind or rt.kind
            self.api_version = self.api_version or rt.api_version

    @classmethod
    def resource_type(cls) -> ResourceType:
        if not cls.KIND:
            raise TypeError(f"{cls.__name__} is not bound to a kind; use a typed subclass")
        return by_kind(cls.KIND)

    def to_dict(self) -> dict[str, Any]:
        """The object as JSON for the API (Kubernetes keys, no nulls, extras kept)."""
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        meta = data.get("metadata", {})
        for key in ("labels", "annotations", "ownerReferences"):
            if not meta.get(key, True):  # empty defaults would only add noise to diffs
                del meta[key]
        return data

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace


class KubeObject(Resource):
    """An object whose spec and status are not modelled here (Gateway API, Istio kinds)."""

    spec: dict[str, Any] = Field(default_factory=dict)
    status: dict[str, Any] = Field(default_factory=dict)


# -- core/v1 -------------------------------------------------------------------------------


class Condition(KubeModel):
    type: str = ""
    status: str = ""
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None


class NamespaceStatus(KubeModel):
    phase: str | None = None


class Namespace(Resource):
    KIND: ClassVar[str] = "Namespace"
    spec: dict[str, Any] = Field(default_factory=dict)
    status: NamespaceStatus = Field(default_factory=NamespaceStatus)


class NodeAddress(KubeModel):
    type: str = ""
    address: str = ""


class NodeStatus(KubeModel):
    addresses: list[NodeAddress] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


class NodeSpec(KubeModel):
    pod_cidr: str | None = Field(default=None, alias="podCIDR")
    pod_cidrs: list[str] | None = Field(default=None, alias="podCIDRs")


class Node(Resource):
    KIND: ClassVar[str] = "Node"
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)


class EnvVar(KubeModel):
    name: str
    value: str | None = None


class ContainerPort(KubeModel):
    container_port: int
    name: str | None = None
    protocol: str | None = None


class Container(KubeModel):
    name: str
    image: str | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    ports: list[ContainerPort] | None = None


class PodSpec(KubeModel):
    node_name: str | None = None
    service_account_name: str | None = None
    containers: list[Container] = Field(default_factory=list)
    host_network: bool | None = None


class PodIP(KubeModel):
    ip: str


class PodStatus(KubeModel):
    phase: str | None = None
    pod_ip: str | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] | None = Field(default=None, alias="podIPs")
    host_ip: str | None = Field(default=None, alias="hostIP")
    conditions: list[Condition] | None = None


class Pod(Resource):
    KIND: ClassVar[str] = "Pod"
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)


class ServicePort(KubeModel):
    port: int
    name: str | None = None
    target_port: int | str | None = None
    protocol: str | None = None
    app_protocol: str | None = None


class ServiceSpec(KubeModel):
    selector: dict[str, str] | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] | None = Field(default=None, alias="clusterIPs")
    type: str | None = None


class Service(Resource):
    KIND: ClassVar[str] = "Service"
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: dict[str, Any] = Field(default_factory=dict)


class ServiceAccount(Resource):
    KIND: ClassVar[str] = "ServiceAccount"


class Secret(Resource):
    KIND: ClassVar[str] = "Secret"
    type: str | None = None
    data: dict[str, str] | None = None
    string_data: dict[str, str] | None = None


class ObjectReference(KubeModel):
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    api_version: str | None = None
    resource_version: str | None = None
    field_path: str | None = None


class Event(Resource):
    KIND: ClassVar[str] = "Event"
    involved_object: ObjectReference = Field(default_factory=ObjectReference)
    reason: str | None = None
    message: str | None = None
    type: str | None = None
    count: int | None = None
    first_timestamp: str | None = None
    last_timestamp: str | None = None


# -- discovery.k8s.io/v1 ----------------------------------------------------------------------


class EndpointConditions(KubeModel):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class Endpoint(KubeModel):
    addresses: list[str] = Field(default_factory=list)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    node_name: str | None = None
    zone: str | None = None
    target_ref: ObjectReference | None = None


class EndpointPort(KubeModel):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None
    app_protocol: str | None = None


class EndpointSlice(Resource):
    KIND: ClassVar[str] = "EndpointSlice"
    address_type: str = "IPv4"
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] | None = None


# -- apps/v1 ------------------------------------------------------------------------------------


class LabelSelectorRequirement(KubeModel):
    key: str
    operator: str
    values: list[str] | None = None


class LabelSelectorSpec(KubeModel):
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


class PodTemplateSpec(KubeModel):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PodSpec = Field(default_factory=PodSpec)


class DeploymentSpec(KubeModel):
    replicas: int | None = None
    selector: LabelSelectorSpec = Field(default_factory=LabelSelectorSpec)
    template: PodTemplateSpec = Field(default_factory=PodTemplateSpec)


class Deployment(Resource):
    KIND: ClassVar[str] = "Deployment"
    spec: DeploymentSpec = Field(default_factory=DeploymentSpec)
    status: dict[str, Any] = Field(default_factory=dict)


# -- Gateway API and Istio: spec/status as dicts -----------------------------------------------


class Gateway(KubeObject):
    KIND: ClassVar[str] = "Gateway"


class HTTPRoute(KubeObject):
    KIND: ClassVar[str] = "HTTPRoute"


class VirtualService(KubeObject):
    KIND: ClassVar[str] = "VirtualService"


class DestinationRule(KubeObject):
    KIND: ClassVar[str] = "DestinationRule"


class ServiceEntry(KubeObject):
    KIND: ClassVar[str] = "ServiceEntry"


class AuthorizationPolicy(KubeObject):
    KIND: ClassVar[str] = "AuthorizationPolicy"


class PeerAuthentication(KubeObject):
    KIND: ClassVar[str] = "PeerAuthentication"


MODELS: dict[str, type[Resource]] = {
    cls.KIND: cls for cls in (
        Namespace, Node, Pod, Service, ServiceAccount, Secret, Event, EndpointSlice, Deployment,
        Gateway, HTTPRoute, VirtualService, DestinationRule, ServiceEntry, AuthorizationPolicy,
        PeerAuthentication)
}


def model_for(kind: str) -> type[Resource]:
    """The model class of an exact Kind (``Pod``); :class:`KeyError` when unknown."""
    return MODELS[kind]


def parse_object(data: dict[str, Any]) -> Resource:
    """A typed object from JSON, by its ``kind`` (a :class:`KubeObject` for unknown kinds)."""
    cls = MODELS.get(str(data.get("kind", "")), KubeObject)
    return cls.model_validate(data)
