"""Sockets from inside a pod's network namespace, marked so the capture rules skip them.

Theory of operation.  Every socket ztunnel opens for a pod lives in that pod's network
namespace: its listeners (15001, 15006, 15008, ...), its outbound dials (so a tunnel
leaves with the pod's own IP) and its connects to the pod's application (from the
original client's IP, ``IP_TRANSPARENT``).  Each of those sockets carries ``SO_MARK``
0x539, so the pod's nftables rules never capture ztunnel's own traffic.

A socket keeps the namespace it was created in, so only *creation* needs the namespace.
Per-connection sockets (a transparent connect per inbound connection) would pay a
thread hand-off each time; :class:`PodNetns` instead keeps the namespace file open and
switches the *calling* thread into it (:func:`common.netns.call_in_netns_fd`) for the
few microseconds of ``socket()`` + ``setsockopt`` + ``bind``, then back, with no
``await`` in between, so no other task ever runs in the pod's namespace.  (Measured:
about 20 µs per socket on the 2-core development machine, against about 100 µs for a
thread round trip.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

import trio

from common.errors import ConfigError, ConnectRefusedError, ConnectTimeoutError
from common.netns import call_in_netns_fd, open_netns
from common.tcp import TcpStream
from ztunnel.inpod.rules import ZTUNNEL_MARK

T = TypeVar("T")

# SO_LINGER with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)
_IPV6_TRANSPARENT = 75  # linux/in6.h; Python's socket module does not export it
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h (also applies to IPv6 sockets)


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class PodNetns:
    """An open handle on one pod's network namespace, to create sockets in it.

    Holding the file open keeps the namespace alive as long as ztunnel serves the pod,
    even if the runtime deletes its name; :meth:`close` releases it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = open_netns(path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` with this thread inside the pod's namespace; blocking, never awaits."""
        if self._fd is None:
            raise ConfigError(f"network namespace {self.path} was released: the pod is no "
                              f"longer enrolled")
        return call_in_netns_fd(self._fd, fn)

    def tcp_socket(self, family: socket.AddressFamily, *, source: str | None = None,
               transparent: bool = False) -> socket.socket:
        """A marked, non-blocking TCP socket in the pod; bound to ``source`` when given
        (``transparent``: an address that is not the pod's, the original client's)."""
        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
                if transparent:
                    level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP
                    option = (_IPV6_TRANSPARENT if family == socket.AF_INET6
                              else socket.IP_TRANSPARENT)
                    sock.setsockopt(level, option, 1)
                if source is not None:
                    # Let connect() pick the port knowing the whole 4-tuple, instead of
                    # bind() picking one blind (under churn that can land on a 4-tuple
                    # still in TIME_WAIT, and also exhausts ports per source sooner).
                    sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source, 0))
            except BaseException:
                sock.close()
                raise
            return sock
        try:
            return self.run(make)
        except PermissionError as exc:
            raise ConfigError("SO_MARK and IP_TRANSPARENT need CAP_NET_ADMIN: run ztunnel "
                              "as root or with that capability") from exc

    def listen(self, host: str, port: int, *, backlog: int = 1024) -> socket.socket:
        """A listening socket on ``host:port`` inside the pod (SO_REUSEADDR, non-blocking)."""
        def make() -> socket.socket:
            family = family_of(host)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # The IPv4 listener on the same port is separate: no dual-stack clash.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock
        try:
            return self.run(make)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} in {self.path}: {exc.strerror} "
                              f"(is another ztunnel serving this pod?)") from exc


async def connect(sock: socket.socket, address: tuple[str, int], *,
                  timeout: float) -> TcpStream:  # noqa: ASYNC109 - names the address
    """Connect a socket made by :meth:`PodNetns.tcp_socket`; consumes it on failure.

    Raises :class:`ConnectRefusedError` or :class:`ConnectTimeoutError` naming the address.
    """
    host, port = address
    try:
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            with trio.move_on_after(timeout) as scope:
                await trio.lowlevel.wait_writable(sock)
            if scope.cancelled_caught:
                raise ConnectTimeoutError(f"no TCP connection to {host}:{port} within "
                                          f"{timeout:g} s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectRefusedError(f"TCP connect to {host}:{port} failed: "
                                      f"{os.strerror(err)}") from OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return TcpStream(sock)


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees a reset, not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """The next connection on a non-blocking stdlib listener (EMFILE etc. retried slowly)."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                await trio.sleep(0.1)
                continue
            raise
        sock.setblocking(False)
        return sock, (address[0], address[1])
