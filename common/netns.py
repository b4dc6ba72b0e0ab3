"""Run code inside another network namespace without moving the process.

``setns(CLONE_NEWNET)`` changes the namespace of the calling *thread* only, and a
socket keeps the namespace it was created in for its whole life.  So a helper
thread enters the target namespace, creates sockets (listeners in a pod, dials
from a pod's address), returns to its original namespace, and hands the sockets
back: the rest of the process never leaves the host namespace.  ANCHORS.md records
that this was checked on Python 3.11.

The thread is returned to its own namespace before it goes back to trio's thread
cache; if that fails the thread would be unusable, so the process stops loudly
rather than run later work in a pod's namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from common.errors import ConfigError

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


_local = threading.local()


def _home_netns() -> int:
    """This thread's own namespace, opened once per thread (an open costs ~50 µs)."""
    fd: int | None = getattr(_local, "home", None)
    if fd is None:
        fd = _local.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def open_netns(netns_path: str) -> int:
    """An fd on the namespace at ``netns_path`` (holding it keeps the namespace alive).

    Raises ConfigError when it cannot be opened (pod gone, wrong path, not root).
    """
    try:
        return os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot open network namespace {netns_path}: {exc.strerror} "
            "(is the pod still running, and is this process root?)") from exc


def call_in_netns_fd(netns_fd: int, fn: Callable[[], T]) -> T:
    """Call ``fn`` on this thread while it is inside the namespace ``netns_fd`` refers to."""
    home = _home_netns()
    _setns(netns_fd)
    try:
        return fn()
    finally:
        try:
            _setns(home)
        except OSError:  # pragma: no cover - would leave a thread in a pod
            os.write(2, b"fatal: cannot return a thread to its network namespace\n")
            os._exit(70)


def call_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on this thread while it is inside the namespace at ``netns_path``.

    Blocking: use :func:`run_in_netns` from trio code.
    """
    target = open_netns(netns_path)
    try:
        return call_in_netns_fd(target, fn)
    finally:
        os.close(target)


async def run_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread inside the namespace at ``netns_path``."""
    return await trio.to_thread.run_sync(call_in_netns, netns_path, fn)
