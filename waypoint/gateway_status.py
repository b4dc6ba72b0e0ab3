"""The status a waypoint (or ingress gateway) writes on its own Gateway.

Theory of operation.  On Istio, istiod writes a Gateway's ``status``; this mesh has no
controller on a real cluster, so the proxy that serves the Gateway writes it itself, as
soon as it is ready and again whenever what it reports changes (a new
``metadata.generation``, the Service's address, the routes attached to a listener).

:func:`gateway_status` is the sans-I/O core: from the Gateway, its Service (named like
it) and whether this replica is ready, it computes the ``status`` Istio would write:

* ``conditions``: ``Accepted`` (the spec is one this proxy can serve) and
  ``Programmed`` (accepted, and the Service gives it an address), each with the
  Gateway's ``observedGeneration``; a condition keeps its ``lastTransitionTime`` while
  its status does not change, and conditions of other types (another controller's) are
  kept where they are, as the Gateway API asks of every writer;
* ``addresses``: the Service's cluster IPs, or its DNS name
  (``<name>.<ns>.svc.<domain>``) when it has none;
* ``listeners``: per listener the route kinds it supports, how many routes attach to it
  (ingress gateways; routes reach a waypoint through Services, never its listener), and
  the conditions ``Accepted``, ``Conflicted``, ``ResolvedRefs`` and ``Programmed``.

A replica that is not ready says nothing (None): during a rolling update another one
may be serving, and a status flapping to ``Programmed=False`` would be wrong.

:class:`GatewayStatusWriter` is the trio shell: it watches the one Gateway and the one
Service (field selector on the name), follows the discovery snapshots for the routes,
and merge-patches the ``status`` subresource only when the result differs from what is
stored.  The patch carries the ``resourceVersion`` it was computed from, so a write
based on a stale copy fails with 409 instead of undoing someone else's; the watch then
brings the newer copy and the writer tries again.  On Kubernetes it needs ``get`` and
``patch`` on ``gateways/status`` for its own Gateway (:func:`deploy.install.gateway_status_rbac`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import trio
from pydantic import ValidationError

from common.api.gateway import GatewaySpec
from common.errors import KubeApiError
from common.kube import Backoff, Gateway, KubeClient, Service, watch_kind
from common.kube.client import R
from common.kube.watch import Resync
from common.logging import get_logger
from common.model import DEFAULT_DOMAIN
from waypoint.ingress import INGRESS_CLASSES, ingress_routes, listeners_of
from waypoint.routing.catalog import ApiObject
from waypoint.routing.snapshot import api_object

if TYPE_CHECKING:
    from common.discovery import SnapshotHolder

_log = get_logger("waypoint.gateway_status")

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_GROUP = "gateway.networking.k8s.io"
HBONE_PORT = 15008
HBONE_PROTOCOL = "HBONE"
#: The route kinds an ingress listener serves (HTTP and HTTPS alike).
INGRESS_ROUTE_KINDS = ({"group": GATEWAY_GROUP, "kind": "HTTPRoute"},)
#: The Gateway conditions this writer owns; other types are left as they are.
GATEWAY_CONDITIONS = ("Accepted", "Programmed")
#: How often a starting proxy looks at its ready flag until it is first set (a plain
#: attribute set by the route follower; the wait ends for good once it is).
READY_POLL_SECONDS = 0.1
#: Retry bounds when a write fails for a reason no watch event will cure (403, 5xx).
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 30.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the core ---------------------------------------------------------------------------


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind)
    since = old.get("lastTransitionTime") if old is not None and \
        old.get("status") == status else None
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since or now}


def _conditions_by_type(items: Any) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in items or [] if isinstance(c, Mapping)}


def _merged(stored: Any, ours: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ours`` in place of the stored conditions of the same types; other types kept
    in their place (the Gateway API's rule for conditions another writer owns)."""
    mine = {c["type"]: c for c in ours}
    out: list[dict[str, Any]] = []
    for cond in stored or []:
        if not isinstance(cond, Mapping):
            continue
        kind = str(cond.get("type"))
        out.append(mine.pop(kind) if kind in mine else dict(cond))
    out.extend(c for c in ours if c["type"] in mine)
    return out


def _spec_problem(spec: Mapping[str, Any]) -> str | None:
    try:
        GatewaySpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"spec.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return None


def _listener_problem(gateway_class: str, listener: Mapping[str, Any],
                      namespace: str) -> tuple[str, str] | None:
    """(reason, message) why this proxy cannot serve ``listener``, or None."""
    protocol = str(listener.get("protocol", ""))
    if gateway_class == WAYPOINT_CLASS:
        if protocol == HBONE_PROTOCOL and listener.get("port") == HBONE_PORT:
            return None
        if protocol == HBONE_PROTOCOL:
            return "PortUnavailable", f"a waypoint serves HBONE on port {HBONE_PORT} only"
        return "UnsupportedProtocol", (f"protocol {protocol!r} is not served by a waypoint "
                                       f"(only {HBONE_PROTOCOL} on {HBONE_PORT})")
    if protocol not in ("HTTP", "HTTPS"):
        return "UnsupportedProtocol", f"protocol {protocol!r} is not served (HTTP, HTTPS)"
    _, issues = listeners_of({"gatewayClassName": gateway_class, "listeners": [listener]},
                             namespace)
    return ("Invalid", "; ".join(issues)) if issues else None


def _conflicts(listeners: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Listener name -> (reason, message) for listeners sharing a port badly."""
    out: dict[str, tuple[str, str]] = {}
    for i, a in enumerate(listeners):
        for b in (*listeners[:i], *listeners[i + 1:]):
            if a.get("port") != b.get("port"):
                continue
            if a.get("protocol") != b.get("protocol"):
                out[str(a.get("name"))] = ("ProtocolConflict",
                                           f"port {a.get('port')} is also listener "
                                           f"{b.get('name')!r} with protocol {b.get('protocol')}")
            elif a.get("hostname") == b.get("hostname"):
                out[str(a.get("name"))] = ("HostnameConflict",
                                           f"listener {b.get('name')!r} has the same port and "
                                           "hostname")
    return out


def _supported_kinds(gateway_class: str, listener: Mapping[str, Any]
                     ) -> tuple[list[dict[str, str]], list[str]]:
    """(route kinds the listener supports, kinds it was asked for but cannot)."""
    if gateway_class == WAYPOINT_CLASS:
        return [], []
    asked = (listener.get("allowedRoutes") or {}).get("kinds")
    if not asked:
        return [dict(k) for k in INGRESS_ROUTE_KINDS], []
    known = {(k["group"], k["kind"]) for k in INGRESS_ROUTE_KINDS}
    good, bad = [], []
    for kind in asked:
        group = str(kind.get("group", GATEWAY_GROUP))
        if (group, str(kind.get("kind"))) in known:
            good.append({"group": group, "kind": str(kind.get("kind"))})
        else:
            bad.append(f"{group}/{kind.get('kind')}")
    return good, bad


def attached_routes(gw: Gateway, routes: Iterable[ApiObject]) -> dict[str, int]:
    """Listener name -> how many HTTPRoutes attach to it (the ingress's own rules:
    parentRef, sectionName, port, allowedRoutes and hostname intersection)."""
    namespace = gw.metadata.namespace or "default"
    served, _ = listeners_of(gw.spec, namespace)
    routes = [r for r in routes if r.kind == "HTTPRoute"]
    return {lst.name: len({(o.namespace, o.name) for o in ingress_routes(
        namespace, gw.metadata.name, [lst], routes).objects}) for lst in served}


def _addresses(service: Service | None, hostname: str) -> list[dict[str, str]]:
    if service is None:
        return []
    ips = [ip for ip in (service.spec.cluster_ips or [service.spec.cluster_ip or ""])
           if ip and ip != "None"]
    if ips:
        return [{"type": "IPAddress", "value": ip} for ip in dict.fromkeys(ips)]
    return [{"type": "Hostname", "value": hostname}]


def gateway_status(gw: Gateway, service: Service | None, ready: bool, now: str, *,
                   routes: Iterable[ApiObject] = (),
                   certificates: Collection[str] | None = None,
                   domain: str = DEFAULT_DOMAIN) -> dict[str, Any] | None:
    """The ``status`` to write on ``gw``, or None when this replica must say nothing.

    ``service`` is the Service named like the Gateway (None when missing), ``ready``
    whether this replica serves, ``now`` the RFC 3339 time for conditions that change,
    ``routes`` the HTTPRoutes (ingress: counted per listener), ``certificates`` the
    names of the HTTPS listeners whose certificates loaded (None: not checked).  None
    when the class is not one this proxy serves, when not ready, or when the stored
    status is from a newer generation than ``gw`` (a stale copy: wait for the next).
    Equal inputs give an equal result, equal to what is stored when nothing changed.
    """
    gateway_class = str(gw.spec.get("gatewayClassName", ""))
    if not ready or (gateway_class != WAYPOINT_CLASS and gateway_class not in INGRESS_CLASSES):
        return None
    generation = gw.metadata.generation or 1
    previous = _conditions_by_type(gw.status.get("conditions"))
    if any(int(previous[t].get("observedGeneration") or 0) > generation
           for t in GATEWAY_CONDITIONS if t in previous):
        return None
    ns, name = gw.metadata.namespace or "default", gw.metadata.name
    hostname = f"{name}.{ns}.svc.{domain}"
    listeners = [lst for lst in gw.spec.get("listeners") or [] if isinstance(lst, Mapping)]

    spec_problem = _spec_problem(gw.spec)
    problems = {str(lst.get("name")): _listener_problem(gateway_class, lst, ns)
                for lst in listeners}
    valid = [lst for lst in listeners if problems[str(lst.get("name"))] is None]
    if spec_problem is not None:
        accepted = (False, "Invalid", spec_problem)
    elif not valid:
        reasons = "; ".join(f"{n}: {p[1]}" for n, p in problems.items() if p) or \
            "no listeners"
        accepted = (False, "ListenersNotValid" if listeners else "Invalid",
                    f"no listener can be served ({reasons})" if gateway_class != WAYPOINT_CLASS
                    else f"a waypoint needs a listener with port {HBONE_PORT} and protocol "
                         f"{HBONE_PROTOCOL} (name it 'mesh'): {reasons}")
    elif len(valid) < len(listeners):
        accepted = (True, "ListenersNotValid", "Resource accepted; listeners not served: "
                    + ", ".join(n for n, p in problems.items() if p))
    else:
        accepted = (True, "Accepted", "Resource accepted")

    addresses = _addresses(service, hostname)
    ports = sorted({int(lst["port"]) for lst in valid if isinstance(lst.get("port"), int)})
    if not accepted[0]:
        programmed = (False, "Invalid", "the Gateway is not accepted: " + accepted[2])
    elif service is None:
        programmed = (False, "AddressNotAssigned",
                      f"Service {ns}/{name} is missing: the proxy has no address (apply the "
                      f"waypoint or gateway again to recreate it)")
    else:
        programmed = (True, "Programmed", "Resource programmed, assigned to service(s) "
                      + ", ".join(f"{hostname}:{p}" for p in ports))
    status: dict[str, Any] = {
        "addresses": addresses or None,
        "conditions": _merged(gw.status.get("conditions"), [
            _condition("Accepted", *accepted, generation, previous, now),
            _condition("Programmed", *programmed, generation, previous, now)]),
        "listeners": _listener_statuses(gw, gateway_class, listeners, problems,
                                        programmed[0], routes, certificates, now) or None,
    }
    return status


def _listener_statuses(gw: Gateway, gateway_class: str,
                       listeners: Sequence[Mapping[str, Any]],
                       problems: Mapping[str, tuple[str, str] | None], programmed: bool,
                       routes: Iterable[ApiObject], certificates: Collection[str] | None,
                       now: str) -> list[dict[str, Any]]:
    generation = gw.metadata.generation or 1
    stored = {str(x.get("name")): x for x in gw.status.get("listeners") or []
              if isinstance(x, Mapping)}
    attached = attached_routes(gw, routes) if gateway_class != WAYPOINT_CLASS else {}
    conflicts = _conflicts(listeners)
    out = []
    for lst in listeners:
        name = str(lst.get("name"))
        old = stored.get(name) or {}
        previous = _conditions_by_type(old.get("conditions"))
        problem = problems.get(name)
        kinds, bad_kinds = _supported_kinds(gateway_class, lst)
        unresolved: tuple[str, str] | None = None
        if bad_kinds:
            unresolved = ("InvalidRouteKinds", "route kinds not supported: "
                          + ", ".join(bad_kinds))
        elif certificates is not None and lst.get("protocol") == "HTTPS" and problem is None \
                and name not in certificates:
            unresolved = ("InvalidCertificateRef",
                          "no certificate of tls.certificateRefs could be read and loaded: "
                          "check each Secret exists in the namespace, is kubernetes.io/tls "
                          "and holds tls.crt and tls.key")
        conflict = conflicts.get(name)
        serving = problem is None and unresolved is None and conflict is None and programmed
        wrong = problem or unresolved or conflict
        if serving:
            listener_programmed = ("Programmed", "No errors found")
        elif wrong is not None:
            listener_programmed = ("Invalid", wrong[1])
        else:
            listener_programmed = ("Pending", "the Gateway is not programmed yet")
        ours = [
            _condition("Accepted", problem is None, *(problem or ("Accepted", "No errors found")),
                       generation, previous, now),
            _condition("Conflicted", conflict is not None,
                       *(conflict or ("NoConflicts", "No errors found")), generation,
                       previous, now),
            _condition("ResolvedRefs", unresolved is None,
                       *(unresolved or ("ResolvedRefs", "No errors found")), generation,
                       previous, now),
            _condition("Programmed", serving, *listener_programmed, generation, previous,
                       now),
        ]
        out.append({"name": name, "supportedKinds": kinds,
                    "attachedRoutes": attached.get(name, 0),
                    "conditions": _merged(old.get("conditions"), ours)})
    return out


def status_patch(gw: Gateway, desired: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The merge patch that writes ``desired`` over ``gw``'s stored status, or None when
    it is already there.  A None field removes it (merge-patch null); the patch names the
    ``resourceVersion`` it was computed from, so the server refuses it (409) when the
    Gateway changed meanwhile."""
    if desired is None or all(gw.status.get(k) == v for k, v in desired.items()):
        return None
    return {"metadata": {"resourceVersion": gw.metadata.resource_version},
            "status": dict(desired)}


# --- the shell --------------------------------------------------------------------------


class GatewayStatusWriter:
    """Keeps ``namespace/name``'s Gateway status current while this proxy is ready.

    ``ready`` is read after every change (and polled until it is first true);
    ``holder`` supplies the routes and the cluster domain; ``certificates`` the names of
    the HTTPS listeners whose certificates loaded (ingress gateways).  ``writes`` counts
    the patches the server accepted.  Runs until cancelled; cancellation leaves the
    last written status in place (the next replica, or this one restarted, updates it).
    """

    def __init__(self, client: KubeClient, namespace: str, name: str, *,
                 ready: Callable[[], bool], holder: SnapshotHolder | None = None,
                 certificates: Callable[[], Collection[str]] | None = None,
                 clock: Callable[[], str] = now_rfc3339) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.ready = ready
        self.holder = holder
        self.certificates = certificates
        self.clock = clock
        self.writes = 0
        self._gateway: Gateway | None = None
        self._service: Service | None = None
        self._synced: set[str] = set()
        self._wake = trio.Event()
        self._log = _log.bind(gateway=f"{namespace}/{name}")

    def _poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow, Gateway)
            nursery.start_soon(self._follow, Service)
            if self.holder is not None:
                nursery.start_soon(self._follow_snapshots, self.holder)
            nursery.start_soon(self._wait_ready)
            await self._write_loop()

    async def _follow(self, kind: type[R]) -> None:
        async with aclosing(watch_kind(self.client, kind, self.namespace,
                                       field_selector=f"metadata.name={self.name}")) as events:
            async for event in events:
                if isinstance(event, Resync):
                    obj = next((o for o in event.objects if o.metadata.name == self.name), None)
                else:
                    obj = None if event.type == "DELETED" else event.object
                if kind is Gateway:
                    self._gateway = obj if isinstance(obj, Gateway) else None
                else:
                    self._service = obj if isinstance(obj, Service) else None
                self._synced.add(kind.__name__)
                self._poke()

    async def _follow_snapshots(self, holder: SnapshotHolder) -> None:
        async for _snap in holder.subscribe():
            self._poke()

    async def _wait_ready(self) -> None:
        while not self.ready():  # noqa: ASYNC110 - a plain attribute, no event to await
            await trio.sleep(READY_POLL_SECONDS)
        self._poke()

    def desired(self) -> dict[str, Any] | None:
        """What the status should be now (None: nothing to write yet)."""
        gw = self._gateway
        if gw is None or len(self._synced) < 2:
            return None
        snap = self.holder.current if self.holder is not None else None
        if snap is not None and snap.version == 0:
            return None  # the routes are not known yet
        # Only an ingress gateway counts routes (a waypoint's attach to Services).
        counts_routes = snap is not None and gw.spec.get("gatewayClassName") in INGRESS_CLASSES
        return gateway_status(
            gw, self._service, self.ready(), self.clock(),
            routes=[api_object(r) for r in snap.http_routes] if snap is not None and
            counts_routes else (),
            certificates=self.certificates() if self.certificates is not None else None,
            domain=snap.domain if snap is not None else DEFAULT_DOMAIN)

    async def _write_loop(self) -> None:
        backoff = Backoff(base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
        retry_in = math.inf
        while True:
            with trio.move_on_after(retry_in):
                await self._wake.wait()
            self._wake = trio.Event()
            retry_in = math.inf
            gw = self._gateway
            patch = status_patch(gw, self.desired()) if gw is not None else None
            if gw is None or patch is None:
                continue
            try:
                written = await self.client.patch(Gateway, self.name, patch, self.namespace,
                                                  status=True)
            except KubeApiError as exc:
                if exc.code in (404, 409):
                    # Gone, or our copy was stale: the watch brings what happened.
                    self._log.debug("gateway_status_not_written", code=exc.code)
                    continue
                retry_in = backoff.next_delay()
                self._log.warning(
                    "gateway_status_write_failed", code=exc.code, error=str(exc),
                    retry_in=round(retry_in, 2),
                    hint=("grant get and patch on gateways/status for this Gateway "
                          "(ambientctl waypoint|gateway apply does on Kubernetes; see "
                          "deploy/k8s/waypoint-rbac-template.yaml)") if exc.code == 403
                    else "check that the API server is reachable")
                continue
            backoff.reset()
            self.writes += 1
            if self._gateway is gw:  # no newer copy arrived while we wrote
                self._gateway = written
            programmed: Mapping[str, Any] = next(
                (c for c in written.status.get("conditions") or []
                 if c.get("type") == "Programmed"), {})
            self._log.info("gateway_status_written",
                           generation=written.metadata.generation,
                           programmed=programmed.get("status"),
                           reason=programmed.get("reason"))


class _Proxy(Protocol):
    """What :func:`keep_status` reads of a waypoint or ingress process."""

    @property
    def ready(self) -> bool: ...

    @property
    def options(self) -> Any: ...


async def keep_status(client: KubeClient, proxy: _Proxy, holder: SnapshotHolder, *,
                      certificates: Callable[[], Collection[str]] | None = None) -> None:
    """Run a :class:`GatewayStatusWriter` for ``proxy``'s own Gateway (its ``options``
    name and namespace) until cancelled: the one line ``run_mesh`` needs."""
    o = proxy.options
    await GatewayStatusWriter(client, o.namespace, o.name, ready=lambda: proxy.ready,
                              holder=holder, certificates=certificates).run()
