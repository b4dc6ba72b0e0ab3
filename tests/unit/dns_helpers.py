"""Hand-built services and snapshots for the DNS proxy's tests, and a tiny query builder."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from common.authz.model import ServiceRef
from common.kube.objects import KubeObject
from common.model import Endpoint, Service, Snapshot
from ztunnel.dns.wire import FLAG_RD, Message, Question, build, name_from_text, opt_record


def service(name: str, namespace: str, vips: Iterable[str] = (),
            ready_ips: Iterable[str] = ()) -> Service:
    endpoints = tuple(Endpoint(ip, True) for ip in ready_ips)
    return Service(
        namespace=namespace, name=name, hostname=f"{name}.{namespace}.svc.cluster.local",
        vips=tuple(vips), ports=(), endpoints=endpoints, waypoint=None, labels={},
        waypoint_of=None, ref=ServiceRef(namespace, name), ports_by_number={},
        ready_endpoints=endpoints, ready_by_zone={}, ready_by_region={})


def service_entry(name: str, namespace: str, spec: Mapping[str, Any]) -> KubeObject:
    return KubeObject.model_validate({"apiVersion": "networking.istio.io/v1",
                                      "kind": "ServiceEntry",
                                      "metadata": {"name": name, "namespace": namespace},
                                      "spec": dict(spec)})


def snapshot(services: Iterable[Service], namespaces: Iterable[str] = (), *,
             service_entries: Iterable[KubeObject] = (), version: int = 1) -> Snapshot:
    svcs = list(services)
    by_host: dict[str, Service] = {}
    for s in svcs:
        short = f"{s.name}.{s.namespace}"
        for host in (s.hostname, short, f"{short}.svc"):
            by_host[host] = s
    ns = set(namespaces) | {s.namespace for s in svcs}
    return Snapshot(
        version=version, services_by_key={s.key: s for s in svcs}, services_by_host=by_host,
        services_by_vip={v: s for s in svcs for v in s.vips},
        namespaces={n: {} for n in ns}, service_entries=tuple(service_entries))


def query(name: str, qtype: int, *, msg_id: int = 4242, edns: int | None = None) -> Message:
    additionals = (opt_record(edns),) if edns is not None else ()
    return Message(msg_id, FLAG_RD, (Question(name_from_text(name), qtype),),
                   additionals=additionals)


def query_bytes(name: str, qtype: int, **kw: Any) -> bytes:
    return build(query(name, qtype, **kw))
