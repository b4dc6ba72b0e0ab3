"""``ambientctl waypoint apply|delete|list|status``: a namespace's waypoint, as istioctl does it.

``apply`` writes the four objects of :mod:`deploy.waypoint_objects` (Gateway first, then
its ServiceAccount, Deployment and Service with owner references to it), each merged
into what is stored the way ``ambientctl apply`` merges (so a Service's cluster IP and a
Gateway's status survive, and a second apply changes nothing).  ``--enroll-namespace``
then labels the namespace ``istio.io/use-waypoint=NAME``; ``--dry-run`` prints the objects
as YAML and talks to no server.  The flags and the lines printed follow ``istioctl
waypoint`` (``--for``, ``--enroll-namespace``, ``--overwrite``, ``--revision``, ``--wait``,
``waypoint NS/NAME applied``); unlike istioctl, a namespace already enrolled with another
waypoint is an error (exit 1) rather than a warning after which nothing happens.

``delete`` removes the Gateway and, explicitly, what it owns (so that nothing depends on
a garbage collector running; on Kubernetes the collector may have been first), and the
namespace's ``istio.io/use-waypoint`` label when it named this waypoint.  ``status`` waits
up to ``--wait-timeout`` for the Gateway's ``Programmed`` condition and a Ready pod.

The server is ``--kubeconfig``/``--context`` when given (a real cluster), else as for
``ambientctl get``: ``--server``, ``$AMBIENT_SERVER``, the local cluster.  A server that
serves RBAC is a Kubernetes: there ``apply`` also binds the waypoint's ServiceAccount to
the ``pyambient-waypoint`` ClusterRole that ``ambientctl install`` created (see
:func:`deploy.install.waypoint_rbac`; ``delete`` removes the binding), and the default
image is the one the install deploys rather than the local cluster's ``ambient/waypoint``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import yaml

from common.errors import ConfigError, KubeApiError
from common.kube import Gateway, KubeClient, KubeConfig, Namespace, Pod, load_config
from common.kube.resources import ResourceType, by_kind
from deploy import install
from deploy.ambientctl.objects import _apply_one, format_table, resolve_server
from deploy.waypoint_objects import (
    DATAPLANE_MODE_LABEL,
    DEFAULT_IMAGE,
    DEFAULT_NAME,
    DEFAULT_TRAFFIC_TYPE,
    GATEWAY_CLASS,
    GATEWAY_NAME_LABEL,
    REVISION_LABEL,
    TRAFFIC_TYPES,
    USE_WAYPOINT_LABEL,
    WAYPOINT_FOR_LABEL,
    Owner,
    WaypointSpec,
    condition_of,
    dependants,
    gateway,
    owned_by_waypoint,
    pod_ready,
    waypoint_objects,
)

T = TypeVar("T")
# istioctl's --waypoint-timeout default.
DEFAULT_WAIT = 90.0
# How often a wait looks again; the Gateway's status changes within a reconcile of the
# cluster's controllers, so a quarter second keeps the wait short and the load small.
POLL_INTERVAL = 0.25
_GATEWAY_CRDS = ("https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.2.1/"
                 "standard-install.yaml")
# A create that lost a race is retried as an update this many times.
_CREATE_RACES = 2
_RBAC_API = "/apis/rbac.authorization.k8s.io/v1"
_BINDING = ResourceType(kind="ClusterRoleBinding", group="rbac.authorization.k8s.io",
                        version="v1", plural="clusterrolebindings", namespaced=False)
_ROLE = ResourceType(kind="Role", group="rbac.authorization.k8s.io", version="v1",
                     plural="roles", namespaced=True)
_ROLE_BINDING = ResourceType(kind="RoleBinding", group="rbac.authorization.k8s.io",
                             version="v1", plural="rolebindings", namespaced=True)
#: REST coordinates of the RBAC kinds ``apply`` writes on Kubernetes.
RBAC_TYPES = {rt.kind: rt for rt in (_BINDING, _ROLE, _ROLE_BINDING)}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``1.5m``, ``500ms`` (istioctl takes Go durations)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 2m, 500ms)")
    return float(match.group(1)) * _UNIT[match.group(2) or "s"]


# -- server -----------------------------------------------------------------------------------


def client_config(args: argparse.Namespace) -> KubeConfig:
    """Where to talk to (see the module docstring), in the namespace of ``-n``."""
    if args.kubeconfig or args.context:
        config = load_config(kubeconfig=args.kubeconfig, context=args.context)
        return dataclasses.replace(config, namespace=args.namespace or config.namespace)
    return KubeConfig.for_server(resolve_server(args), namespace=args.namespace or "default")


def _run(args: argparse.Namespace, work: Callable[[KubeClient], Awaitable[T]]) -> T:
    config = client_config(args)
    args.namespace = config.namespace

    async def main() -> T:
        async with KubeClient(config, timeout=10.0) as client:
            return await work(client)

    return trio.run(main)


async def _namespace(client: KubeClient, name: str) -> Namespace:
    try:
        return await client.get(Namespace, name)
    except KubeApiError as exc:
        if exc.code == 404:
            raise ConfigError(f"namespace {name!r} not found: create it first "
                              f"(e.g. `ambientctl apply -f` a Namespace document)") from exc
        raise


async def _set_namespace_label(client: KubeClient, ns: Namespace, value: str | None) -> None:
    await client.patch(Namespace, ns.metadata.name, {"metadata": {
        "labels": {USE_WAYPOINT_LABEL: value},
        "resourceVersion": ns.metadata.resource_version}})


# -- apply ------------------------------------------------------------------------------------


def spec_from(args: argparse.Namespace, namespace: str, *, kubernetes: bool) -> WaypointSpec:
    """The waypoint asked for; without ``--image`` the image is the local cluster's, or on
    Kubernetes the one ``ambientctl install`` deploys."""
    image = args.image or (install.DEFAULT_IMAGE if kubernetes else DEFAULT_IMAGE)
    spec = WaypointSpec(namespace=namespace, name=args.name, traffic_type=args.traffic_type,
                        revision=args.revision, image=image)
    spec.check()
    return spec


def dry_run_yaml(spec: WaypointSpec, *, kubernetes: bool) -> str:
    """The objects as multi-document YAML (no owner references: no uid exists yet); on
    Kubernetes also the RBAC objects (:func:`deploy.install.proxy_rbac`)."""
    objects = waypoint_objects(spec)
    if kubernetes:
        objects += install.proxy_rbac(spec.namespace, spec.name)
    return yaml.safe_dump_all(objects, sort_keys=False)


async def serves_rbac(client: KubeClient) -> bool:
    """Whether the server is a Kubernetes with RBAC (the local API server has none)."""
    try:
        await client.request("GET", _RBAC_API)
    except KubeApiError as exc:
        if exc.code == 404:
            return False
        raise
    return True


async def apply_object(client: KubeClient, body: dict[str, Any],
                       rt: ResourceType | None = None) -> str:
    """``ambientctl apply`` of one object: created, configured or unchanged."""
    rt = rt or by_kind(body["kind"])
    for _ in range(_CREATE_RACES):
        try:
            return await _apply_one(client, rt, body)
        except KubeApiError as exc:
            # Created by someone else between our read and our create (the local cluster's
            # controller creates a new waypoint Gateway's objects too): merge into theirs.
            if exc.code != 409:
                raise
    return await _apply_one(client, rt, body)


async def apply_waypoint(client: KubeClient, spec: WaypointSpec, *, kubernetes: bool) -> bool:
    """Write the four objects (on Kubernetes also the RBAC that lets the waypoint read the
    mesh's objects and write its Gateway's status); True when any was created or changed."""
    changed = False
    try:
        outcome = await apply_object(client, gateway(spec))
    except KubeApiError as exc:
        if exc.code == 404:
            raise ConfigError(f"the server has no Gateway API (gateway.networking.k8s.io/v1): "
                              f"install its CRDs first (kubectl apply -f {_GATEWAY_CRDS})"
                              ) from exc
        raise
    changed |= outcome != "unchanged"
    stored = await client.get(Gateway, spec.name, spec.namespace)
    owner = Owner(spec.name, stored.metadata.uid or "")
    for body in dependants(spec, owner):
        changed |= await apply_object(client, body) != "unchanged"
    if kubernetes:
        changed |= await apply_rbac(client, install.proxy_rbac(
            spec.namespace, spec.name, owner=owner.reference()))
    return changed


async def apply_rbac(client: KubeClient, objects: list[dict[str, Any]]) -> bool:
    """Apply a proxy's RBAC objects (the ClusterRoleBinding is cluster-scoped, so it cannot
    be owned by the Gateway: delete removes it by name); True when any changed."""
    changed = False
    for body in objects:
        changed |= await apply_object(client, body, RBAC_TYPES[body["kind"]]) != "unchanged"
    return changed


def cmd_apply(args: argparse.Namespace) -> int:
    if args.dry_run:
        # No server is asked: a kubeconfig says the target is Kubernetes.
        kubernetes = bool(args.kubeconfig or args.context)
        namespace = client_config(args).namespace if kubernetes else \
            args.namespace or "default"
        spec = spec_from(args, namespace, kubernetes=kubernetes)
        sys.stdout.write(dry_run_yaml(spec, kubernetes=kubernetes))
        return 0

    async def work(client: KubeClient) -> int:
        kubernetes = await serves_rbac(client)
        spec = spec_from(args, args.namespace, kubernetes=kubernetes)
        where = f"{spec.namespace}/{spec.name}"
        ns = await _namespace(client, spec.namespace)
        if args.enroll_namespace:
            current = ns.metadata.labels.get(USE_WAYPOINT_LABEL)
            if current and current != spec.name and not args.overwrite:
                raise ConfigError(
                    f"namespace {spec.namespace} already uses waypoint {current!r} "
                    f"({USE_WAYPOINT_LABEL}={current}): pass --overwrite to switch it to "
                    f"{spec.name!r}")
            if ns.metadata.labels.get(DATAPLANE_MODE_LABEL) != "ambient":
                print(f"warning: namespace {spec.namespace} is not enrolled in ambient; "
                      f"consider `ambientctl label namespace {spec.namespace} "
                      f"{DATAPLANE_MODE_LABEL}=ambient`", file=sys.stderr)
        changed = await apply_waypoint(client, spec, kubernetes=kubernetes)
        print(f"waypoint {where} applied{'' if changed else ' (unchanged)'}", flush=True)
        if args.wait:
            _, ready, detail = await wait_ready(client, spec.namespace, spec.name,
                                                args.wait_timeout)
            if not ready:
                print(f"error: timed out after {args.wait_timeout:g}s waiting for waypoint "
                      f"{where}: {detail}", file=sys.stderr)
                return 1
            print(f"waypoint {where} is ready!")
        if args.enroll_namespace:
            ns = await _namespace(client, spec.namespace)  # it may have changed meanwhile
            if ns.metadata.labels.get(USE_WAYPOINT_LABEL) != spec.name:
                await _set_namespace_label(client, ns, spec.name)
            print(f'namespace {spec.namespace} labeled with "{USE_WAYPOINT_LABEL}: '
                  f'{spec.name}"')
        return 0

    return _run(args, work)


# -- readiness -------------------------------------------------------------------------------


async def readiness(client: KubeClient, namespace: str, name: str
                    ) -> tuple[Gateway | None, bool, str]:
    """The Gateway (None when missing), whether it is ready, and what it waits for."""
    try:
        gw = await client.get(Gateway, name, namespace)
    except KubeApiError as exc:
        if exc.code == 404:
            return None, False, f"no Gateway {namespace}/{name}"
        raise
    pods = (await client.list(Pod, namespace,
                              label_selector=f"{GATEWAY_NAME_LABEL}={name}")).items
    ready = sum(1 for p in pods if pod_ready(p))
    programmed = condition_of(gw, "Programmed")
    if programmed is None:
        return gw, False, (f"no Programmed condition yet (the waypoint writes it once it is "
                           f"ready); pods ready {ready}/{len(pods)}: "
                           f"{_unwritten_hint(namespace, name)}")
    if programmed.get("status") != "True":
        return gw, False, (f"Programmed={programmed.get('status')} "
                           f"({programmed.get('reason')}: {programmed.get('message')})")
    observed = programmed.get("observedGeneration")
    if isinstance(observed, int) and observed < (gw.metadata.generation or 1):
        return gw, False, (f"the status is for generation {observed}, the Gateway is at "
                           f"{gw.metadata.generation}: waiting for a ready waypoint to "
                           f"observe it; {_unwritten_hint(namespace, name)}")
    if ready == 0:
        return gw, False, f"no waypoint pod is Ready ({ready}/{len(pods)})"
    return gw, True, f"pods ready {ready}/{len(pods)}"


def _unwritten_hint(namespace: str, name: str) -> str:
    return (f"check `ambientctl logs -n {namespace} deploy/{name}` (kubectl logs on "
            f"Kubernetes, where it needs get and patch on gateways/status: "
            f"Role {install.gateway_status_role_name(name)})")


async def wait_ready(client: KubeClient, namespace: str, name: str,
                     within: float) -> tuple[Gateway | None, bool, str]:
    """Poll :func:`readiness` until ready or ``within`` seconds passed (looked at least
    once); the last answer."""
    last = await readiness(client, namespace, name)
    with trio.move_on_after(within):
        while not last[1]:
            await trio.sleep(POLL_INTERVAL)
            last = await readiness(client, namespace, name)
    return last


# -- delete -----------------------------------------------------------------------------------


async def _waypoint_gateways(client: KubeClient, namespace: str | None) -> list[Gateway]:
    gateways = (await client.list(Gateway, namespace)).items
    mine = [g for g in gateways if g.spec.get("gatewayClassName") == GATEWAY_CLASS]
    return sorted(mine, key=lambda g: (g.metadata.namespace or "", g.metadata.name))


async def delete_waypoint(client: KubeClient, namespace: str, name: str) -> None:
    """Delete the Gateway, then what it owns (first the Gateway: a controller that creates
    a waypoint's missing objects must not see it without them)."""
    try:
        await client.delete(Gateway, name, namespace)
    except KubeApiError as exc:
        if exc.code != 404:
            raise
    paths = [by_kind(kind).object_path(name, namespace)
             for kind in ("Deployment", "Service", "ServiceAccount")]
    if await serves_rbac(client):
        paths += rbac_paths(namespace, name)
    for path in paths:
        try:
            stored = await client.request("GET", path)
            if owned_by_waypoint(stored.get("metadata") or {}, name):
                await client.request("DELETE", path)
        except KubeApiError as exc:
            if exc.code != 404:  # already collected by the owner's garbage collector
                raise


def rbac_paths(namespace: str, name: str) -> list[str]:
    """Where a proxy's RBAC objects live (what delete removes when no collector did)."""
    return [RBAC_TYPES[o["kind"]].object_path(o["metadata"]["name"],
                                              o["metadata"].get("namespace"))
            for o in install.proxy_rbac(namespace, name)]


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all and args.names:
        raise ConfigError("give waypoint names or --all, not both")
    if not args.all and not args.names:
        raise ConfigError("give the waypoint names to delete (see `ambientctl waypoint "
                          "list`), or --all")

    async def work(client: KubeClient) -> int:
        namespace = args.namespace
        known = {g.metadata.name for g in await _waypoint_gateways(client, namespace)}
        names = sorted(known) if args.all else list(dict.fromkeys(args.names))
        if args.all and not names:
            print(f"No waypoints found in {namespace}.", file=sys.stderr)
        failed = False
        ns = await _namespace(client, namespace)
        for name in names:
            if name not in known:
                print(f"error: waypoint {namespace}/{name} not found", file=sys.stderr)
                failed = True
                continue
            await delete_waypoint(client, namespace, name)
            print(f"waypoint {namespace}/{name} deleted", flush=True)
            if ns.metadata.labels.get(USE_WAYPOINT_LABEL) == name:
                await _set_namespace_label(client, ns, None)
                ns = await _namespace(client, namespace)
                print(f'namespace {namespace} unlabeled ("{USE_WAYPOINT_LABEL}: {name}" '
                      "removed)")
        return 1 if failed else 0

    return _run(args, work)


# -- list and status -----------------------------------------------------------------------------


def _table(headers: list[str], rows: list[tuple[str, list[str]]], all_namespaces: bool) -> str:
    """Rows of (namespace, cells) in ambientctl get's layout."""
    return format_table({
        "columnDefinitions": [{"name": h} for h in headers],
        "rows": [{"cells": cells, "object": {"metadata": {"namespace": ns}}}
                 for ns, cells in rows]}, all_namespaces=all_namespaces, wide=False)


def list_rows(gateways: list[Gateway]) -> list[tuple[str, list[str]]]:
    """istioctl's columns; TRAFFIC TYPE is the one in effect (unlabelled means service)."""
    rows = []
    for gw in gateways:
        labels = gw.metadata.labels
        programmed = condition_of(gw, "Programmed")
        rows.append((gw.metadata.namespace or "", [
            gw.metadata.name, labels.get(REVISION_LABEL) or "default",
            labels.get(WAYPOINT_FOR_LABEL) or DEFAULT_TRAFFIC_TYPE,
            str(programmed.get("status")) if programmed else "Unknown"]))
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    async def work(client: KubeClient) -> str:
        gateways = await _waypoint_gateways(client, None if args.all_namespaces
                                            else args.namespace)
        if not gateways:
            return ""
        return _table(["NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED"], list_rows(gateways),
                      args.all_namespaces)

    text = _run(args, work)
    print(text if text else "No waypoints found.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    async def work(client: KubeClient) -> int:
        namespace = args.namespace
        names = [args.name] if args.name else \
            [g.metadata.name for g in await _waypoint_gateways(client, namespace)]
        if not names:
            print("No waypoints found.")
            return 0
        rows: list[tuple[str, list[str]]] = []
        failures: list[str] = []
        for name in names:
            gw, ready, detail = await wait_ready(client, namespace, name, args.wait_timeout)
            cond = condition_of(gw, "Programmed") if gw is not None else None
            if gw is None:
                failures.append(f"waypoint {namespace}/{name} not found")
                continue
            rows.append((namespace, [name, str(cond.get("status")) if cond else "Unknown",
                                     "Programmed", str(cond.get("reason")) if cond else "",
                                     str(cond.get("message")) if cond else detail]))
            if not ready:
                failures.append(f"waypoint {namespace}/{name} is not ready after "
                                f"{args.wait_timeout:g}s: {detail}")
        if rows:
            print(_table(["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"], rows, False))
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        return 1 if failures else 0

    return _run(args, work)


# -- argument parsing ---------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-n", "--namespace", help="namespace (default: default, or the "
                                                  "kubeconfig context's)")
    parent.add_argument("--server", help="API server URL (default: $AMBIENT_SERVER, else the "
                                         "local cluster's)")
    parent.add_argument("--cluster", help="local cluster name, when several are up")
    parent.add_argument("--kubeconfig", help="kubeconfig file of a Kubernetes cluster")
    parent.add_argument("--context", help="kubeconfig context to use")
    return parent


def _wait_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-timeout", "--waypoint-timeout", dest="wait_timeout",
                        type=parse_duration, default=DEFAULT_WAIT,
                        help=f"how long to wait for readiness (default {DEFAULT_WAIT:g}s)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("waypoint", help="deploy, list and check waypoints",
                           description="A namespace's waypoint (the L7 proxy): a Gateway of "
                           f"class {GATEWAY_CLASS} with its ServiceAccount, Deployment and "
                           "Service.")
    wsub = group.add_subparsers(dest="waypoint_command", metavar="ACTION", required=True)
    common = [_common()]

    apply = wsub.add_parser("apply", parents=common, help="create or update a waypoint",
                            description="Create or update a waypoint (idempotent).")
    apply.add_argument("--name", default=DEFAULT_NAME,
                       help=f"waypoint name (default {DEFAULT_NAME})")
    apply.add_argument("--for", dest="traffic_type", choices=TRAFFIC_TYPES,
                       help="traffic the waypoint handles (istio.io/waypoint-for; "
                            f"default {DEFAULT_TRAFFIC_TYPE})")
    apply.add_argument("--enroll-namespace", action="store_true",
                       help=f"label the namespace {USE_WAYPOINT_LABEL}=NAME")
    apply.add_argument("--overwrite", action="store_true",
                       help="with --enroll-namespace: replace another waypoint's label")
    apply.add_argument("-r", "--revision", help="label the waypoint with istio.io/rev")
    apply.add_argument("--image", help=f"container image (default {DEFAULT_IMAGE} on the "
                       f"local cluster, {install.DEFAULT_IMAGE} on Kubernetes)")
    apply.add_argument("--dry-run", action="store_true",
                       help="print the objects as YAML and change nothing")
    apply.add_argument("-w", "--wait", action="store_true",
                       help="wait until the waypoint is ready")
    _wait_timeout(apply)
    apply.set_defaults(func=cmd_apply)

    delete = wsub.add_parser("delete", parents=common, help="delete waypoints",
                             description="Delete waypoints by name, or --all in the namespace.")
    delete.add_argument("names", nargs="*", metavar="NAME", help="waypoint names")
    delete.add_argument("--all", action="store_true", help="every waypoint in the namespace")
    delete.set_defaults(func=cmd_delete)

    listing = wsub.add_parser("list", parents=common, help="list waypoints",
                              description="List the waypoints of a namespace, or -A.")
    listing.add_argument("-A", "--all-namespaces", action="store_true",
                         help="across namespaces")
    listing.set_defaults(func=cmd_list)

    status = wsub.add_parser("status", parents=common, help="wait for and show readiness",
                             description="Wait until each waypoint (or --name) is Programmed "
                             "with a Ready pod, then print its status.")
    status.add_argument("--name", help="one waypoint (default: all in the namespace)")
    _wait_timeout(status)
    status.set_defaults(func=cmd_status)
