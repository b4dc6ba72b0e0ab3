"""``python -m deploy.local.demo``: the local cluster end to end, in one command.

Brings up (or reuses) the 2-node cluster ``ambient``, applies namespace ``demo`` with a
client pod and two versions of the echo app (``app: echo``, ``version: v1|v2``) behind
one Service ``echo``, sends requests from the client pod to ``http://echo:8080/`` (curl
when the host has it, else Python's urllib, run inside the client pod's network
namespace with its DNS), and prints which pod, version and node answered each one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from typing import Any

import trio

from common.errors import KubeApiError, MeshError
from common.kube import KubeClient, KubeConfig, Pod
from common.kube.objects import Resource, parse_object
from deploy.local import cluster

NAMESPACE = "demo"


def demo_objects() -> list[dict[str, Any]]:
    def echo(version: str, replicas: int) -> dict[str, Any]:
        labels = {"app": "echo", "version": version}
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"echo-{version}", "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "serviceAccountName": "echo",
                         "containers": [{"name": "echo", "image": "ambient/echo",
                                         "ports": [{"containerPort": 8080}],
                                         "env": [{"name": "VERSION", "value": version}]}]}}}}

    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "echo", "namespace": NAMESPACE}},
        echo("v1", 2), echo("v2", 1),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "echo", "namespace": NAMESPACE},
         "spec": {"selector": {"app": "echo"},
                  "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "client", "namespace": NAMESPACE, "labels": {"app": "client"}},
         "spec": {"containers": [{"name": "client", "image": "ambient/echo"}]}},
    ]


async def apply_and_wait(server: str, within: float = 60.0) -> None:
    async with KubeClient(KubeConfig.for_server(server)) as client:
        for data in demo_objects():
            obj: Resource = parse_object(data)
            try:
                await client.create(obj)
                print(f"created {data['kind'].lower()}/{data['metadata']['name']}")
            except KubeApiError as exc:
                if exc.code != 409:
                    raise
        with trio.move_on_after(within):
            while True:
                pods = (await client.list(Pod, NAMESPACE)).items
                ready = [p for p in pods if any(c.type == "Ready" and c.status == "True"
                                                for c in p.status.conditions or [])]
                if len(pods) == 4 and len(ready) == 4:
                    return
                await trio.sleep(0.2)
        raise MeshError(f"demo pods not ready after {within:.0f}s: "
                        "see `ambientctl get pods -n demo` and `ambientctl logs`")


def request_argv(url: str) -> list[str]:
    if shutil.which("curl"):
        return ["curl", "-sS", "-m", "5", url]
    return [sys.executable, "-c",
            f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5)"
            ".read().decode())"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--name", default=cluster.DEFAULT_NAME)
    args = parser.parse_args(argv)
    try:
        up = cluster.up(args.name, cluster.DEFAULT_NODES)
        print(f"cluster {args.name!r} {'reused' if up.already_up else 'up'} "
              f"({up.seconds:.1f}s), API server {up.server}")
        trio.run(apply_and_wait, up.server)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    url = "http://echo:8080/"
    print(f"\nsending {args.requests} requests from pod demo/client to {url}")
    for i in range(1, args.requests + 1):
        done = subprocess.run(
            [sys.executable, "-m", "deploy.ambientctl", "exec", "--cluster", args.name,
             "-n", NAMESPACE, "client", "--", *request_argv(f"{url}?n={i}")],
            capture_output=True, text=True, timeout=30, check=False)
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            print(f"  {i}: failed (exit {done.returncode}): {done.stderr.strip()}")
            continue
        print(f"  {i}: {reply['pod']:<28} version={reply.get('version', '?'):<3} "
              f"node={reply['node']}  saw source {reply['source']}")
    print(f"\nlook around:  ambientctl get pods -n {NAMESPACE}   "
          f"ambientctl exec -n {NAMESPACE} client -- curl -s {url}")
    print(f"tear down:    ambientctl cluster down --name {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
