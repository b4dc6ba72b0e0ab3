"""Bring a local cluster up, tear it down, report on it.

A cluster is: its state directory (``$AMBIENT_STATE_DIR`` or ``/run/pyambient``, then
``<name>/``: ``state.json``, the API server's SQLite file, pod logs, resolv.conf files),
its network namespaces (all named ``pa-<name>-...``, see :class:`~.network.Names`), and
the supervisor process (PID in ``state.json``) with the pod processes it started.
:func:`down` removes exactly those: the supervisor (SIGTERM, which stops its pods), any
process still living in one of the cluster's namespaces, the namespaces (every veth,
route and nftables table is inside them), and the state directory.  Nothing in the
host namespace is created besides the API server's 127.0.0.1 listener.

Without root, run the cluster inside a user namespace that also owns a network and a
mount namespace, with a private ``/run`` (``ip netns`` keeps its files there)::

    unshare --user --map-root-user --net --mount sh -c \
        'mount -t tmpfs tmpfs /run && ip link set lo up && ambientctl cluster up && ...'

Inside it, "root" may create namespaces, veths, bridges and nftables tables, all owned
by the user namespace; the API server's 127.0.0.1 is then the new namespace's loopback,
so every command that talks to the cluster runs in that shell (or joins it with
``nsenter --target PID --user --net --mount --preserve-credentials``, PID being the
supervisor's: ``pgrep -f deploy.local.supervisor``; its state file is in the private
``/run``).  The kernel must allow
unprivileged user namespaces (``/proc/sys/user/max_user_namespaces`` > 0), and the
Python interpreter must be readable by that user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.local import netns, network
from deploy.local.errors import ClusterError, ClusterStateError

DEFAULT_NAME = "ambient"
DEFAULT_NODES = 2
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_POLL = 0.05


def state_root() -> Path:
    return Path(os.environ.get("AMBIENT_STATE_DIR") or "/run/pyambient")


def default_name() -> str:
    return os.environ.get("AMBIENT_CLUSTER") or DEFAULT_NAME


def state_dir(name: str) -> Path:
    return state_root() / network.check_cluster_name(name)


def read_state(name: str) -> dict[str, Any]:
    path = state_dir(name) / "state.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ClusterStateError(f"no local cluster named {name!r} is up (no {path}): "
                                "run `ambientctl cluster up`") from exc
    except (OSError, ValueError) as exc:
        raise ClusterStateError(f"cannot read {path}: {exc}") from exc
    return data


def _is_supervisor(pid: int, name: str) -> bool:
    """True when ``pid`` is this cluster's supervisor (not a recycled PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"deploy.local.supervisor" in argv and name.encode() in argv


def supervisor_alive(name: str) -> bool:
    try:
        pid = int(read_state(name).get("pid", 0))
    except ClusterStateError:
        return False
    return pid > 0 and _is_supervisor(pid, name)


def owned_namespaces(name: str) -> list[str]:
    names = network.Names(name)
    return [n for n in netns.list_names(names.prefix) if names.owns(n)]


def check_host() -> None:
    """Root and ``ip``/``nft`` are required; say so before touching anything."""
    if os.geteuid() != 0:
        raise ClusterError("the local cluster needs root for network namespaces: run as root, "
                           "or inside `unshare --user --map-root-user --net --mount`")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` is not installed (Debian: apt-get install "
                               f"{'iproute2' if tool == 'ip' else 'nftables'})")


@dataclass(frozen=True)
class UpResult:
    name: str
    server: str
    seconds: float
    already_up: bool


def up(name: str = DEFAULT_NAME, nodes: int = DEFAULT_NODES,
       timeout: float = READY_TIMEOUT) -> UpResult:
    """Create the cluster and return once it is ready (or raise, leaving nothing behind)."""
    check_host()
    network.check_cluster_name(name)
    if not 1 <= nodes <= network.MAX_NODES:
        raise ClusterError(f"--nodes must be between 1 and {network.MAX_NODES}, not {nodes}")
    started = time.monotonic()
    if supervisor_alive(name) and read_state(name).get("ready"):
        state = read_state(name)
        return UpResult(name, str(state["server"]), 0.0, True)
    down(name)  # leftovers of a cluster that died: start clean
    directory = state_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    names = network.Names(name)
    try:
        network.create_fabric(names, nodes)
        for i in range(nodes):
            network.create_node(names, i, nodes)
        with open(directory / "supervisor.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.local.supervisor", "--name", name,
                 "--nodes", str(nodes), "--state-dir", str(directory)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
        deadline = started + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"the cluster supervisor exited ({proc.returncode}): "
                                   f"{_tail(directory / 'supervisor.log')}")
            state = _try_state(directory)
            if state.get("ready"):
                return UpResult(name, str(state["server"]), time.monotonic() - started, False)
            time.sleep(_POLL)
        raise ClusterError(f"cluster {name!r} not ready after {timeout:.0f}s: "
                           f"{_tail(directory / 'supervisor.log')}")
    except BaseException:
        down(name)
        raise


def _try_state(directory: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((directory / "state.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(name: str = DEFAULT_NAME) -> list[str]:
    """Remove everything the cluster made; returns what was removed (for the user)."""
    check_host()
    removed: list[str] = []
    directory = state_dir(name)
    state = _try_state(directory)
    pid = int(state.get("pid", 0) or 0)
    if pid and _is_supervisor(pid, name):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _is_supervisor(pid, name) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(_POLL)
        if _is_supervisor(pid, name):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
        removed.append(f"supervisor pid {pid}")
    namespaces = owned_namespaces(name)
    inodes = {i for i in (netns.inode(n) for n in namespaces) if i is not None}

    def strays() -> set[int]:
        # Processes inside the cluster's namespaces (pods, anything exec'd there), and
        # helpers in the host namespace started with a path of the state directory
        # (the per-node ztunnels), left behind when the supervisor died without cleanup.
        found = set(netns.pids_in(inodes)) if inodes else set()
        return (found | _pids_with_argument_under(directory)) - {os.getpid()}

    # SIGKILL is asynchronous, and a process caught mid-fork can leave a child that the
    # first sweep did not see: sweep until none is left (bounded).
    killed: set[int] = set()
    deadline = time.monotonic() + STOP_TIMEOUT
    while (found := strays()) and time.monotonic() < deadline:
        for stray in found - killed:
            with contextlib.suppress(OSError):
                os.kill(stray, signal.SIGKILL)
                killed.add(stray)
                removed.append(f"process {stray}")
        time.sleep(_POLL)
    # Pods first, nodes, then the fabric: each deletion takes its veths along.
    for ns in sorted(namespaces, key=lambda n: (n.endswith("fabric"), "-node" in n)):
        netns.delete(ns)
        removed.append(f"netns {ns}")
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"state {directory}")
    return removed


def _pids_with_argument_under(directory: Path) -> set[int]:
    """Processes with a command-line argument inside ``directory``."""
    prefix = str(directory).encode() + b"/"
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.startswith(prefix) or arg + b"/" == prefix for arg in argv):
                found.add(int(entry.name))
    return found


def _reap(pid: int) -> None:
    """Collect the supervisor if it is our child (when `up` and `down` share a process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(name: str = DEFAULT_NAME) -> dict[str, Any]:
    """State, liveness and namespaces of the cluster (pods and nodes come from the API)."""
    state = read_state(name)
    return {"name": name, "state_dir": str(state_dir(name)), "server": state.get("server"),
            "nodes": state.get("nodes"), "ready": bool(state.get("ready")),
            "supervisor_pid": state.get("pid"), "supervisor_alive": supervisor_alive(name),
            "namespaces": owned_namespaces(name)}
