"""Network namespaces: create, list, delete, and open sockets inside one.

Namespaces are named files under ``/run/netns`` (``ip netns`` convention), so any tool
(``ip -n``, ``nsenter``) can find them.  To open a socket inside a namespace without
moving the whole process, :func:`in_netns` calls a function with the current thread
inside the namespace (:mod:`common.netns`, which returns the thread home afterwards):
a socket keeps the namespace it was created in for its whole life, so the caller can use
it from the trio thread afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from common.errors import ConfigError
from common.netns import call_in_netns
from deploy.local.errors import NetnsError

NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def run(argv: Sequence[str], *, input_text: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a host tool (``ip``, ``nft``); failure raises :class:`NetnsError` with its stderr."""
    try:
        done = subprocess.run(list(argv), input=input_text, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise NetnsError(f"{' '.join(argv[:6])} failed ({done.returncode}): {detail}")
    return done


async def arun(argv: Sequence[str], *, input_text: str | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """:func:`run` without blocking trio (a pooled thread waits for the child)."""
    return await trio.to_thread.run_sync(
        lambda: run(argv, input_text=input_text, check=check), abandon_on_cancel=False)


def add(name: str) -> None:
    """Create the named namespace (its loopback is brought up too)."""
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(name: str) -> None:
    """Delete the named namespace; links inside it go with it. Missing is not an error."""
    if exists(name):
        run(["ip", "netns", "delete", name], check=False)


def list_names(prefix: str = "") -> list[str]:
    """Names of the namespaces under /run/netns starting with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def inode(name: str) -> int | None:
    """The namespace's inode (compare with ``/proc/PID/ns/net``), or None if it is gone."""
    try:
        return os.stat(netns_path(name)).st_ino
    except OSError:
        return None


def pids_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes``."""
    return [pid for pids in pids_by_netns(inodes).values() for pid in pids]


def pids_by_netns(inodes: set[int]) -> dict[int, list[int]]:
    """Namespace inode -> processes in it, for the given inodes (one pass over /proc)."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ino = os.stat(entry / "ns" / "net").st_ino
        except OSError:
            continue  # exited meanwhile, or a kernel thread we may not inspect
        if ino in inodes:
            found.setdefault(ino, []).append(int(entry.name))
    return found


def in_netns(name: str, func: Callable[[], T]) -> T:
    """Call ``func`` inside namespace ``name`` (on this thread, which then returns home)."""
    try:
        return call_in_netns(str(netns_path(name)), func)
    except ConfigError as exc:
        raise NetnsError(str(exc)) from exc


def socket_in(name: str, family: int = socket.AF_INET,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in namespace ``name`` (bind/connect it from any thread)."""
    return in_netns(name, lambda: socket.socket(family, kind))


async def trio_socket_in(name: str, family: int = socket.AF_INET,
                         kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """:func:`socket_in` for trio code (the helper thread runs off the trio thread)."""
    sock = await trio.to_thread.run_sync(socket_in, name, family, kind)
    return trio.socket.from_stdlib_socket(sock)


async def listen_in(name: str, host: str, port: int, backlog: int = 1024) -> trio.SocketListener:
    """A TCP listener bound to ``host:port`` inside namespace ``name``."""
    sock = await trio_socket_in(name)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise NetnsError(f"cannot listen on {host}:{port} in netns {name}: {exc}") from exc
    sock.listen(backlog)
    return trio.SocketListener(sock)
