"""``ambientctl install|uninstall``: the mesh on the cluster of the current kube context.

``install`` applies the objects :func:`deploy.install.install_objects` renders (the same
as ``kubectl apply -k deploy/k8s``), each by server-side apply with field manager
``ambientctl``, so a second install changes nothing and an upgrade (``--image``) updates
in place.  It first checks that the API groups of the CRDs the mesh reads are served
(``--crds`` downloads them from their pinned releases and applies them first), and then
waits (``--wait-timeout``) until the ztunnel DaemonSet is ready on every node.
``--dry-run`` prints the objects as YAML and talks to no server.

``uninstall`` deletes them again (the DaemonSet first, so ztunnels drain; the namespace
last, which takes the CA Secret with it) and the waypoints' ClusterRoleBindings, and
leaves the CRDs, as ``istioctl uninstall`` does without ``--purge``.  It refuses while a
namespace is still enrolled (``istio.io/dataplane-mode=ambient``): the capture rules in
its pods would then send their traffic to a ztunnel that is gone.  ``--force`` goes on.

The cluster is ``--kubeconfig``/``--context``, else ``$KUBECONFIG`` or ``~/.kube/config``
(in a pod: its service account).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio
import yaml

from common.errors import ApiServerUnreachableError, ConfigError, KubeApiError
from common.kube import KubeClient, Namespace, load_config
from deploy.install import (
    CRD_GROUPS,
    CRD_SOURCES,
    NAMESPACE,
    PART_OF,
    ZTUNNEL,
    InstallOptions,
    collection_path,
    display,
    install_objects,
    object_path,
)

FIELD_MANAGER = "ambientctl"
APPLY_MEDIA_TYPE = "application/apply-patch+yaml"
DEFAULT_WAIT = 180.0
# How often a wait looks again: a DaemonSet's status changes as each node's pod starts.
POLL_INTERVAL = 1.0
ENROLLED_SELECTOR = "istio.io/dataplane-mode=ambient"
_PART_OF_SELECTOR = ",".join(f"{k}={v}" for k, v in PART_OF.items())
_CRD_DOWNLOAD_TIMEOUT = 60.0
CRD_ESTABLISH_TIMEOUT = 60.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_install = sub.add_parser(
        "install", help="install the mesh on the cluster of the current kube context",
        description="Apply the mesh (namespace ambient-system, ztunnel DaemonSet, RBAC) to "
                    "a Kubernetes cluster by server-side apply.")
    _cluster_args(p_install)
    p_install.add_argument("--image", default=InstallOptions().image,
                           help="the pyambient image (default: %(default)s)")
    p_install.add_argument("--log-level", default="info", help="ztunnel's log level")
    p_install.add_argument("--crds", action="store_true",
                           help="download and apply the Gateway API and Istio CRDs first "
                                "(pinned releases)")
    p_install.add_argument("--dry-run", action="store_true",
                           help="print the objects as YAML; change nothing")
    p_install.add_argument("--wait-timeout", type=float, default=DEFAULT_WAIT,
                           help="seconds to wait for ztunnel on every node (0: do not wait)")
    p_install.set_defaults(func=cmd_install)

    p_uninstall = sub.add_parser("uninstall", help="remove the mesh from the cluster",
                                 description="Delete what `ambientctl install` applied "
                                             "(the CRDs stay).")
    _cluster_args(p_uninstall)
    p_uninstall.add_argument("--force", action="store_true",
                             help="uninstall even while namespaces are enrolled")
    p_uninstall.add_argument("--dry-run", action="store_true",
                             help="print what would be deleted; change nothing")
    p_uninstall.set_defaults(func=cmd_uninstall)


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file")
    parser.add_argument("--context", default=None, help="kubeconfig context")


def _run(args: argparse.Namespace, work: Callable[[KubeClient], Awaitable[int]]) -> int:
    config = load_config(kubeconfig=args.kubeconfig, context=args.context)

    async def main() -> int:
        async with KubeClient(config, timeout=30.0) as client:
            return await work(client)

    return trio.run(main)


# -- install ----------------------------------------------------------------------------------


async def server_side_apply(client: KubeClient, obj: dict[str, Any]) -> None:
    """Create or update ``obj`` as field manager ``ambientctl`` (conflicts taken over)."""
    await client.request("PATCH", object_path(obj), body=obj, content_type=APPLY_MEDIA_TYPE,
                         params={"fieldManager": FIELD_MANAGER, "force": "true"})


async def missing_api_groups(client: KubeClient) -> list[str]:
    """The CRD group versions the mesh reads that the server does not serve."""
    missing = []
    for group, version in CRD_GROUPS:
        try:
            await client.request("GET", f"/apis/{group}/{version}")
        except KubeApiError as exc:
            if exc.code != 404 or isinstance(exc, ApiServerUnreachableError):
                raise
            missing.append(f"{group}/{version}")
    return missing


async def download_crds(urls: list[str], transport: httpx.AsyncBaseTransport | None = None
                        ) -> list[dict[str, Any]]:
    """Every document of the CRD files at ``urls``."""
    documents: list[dict[str, Any]] = []
    async with httpx.AsyncClient(follow_redirects=True, timeout=_CRD_DOWNLOAD_TIMEOUT,
                                 transport=transport) as http:
        for url in urls:
            try:
                response = await http.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise ConfigError(f"cannot download {url}: {exc} (without internet access, "
                                  "apply the CRDs from a copy with kubectl apply "
                                  "--server-side -f FILE)") from exc
            documents.extend(d for d in yaml.safe_load_all(response.text)
                             if isinstance(d, dict))
    return documents


async def wait_for_ztunnel(client: KubeClient, within: float) -> tuple[bool, str]:
    """Poll the DaemonSet until every scheduled pod runs the current template and is
    ready, or ``within`` seconds passed; (ready, what it waits for)."""
    path = f"{collection_path('DaemonSet', NAMESPACE)}/{ZTUNNEL}"

    async def look() -> tuple[bool, str]:
        ds = await client.request("GET", path)
        generation = ds.get("metadata", {}).get("generation", 0)
        status = ds.get("status") or {}
        desired = int(status.get("desiredNumberScheduled") or 0)
        ready = int(status.get("numberReady") or 0)
        updated = int(status.get("updatedNumberScheduled") or 0)
        if status.get("observedGeneration", 0) < generation:
            return False, "the DaemonSet controller has not seen this version yet"
        if desired == 0:
            return False, "no node is scheduled to run ztunnel yet"
        return (ready == desired and updated == desired,
                f"{ready}/{desired} ready, {updated}/{desired} up to date")

    last = await look()
    with trio.move_on_after(within):
        while not last[0]:
            await trio.sleep(POLL_INTERVAL)
            last = await look()
    return last


async def install(client: KubeClient, objects: list[dict[str, Any]], *, crds: bool,
                  wait_timeout: float,
                  download: httpx.AsyncBaseTransport | None = None) -> int:
    """Apply the CRDs (when asked; ``download`` is the transport that fetches them),
    check they are served, apply ``objects``, wait for ztunnel."""
    if crds:
        for what, url in CRD_SOURCES:
            print(f"applying {what} from {url}", flush=True)
            for doc in await download_crds([url], download):
                await server_side_apply(client, doc)
    missing = await missing_api_groups(client)
    if missing and crds:
        # New CRDs are served once Established, a moment after they were created.
        with trio.move_on_after(CRD_ESTABLISH_TIMEOUT):
            while missing:
                await trio.sleep(POLL_INTERVAL)
                missing = await missing_api_groups(client)
    if missing:
        raise ConfigError(
            f"the cluster does not serve {', '.join(missing)}: install the CRDs the mesh "
            "reads first (`ambientctl install --crds`, or `kubectl apply --server-side "
            "-k deploy/k8s/crds`)")
    for obj in objects:
        await server_side_apply(client, obj)
        print(f"{display(obj)} serverside-applied", flush=True)
    if wait_timeout <= 0:
        return 0
    ready, detail = await wait_for_ztunnel(client, wait_timeout)
    if not ready:
        print(f"error: ztunnel not ready after {wait_timeout:g}s: {detail} (see "
              f"`kubectl -n {NAMESPACE} describe daemonset {ZTUNNEL}` and `kubectl -n "
              f"{NAMESPACE} logs -l app={ZTUNNEL} --all-containers`)", file=sys.stderr)
        return 1
    print(f"ztunnel is ready on every node ({detail})")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    objects = install_objects(InstallOptions(image=args.image, log_level=args.log_level))
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
        return 0
    return _run(args, lambda client: install(client, objects, crds=args.crds,
                                             wait_timeout=args.wait_timeout))


# -- uninstall --------------------------------------------------------------------------------


async def waypoint_bindings(client: KubeClient) -> list[dict[str, Any]]:
    """The waypoints' ClusterRoleBindings (labelled as ours), as objects to delete."""
    data = await client.request("GET", collection_path("ClusterRoleBinding"),
                                params={"labelSelector": _PART_OF_SELECTOR})
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": item["metadata"]["name"]}}
            for item in data.get("items") or []]


def removal_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DaemonSet first (ztunnels drain while RBAC still lets them read), the
    namespace last; the rest in reverse install order."""
    rest = [o for o in reversed(objects) if o["kind"] not in ("DaemonSet", "Namespace")]
    first = [o for o in objects if o["kind"] == "DaemonSet"]
    last = [o for o in objects if o["kind"] == "Namespace"]
    return first + rest + last


async def _delete(client: KubeClient, obj: dict[str, Any]) -> bool:
    try:
        await client.request("DELETE", object_path(obj))
    except KubeApiError as exc:
        if exc.code == 404:
            return False
        raise
    return True


async def uninstall(client: KubeClient, objects: list[dict[str, Any]], *,
                    force: bool) -> int:
    """Delete ``objects`` (in :func:`removal_order`) and the waypoints' bindings."""
    enrolled = (await client.list(Namespace, label_selector=ENROLLED_SELECTOR)).items
    if enrolled and not force:
        names = ", ".join(sorted(n.metadata.name for n in enrolled))
        raise ConfigError(
            f"namespaces still enrolled: {names}; their pods' traffic would go to a "
            "ztunnel that is gone. Remove the label first (kubectl label namespace NAME "
            "istio.io/dataplane-mode-), or pass --force")
    for obj in objects[:-1] + await waypoint_bindings(client) + objects[-1:]:
        gone = await _delete(client, obj)
        print(f"{display(obj)} {'deleted' if gone else 'was not there'}", flush=True)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    objects = removal_order(install_objects())
    if args.dry_run:
        for obj in objects:
            print(f"{display(obj)} would be deleted")
        print("and every ClusterRoleBinding labelled " + _PART_OF_SELECTOR)
        return 0
    return _run(args, lambda client: uninstall(client, objects, force=args.force))
