"""Helpers of the kind tests: kubectl, the in-pod probe, ztunnel's endpoints, polling, the
waypoint's Gateway status."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml

from common.kube import KubeClient, Pod

T = TypeVar("T")
HERE = Path(__file__).parent
CLUSTER = os.environ.get("KIND_CLUSTER_NAME", "pyambient-e2e")
IMAGE = os.environ.get("PYAMBIENT_IMAGE", "pyambient:e2e")
NAMESPACE = "mesh-e2e"
LATE_NAMESPACE = "mesh-e2e-late"
WAYPOINT = "waypoint"  # the Gateway deploy/kind/e2e.sh applies in NAMESPACE
# How long the mesh may take to act on an API change (snapshot, enrolment, routes).
SETTLE = 60.0
POLL = 1.0


def manifest(name: str) -> str:
    """A manifest of tests/kind/manifests, for the image under test."""
    return (HERE / "manifests" / name).read_text().replace("pyambient:e2e", IMAGE)


def manifest_objects(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest(name)) if d]


async def kubectl(*args: str, stdin: bytes = b"", check: bool = True,
                  within: float = 120.0) -> str:
    """Run kubectl against the current kubeconfig (the e2e script's kind cluster)."""
    with trio.fail_after(within):
        result = await trio.run_process(["kubectl", *args], stdin=stdin, capture_stdout=True,
                                        capture_stderr=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: "
                             f"{result.stderr.decode(errors='replace')}")
    return result.stdout.decode(errors="replace")


async def apply(name: str) -> None:
    await kubectl("apply", "-f", "-", stdin=manifest(name).encode())


async def delete(name: str) -> None:
    await kubectl("delete", "--ignore-not-found", "--wait=true", "-f", "-",
                  stdin=manifest(name).encode())


async def probe(url: str, count: int = 1, *, method: str = "GET", headers: dict[str, str]
                | None = None, source: str = "deploy/client",
                namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Send ``count`` requests from inside ``source`` (a pod or deploy/NAME); one dict per
    answer: ``status`` (0 when no answer) and the echo app's JSON ``body``."""
    extra = [f"{k}:{v}" for k, v in (headers or {}).items()]
    out = await kubectl("exec", "-i", "-n", namespace, source, "--", "python", "-", url,
                        str(count), method, *extra,
                        stdin=(HERE / "probe.py").read_bytes(), within=60.0 + 12 * count)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def eventually(check: Callable[[], Awaitable[T | None]], what: str,
                     within: float = SETTLE) -> T:
    """Poll ``check`` until it returns something other than None, or fail after ``within``."""
    with trio.move_on_after(within):
        while True:
            result = await check()
            if result is not None:
                return result
            await trio.sleep(POLL)
    raise AssertionError(f"timed out after {within:g}s waiting for {what}")


async def pod_of(kube: KubeClient, namespace: str, app: str) -> Pod:
    pods = (await kube.list(Pod, namespace, label_selector=f"app={app}")).items
    running = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip
               and not p.metadata.deletion_timestamp]
    assert running, f"no running pod app={app} in {namespace}"
    return sorted(running, key=lambda p: p.metadata.name)[0]


async def ztunnel_pod(kube: KubeClient, node: str) -> str:
    pods = (await kube.list(Pod, "ambient-system", label_selector="app=ztunnel")).items
    mine = [p.metadata.name for p in pods if p.spec.node_name == node]
    assert mine, f"no ztunnel pod on node {node}"
    return mine[0]


_FETCH = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


async def ztunnel_get(kube: KubeClient, node: str, port: int, path: str) -> str:
    """GET one of ztunnel's operator endpoints (admin 15000 is on localhost only)."""
    pod = await ztunnel_pod(kube, node)
    return await kubectl("exec", "-n", "ambient-system", pod, "-c", "ztunnel", "--",
                         "python", "-c", _FETCH, f"http://127.0.0.1:{port}{path}")


async def enrolled_pods(kube: KubeClient, node: str) -> set[str]:
    """Names of the pods the ztunnel of ``node`` has enrolled (from its config dump)."""
    dump = json.loads(await ztunnel_get(kube, node, 15000, "/config_dump"))
    return {p["pod"] for p in dump["enrolled_pods"]}


def counter(metrics: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:_total)?\{{(.*)\}} ([0-9.e+-]+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def gateway_status_problems(gateway: Mapping[str, Any], cluster_ips: list[str]) -> list[str]:
    """What is wrong with a waypoint Gateway's ``status`` (empty: nothing), as written by
    the waypoint itself: ``Accepted`` and ``Programmed`` True for the Gateway's current
    generation, the Service's cluster IPs as its addresses, listener ``mesh`` programmed."""
    generation = (gateway.get("metadata") or {}).get("generation") or 1
    status = gateway.get("status") or {}
    found = []
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for kind in ("Accepted", "Programmed"):
        cond = conditions.get(kind)
        if cond is None:
            found.append(f"no {kind} condition")
        elif cond.get("status") != "True" or cond.get("observedGeneration") != generation:
            found.append(f"{kind}={cond.get('status')} for generation "
                         f"{cond.get('observedGeneration')} (Gateway at {generation}): "
                         f"{cond.get('reason')}: {cond.get('message')}")
    addresses = [a.get("value") for a in status.get("addresses") or []]
    if addresses != cluster_ips:
        found.append(f"addresses {addresses}, want the Service's cluster IPs {cluster_ips}")
    listeners = {x.get("name"): x for x in status.get("listeners") or []}
    mesh = listeners.get("mesh")
    listener_programmed = [c for c in (mesh or {}).get("conditions") or []
                           if c.get("type") == "Programmed" and c.get("status") == "True"]
    if not listener_programmed:
        found.append(f"listener 'mesh' not Programmed=True: {mesh}")
    return found
