"""``ambientctl gateway apply|status|delete``: an ingress gateway (the edge of the mesh).

``apply`` writes the Gateway (class ``pyambient``: an HTTP listener, and an HTTPS one
per ``--tls-secret``), then its ServiceAccount, Deployment (``waypoint --mode ingress``)
and Service with owner references; ``--dry-run`` prints them as YAML and talks to no
server.  On Kubernetes (a server that serves RBAC) it also applies the gateway's RBAC
(:func:`deploy.install.proxy_rbac`: read the mesh, write its own Gateway's status, read
its TLS Secrets).  On the local cluster it also starts the host-port forwarder
(:mod:`deploy.local.hostports`) so the listeners are reachable from the host at
``127.0.0.1``.  ``status`` waits until the gateway has written ``Programmed=True`` on its
Gateway (:mod:`waypoint.gateway_status`) and a pod is Ready, then prints those addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import yaml

from common.errors import ConfigError, KubeApiError
from common.kube import Gateway, KubeClient, Pod
from deploy import install
from deploy.ambientctl.waypoint import (
    DEFAULT_WAIT,
    POLL_INTERVAL,
    _common,
    _run,
    _wait_timeout,
    apply_object,
    apply_rbac,
    client_config,
    rbac_paths,
    serves_rbac,
)
from deploy.gateway_objects import (
    DEFAULT_HTTP_PORT,
    DEFAULT_HTTPS_PORT,
    DEFAULT_NAME,
    INGRESS_CLASS,
    GatewaySpec,
    dependants,
    gateway,
    gateway_objects,
    listener_ports,
)
from deploy.local import cluster
from deploy.waypoint_objects import (
    DEFAULT_IMAGE,
    GATEWAY_NAME_LABEL,
    Owner,
    condition_of,
    pod_ready,
)

#: How long ``apply`` waits for the forwarder to write its addresses.
FORWARDER_START = 15.0


def spec_from(args: argparse.Namespace, namespace: str, *,
              kubernetes: bool = False) -> GatewaySpec:
    """The gateway asked for; without ``--image`` the local cluster's image, or on
    Kubernetes the one ``ambientctl install`` deploys."""
    image = args.image or (install.DEFAULT_IMAGE if kubernetes else DEFAULT_IMAGE)
    spec = GatewaySpec(namespace=namespace, name=args.name,
                       http_port=None if args.no_http else args.http_port,
                       https_port=args.https_port, tls_secrets=tuple(args.tls_secret),
                       hostname=args.hostname, image=image)
    spec.check()
    return spec


def rbac_objects(spec: GatewaySpec, owner: Owner | None = None) -> list[dict[str, Any]]:
    """On Kubernetes: read the mesh, write the Gateway's status, read its TLS Secrets."""
    return install.proxy_rbac(spec.namespace, spec.name, secrets=spec.tls_secrets,
                              owner=owner.reference() if owner is not None else None)


def local_cluster_name(args: argparse.Namespace) -> str | None:
    """The local cluster this invocation talks to, or None (a server or kubeconfig given)."""
    if args.server or os.environ.get("AMBIENT_SERVER") or args.kubeconfig or args.context:
        return None
    name = args.cluster or cluster.default_name()
    return name if (cluster.state_dir(name) / "state.json").exists() else None


def forward_state(cluster_name: str, namespace: str, name: str) -> Path:
    return cluster.state_dir(cluster_name) / "gateways" / f"{namespace}.{name}.json"


def read_forwards(path: Path) -> dict[str, str] | None:
    """The forwarder's listener -> host address map, if it runs."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return {str(k): str(v) for k, v in data.get("forwards", {}).items()}


def start_forwarder(cluster_name: str, namespace: str, name: str) -> dict[str, str]:
    """(Re)start the host-port forwarder and wait (bounded) for its addresses."""
    path = forward_state(cluster_name, namespace, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fixed: list[str] = []
    old = read_forwards(path)
    if old is not None:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 15)
        # Keep the host ports a person may have open in a browser.
        for listener, address in old.items():
            fixed += ["--port", f"{listener}:{address.rsplit(':', 1)[1]}"]
    path.unlink(missing_ok=True)
    log = path.with_suffix(".log")
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "deploy.local.hostports", "--cluster", cluster_name,
             "--namespace", namespace, "--name", name, "--state", str(path), *fixed],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)

    async def wait() -> dict[str, str]:
        with trio.move_on_after(FORWARDER_START):
            # The forwarder is another process writing a file: nothing to wait on but time.
            while (forwards := read_forwards(path)) is None:  # noqa: ASYNC110
                await trio.sleep(POLL_INTERVAL)
            return forwards
        raise ConfigError(f"the host-port forwarder did not start: see {log}")

    return trio.run(wait)


async def apply_gateway(client: KubeClient, spec: GatewaySpec, *,
                        kubernetes: bool = False) -> bool:
    changed = await apply_object(client, gateway(spec)) != "unchanged"
    stored = await client.get(Gateway, spec.name, spec.namespace)
    owner = Owner(spec.name, stored.metadata.uid or "")
    for body in dependants(spec, listener_ports(stored.spec), owner):
        changed |= await apply_object(client, body) != "unchanged"
    if kubernetes:
        changed |= await apply_rbac(client, rbac_objects(spec, owner))
    return changed


def cmd_apply(args: argparse.Namespace) -> int:
    if args.dry_run:
        # No server is asked: a kubeconfig says the target is Kubernetes.
        kubernetes = bool(args.kubeconfig or args.context)
        namespace = client_config(args).namespace if kubernetes else \
            args.namespace or "default"
        spec = spec_from(args, namespace, kubernetes=kubernetes)
        objects = gateway_objects(spec) + (rbac_objects(spec) if kubernetes else [])
        print(yaml.safe_dump_all(objects, sort_keys=False), end="")
        return 0

    async def work(client: KubeClient) -> tuple[GatewaySpec, bool]:
        kubernetes = await serves_rbac(client)
        spec = spec_from(args, args.namespace, kubernetes=kubernetes)
        return spec, await apply_gateway(client, spec, kubernetes=kubernetes)

    spec, changed = _run(args, work)
    where = f"{spec.namespace}/{spec.name}"
    print(f"gateway {where} applied{'' if changed else ' (unchanged)'}", flush=True)
    if args.wait:
        ok, why = _run(args, lambda client: wait_gateway(client, spec.namespace, spec.name,
                                                          args.wait_timeout))
        if not ok:
            print(f"error: timed out after {args.wait_timeout:g}s waiting for gateway "
                  f"{where}: {why}", file=sys.stderr)
            return 1
        print(f"gateway {where} is ready ({why})", flush=True)
    local = local_cluster_name(args)
    if local is not None:
        forwards = start_forwarder(local, spec.namespace, spec.name)
        for listener, address in sorted(forwards.items()):
            print(f"listener port {listener} reachable from this host at {address}")
    return 0


async def gateway_readiness(client: KubeClient, namespace: str, name: str
                            ) -> tuple[bool, str]:
    try:
        gw = await client.get(Gateway, name, namespace)
    except KubeApiError as exc:
        if exc.code == 404:
            return False, f"no Gateway {namespace}/{name}"
        raise
    if gw.spec.get("gatewayClassName") not in ("pyambient", "istio"):
        return False, f"Gateway {namespace}/{name} is not an ingress gateway"
    pods = (await client.list(Pod, namespace,
                              label_selector=f"{GATEWAY_NAME_LABEL}={name}")).items
    ready = sum(1 for p in pods if pod_ready(p))
    counted = f"pods ready {ready}/{len(pods)}"
    programmed = condition_of(gw, "Programmed")
    if programmed is None:
        return False, (f"no Programmed condition yet (the gateway writes it once it is "
                       f"ready); {counted}")
    if programmed.get("status") != "True":
        return False, (f"Programmed={programmed.get('status')} ({programmed.get('reason')}: "
                       f"{programmed.get('message')}); {counted}")
    observed = programmed.get("observedGeneration")
    if isinstance(observed, int) and observed < (gw.metadata.generation or 1):
        return False, (f"the status is for generation {observed}, the Gateway is at "
                       f"{gw.metadata.generation}; {counted}")
    addresses = ",".join(str(a.get("value")) for a in gw.status.get("addresses") or [])
    return ready > 0, f"{counted}, address {addresses or 'none'}"


async def wait_gateway(client: KubeClient, namespace: str, name: str,
                       within: float) -> tuple[bool, str]:
    """Poll :func:`gateway_readiness` until ready or ``within`` seconds passed (looked at
    least once); the last answer."""
    with trio.move_on_after(within):
        while True:
            ok, why = await gateway_readiness(client, namespace, name)
            if ok:
                return ok, why
            await trio.sleep(POLL_INTERVAL)
    return await gateway_readiness(client, namespace, name)


def cmd_status(args: argparse.Namespace) -> int:
    ok, why = _run(args, lambda client: wait_gateway(client, args.namespace, args.name,
                                                      args.wait_timeout))
    where = f"{args.namespace}/{args.name}"
    if not ok:
        print(f"gateway {where} not ready: {why}", file=sys.stderr)
        return 1
    print(f"gateway {where} is ready ({why})")
    local = local_cluster_name(args)
    if local is not None:
        forwards = read_forwards(forward_state(local, args.namespace, args.name))
        if forwards is None:
            print("no host forwarder runs: `ambientctl gateway apply` starts it",
                  file=sys.stderr)
            return 1
        for listener, address in sorted(forwards.items()):
            print(f"listener port {listener} reachable from this host at {address}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    async def work(client: KubeClient) -> bool:
        try:
            await client.delete(Gateway, args.name, args.namespace)
        except KubeApiError as exc:
            if exc.code == 404:
                return False
            raise
        if await serves_rbac(client):
            # Cluster-scoped, so not collected with the Gateway as the rest is.
            for path in rbac_paths(args.namespace, args.name):
                try:
                    await client.request("DELETE", path)
                except KubeApiError as exc:
                    if exc.code != 404:
                        raise
        return True

    found = _run(args, work)
    local = local_cluster_name(args)
    if local is not None:
        path = forward_state(local, args.namespace, args.name)
        if read_forwards(path) is not None:
            os.kill(int(json.loads(path.read_text())["pid"]), 15)
        path.unlink(missing_ok=True)
    if not found:
        print(f"error: gateway {args.namespace}/{args.name} not found", file=sys.stderr)
        return 1
    print(f"gateway {args.namespace}/{args.name} deleted")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("gateway", help="deploy and check ingress gateways",
                           description=f"An ingress gateway: a Gateway of class "
                           f"{INGRESS_CLASS} served by `waypoint --mode ingress`.")
    gsub = group.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    common = [_common()]
    apply = gsub.add_parser("apply", parents=common, help="create or update a gateway")
    apply.add_argument("--name", default=DEFAULT_NAME, help=f"default {DEFAULT_NAME}")
    apply.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    apply.add_argument("--no-http", action="store_true", help="no HTTP listener")
    apply.add_argument("--https-port", type=int, default=DEFAULT_HTTPS_PORT)
    apply.add_argument("--tls-secret", action="append", default=[],
                       help="kubernetes.io/tls Secret for the HTTPS listener (repeatable: "
                       "SNI picks among them)")
    apply.add_argument("--hostname", help="listener hostname (default: any)")
    apply.add_argument("--image", help=f"container image (default {DEFAULT_IMAGE} on the "
                       f"local cluster, {install.DEFAULT_IMAGE} on Kubernetes)")
    apply.add_argument("--dry-run", action="store_true",
                       help="print the objects as YAML and change nothing")
    apply.add_argument("-w", "--wait", action="store_true",
                       help="wait until the gateway has written Programmed=True and a pod "
                            "is Ready")
    _wait_timeout(apply)
    apply.set_defaults(func=cmd_apply)
    status = gsub.add_parser("status", parents=common,
                             help="wait for Programmed and a Ready pod; print the host "
                                  "addresses")
    status.add_argument("--name", default=DEFAULT_NAME)
    _wait_timeout(status)
    status.set_defaults(func=cmd_status, wait_timeout=DEFAULT_WAIT)
    delete = gsub.add_parser("delete", parents=common, help="delete a gateway")
    delete.add_argument("--name", default=DEFAULT_NAME)
    delete.set_defaults(func=cmd_delete)
