"""The discovery snapshot -> one waypoint's route table.

:class:`common.model.Snapshot` keeps the route objects as they came from the API
(``http_routes``, ``virtual_services``, ``destination_rules``,
``service_entries``); this module hands them, with the service catalogue, to
:func:`waypoint.routing.translate.translate` for one waypoint.

A waypoint routes for the services that use it (``Service.waypoint``) and, as
the design says, for the services of its own namespace; every service of the
mesh stays resolvable as a backend.  ServiceEntry hosts join the catalogue the same way
(:mod:`waypoint.egress`): every one is a backend, those that use this waypoint are served.
"""

from __future__ import annotations

from common.kube.objects import KubeObject
from common.model import Service, Snapshot, WaypointRef
from waypoint.egress import egress_served, egress_service_infos
from waypoint.routing.catalog import ApiObject, ServiceInfo, ServicePortInfo
from waypoint.routing.model import RouteTable
from waypoint.routing.translate import RouteTableStore


def service_info(svc: Service, domain: str) -> ServiceInfo:
    ports = tuple(ServicePortInfo(port=p.port, name=p.name, protocol=p.protocol,
                                  app_protocol=p.app_protocol,
                                  target_port=p.target_port if isinstance(p.target_port, int)
                                  else None)
                  for p in svc.ports)
    return ServiceInfo(name=svc.name, namespace=svc.namespace, ports=ports, vips=svc.vips,
                       domain=domain)


def api_object(obj: KubeObject) -> ApiObject:
    meta = obj.metadata
    return ApiObject(kind=obj.kind, namespace=meta.namespace or "", name=meta.name,
                     spec=obj.spec, creation_timestamp=meta.creation_timestamp or "")


def served_by(snapshot: Snapshot, waypoint: WaypointRef) -> set[tuple[str, str]]:
    """The (namespace, name) of the services ``waypoint`` routes for."""
    return {key for key, svc in snapshot.services_by_key.items()
            if svc.waypoint == waypoint or svc.namespace == waypoint.namespace}


def update_from_snapshot(store: RouteTableStore, snapshot: Snapshot,
                         waypoint: WaypointRef) -> RouteTable:
    """Translate ``snapshot`` for ``waypoint`` into ``store`` (a bug keeps the last table)."""
    services = [service_info(s, snapshot.domain) for s in snapshot.services_by_key.values()]
    services.extend(egress_service_infos(snapshot, waypoint))
    objects = [api_object(o) for group in (snapshot.destination_rules, snapshot.http_routes,
                                           snapshot.virtual_services, snapshot.service_entries)
               for o in group]
    served = served_by(snapshot, waypoint) | egress_served(snapshot, waypoint)
    return store.update(services, objects, served=served,
                        home_namespace=waypoint.namespace, domain=snapshot.domain)
