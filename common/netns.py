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


def call_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on this thread while it is inside the namespace at ``netns_path``.

    Blocking: use :func:`run_in_netns` from trio code.  Raises ConfigError when the
    namespace file cannot be opened (pod gone, wrong path, not root).
    """
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot open network namespace {netns_path}: {exc.strerror} "
            "(is the pod still running, and is this process root?)") from exc
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return fn()
            finally:
                try:
                    _setns(home)
                except OSError:  # pragma: no cover - would leave a thread in a pod
                    os.write(2, b"fatal: cannot return a thread to its network namespace\n")
                    os._exit(70)
        finally:
            os.close(home)
    finally:
        os.close(target)


async def run_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread inside the namespace at ``netns_path``."""
    return await trio.to_thread.run_sync(call_in_netns, netns_path, fn)
