"""``ambientctl cluster up|down|status``, ``exec`` and ``logs``: the local cluster.

``exec`` runs a host command inside a pod's network namespace with the pod's DNS
configuration (its resolv.conf bind-mounted in a private mount namespace) and passes
its exit code through; ``logs`` prints the pod's log file.  A target is a pod name or
``deploy/NAME`` (the first running pod of that Deployment).  The cluster is ``--cluster``,
else ``$AMBIENT_CLUSTER``, else ``ambient``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import trio

from common.errors import KubeApiError
from common.kube import Deployment, KubeClient, KubeConfig, Node, Pod
from deploy.local import cluster, netns, network
from deploy.local.errors import PodNotFoundError
from deploy.local.runtime import in_pod_argv

# `logs -f` looks for new output this often (a log file has no change notification here).
FOLLOW_INTERVAL = 0.2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("cluster", help="create, remove or inspect the local cluster",
                           description="A Kubernetes-like cluster on this machine: nodes and "
                           "pods as network namespaces, an API server, service VIPs and DNS.")
    csub = group.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    p_up = csub.add_parser("up", help="create the cluster (or reuse it) and wait until ready")
    p_up.add_argument("--nodes", type=int, default=cluster.DEFAULT_NODES)
    p_up.add_argument("--name", default=None, help="cluster name (default: ambient)")
    p_up.set_defaults(func=_up)
    p_down = csub.add_parser("down", help="remove every namespace, process and file it made")
    p_down.add_argument("--name", default=None)
    p_down.set_defaults(func=_down)
    p_status = csub.add_parser("status", help="nodes, pods and whether processes are alive")
    p_status.add_argument("--name", default=None)
    p_status.set_defaults(func=_status)

    p_exec = sub.add_parser("exec", help="run a command inside a pod's network namespace",
                            description="Runs a host command inside the pod's network "
                            "namespace with its DNS settings; the exit code is passed through.")
    _target_args(p_exec)
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p_exec.set_defaults(func=_exec)

    p_logs = sub.add_parser("logs", help="print a pod's output")
    _target_args(p_logs)
    p_logs.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new output until interrupted")
    p_logs.set_defaults(func=_logs)


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--cluster", default=None, help="cluster name (default: ambient)")
    parser.add_argument("target", help="POD or deploy/NAME")


def _name(args: argparse.Namespace) -> str:
    return str(getattr(args, "name", None) or getattr(args, "cluster", None)
               or cluster.default_name())


def _up(args: argparse.Namespace) -> int:
    name = _name(args)
    result = cluster.up(name, args.nodes)
    verb = "is already up" if result.already_up else f"is ready in {result.seconds:.1f}s"
    print(f"cluster {name!r} {verb}; API server {result.server}")
    pick = "" if name == cluster.DEFAULT_NAME else f" --cluster {name}"
    print("use it with:")
    print(f"  ambientctl get pods -A{pick}")
    print(f"  kubectl --server {result.server} get pods -A")
    print(f"  ambientctl exec{pick} -n NAMESPACE POD -- COMMAND")
    print(f"remove it with: ambientctl cluster down"
          f"{'' if name == cluster.DEFAULT_NAME else ' --name ' + name}")
    return 0


def _down(args: argparse.Namespace) -> int:
    name = _name(args)
    removed = cluster.down(name)
    print(f"cluster {name!r} removed ({len(removed)} items)" if removed
          else f"cluster {name!r} was not up: nothing to remove")
    return 0


def _status(args: argparse.Namespace) -> int:
    name = _name(args)
    info = cluster.status(name)
    alive = "alive" if info["supervisor_alive"] else "NOT RUNNING"
    print(f"cluster {name}: server {info['server']}, supervisor pid {info['supervisor_pid']} "
          f"{alive}, {len(info['namespaces'])} network namespaces")
    if not info["supervisor_alive"]:
        return 1

    async def show() -> None:
        async with KubeClient(KubeConfig.for_server(str(info["server"]))) as client:
            for node in (await client.list(Node)).items:
                labels = node.metadata.labels
                print(f"node {node.metadata.name}  {node.spec.pod_cidr}  "
                      f"{labels.get('topology.kubernetes.io/zone', '')}")
            pods = (await client.list(Pod)).items
            names = network.Names(name)
            inodes = {p.metadata.uid: netns.inode(names.pod(p.metadata.uid or "")) for p in pods}
            processes = netns.pids_by_netns({i for i in inodes.values() if i is not None})
            for pod in pods:
                ino = inodes[pod.metadata.uid]
                running = len(processes.get(ino, [])) if ino is not None else 0
                print(f"pod {pod.metadata.namespace}/{pod.metadata.name}  "
                      f"{pod.status.phase or 'Pending'}  {pod.status.pod_ip or '-'}  "
                      f"{pod.spec.node_name or '-'}  processes={running}")

    trio.run(show)
    return 0


async def find_pod(server: str, namespace: str, target: str) -> Pod:
    """The pod named ``target``, or for ``deploy/NAME`` a running pod of that Deployment."""
    async with KubeClient(KubeConfig.for_server(server)) as client:
        kind, _, name = target.partition("/")
        if not name:
            try:
                return await client.get(Pod, kind, namespace)
            except KubeApiError as exc:
                raise PodNotFoundError(f"no pod {kind!r} in namespace {namespace!r}: {exc}") \
                    from exc
        if kind not in ("deploy", "deployment", "deployments"):
            raise PodNotFoundError(f"{target!r}: use POD or deploy/NAME")
        dep = await client.get(Deployment, name, namespace)
        pods = (await client.list(Pod, namespace)).items
        mine = [p for p in pods if any(r.uid == dep.metadata.uid
                                       for r in p.metadata.owner_references)
                and p.status.phase == "Running" and p.status.pod_ip]
        if not mine:
            raise PodNotFoundError(f"deployment {name!r} in {namespace!r} has no running pod yet")
        return sorted(mine, key=lambda p: p.metadata.name)[0]


def _exec(args: argparse.Namespace) -> int:
    name = _name(args)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("error: give the command after --, e.g. "
              "ambientctl exec POD -- curl http://echo:8080/", file=sys.stderr)
        return 2
    state = cluster.read_state(name)
    pod = trio.run(find_pod, str(state["server"]), args.namespace, args.target)
    resolv = cluster.state_dir(name) / "resolv" / f"{args.namespace}.conf"
    resolv.parent.mkdir(parents=True, exist_ok=True)
    if not resolv.exists():
        resolv.write_text(network.resolv_conf(args.namespace))
    argv = in_pod_argv(network.Names(name).pod(pod.metadata.uid or ""), resolv, cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the exit code of the command becomes ours


def _logs(args: argparse.Namespace) -> int:
    name = _name(args)
    state = cluster.read_state(name)
    pod = trio.run(find_pod, str(state["server"]), args.namespace, args.target)
    path: Path = cluster.state_dir(name) / "logs" / args.namespace / f"{pod.metadata.name}.log"
    offset = 0
    while True:
        if path.exists():  # absent until the pod's first start
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not args.follow:
            return 0
        try:
            time.sleep(FOLLOW_INTERVAL)
        except KeyboardInterrupt:
            return 0
