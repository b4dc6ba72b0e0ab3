"""A trio stream over a plain non-blocking TCP socket, built for proxying.

Theory of operation
-------------------
``trio.SocketStream`` is correct and general, but every call pays a checkpoint (a
trip through the scheduler), a busy-guard and a ``wait_writable`` dance.  A proxy's
sends nearly always complete at once and its reads usually find data already
waiting, so :class:`TcpStream` tries the system call first and waits for readiness
only when the kernel says it would block:

* a send is one ``send()``; a receive one ``recv()`` (or ``recv_into`` a caller's
  buffer);
* a read that did not fill its buffer most likely emptied the socket, so the next
  read waits for readiness *first* instead of paying a failing ``recv`` (a syscall
  and an exception): the common case of request/response traffic;
* calls that never waited still honour cancellation (``checkpoint_if_cancelled`` is
  cheap when nothing is cancelled) and, to stay fair to other tasks while a peer
  keeps the socket busy, yield once every ``_YIELD_EVERY`` calls.  That yield is
  shielded, so bytes already received are never lost to a cancellation.

:meth:`TcpStream.try_send` is the synchronous half of ``send_all``: it writes what the
kernel takes now and returns the count, never waiting.  The HBONE stream uses it to
write received tunnel bytes straight from the connection's reader task (see
:mod:`common.hbone.stream`), without waking the relay task.

Errors follow trio's meanings: :class:`trio.ClosedResourceError` after our own
``aclose``, :class:`trio.BrokenResourceError` (cause chained) when the peer reset or
the socket failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator

import trio

# One read: a small response arrives whole, bulk moves in large pieces.  Callers
# (the relay) usually pass their own, growing, size.
DEFAULT_RECEIVE_SIZE = 64 * 1024


def tune(sock: socket.socket) -> None:
    """Non-blocking, and Nagle off: proxied small writes must leave at once."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a half-closeable trio stream; syscall first, wait second.

    ``socket`` is the stdlib socket (for ``getpeername``, ``setsockopt``...); the stream
    owns it and closes it in :meth:`aclose`.
    """

    __slots__ = ("_calls", "_close_hook", "_closed", "_drained", "_receiving", "_sending",
                 "socket")

    _YIELD_EVERY = 16

    def __init__(self, sock: socket.socket) -> None:
        tune(sock)
        self.socket = sock
        self._closed = False
        self._calls = 0
        self._drained = False
        self._receiving = False
        self._sending = False
        self._close_hook: Callable[[], None] | None = None

    @contextlib.contextmanager
    def lent_socket(self, on_close: Callable[[], None]) -> Iterator[socket.socket]:
        """The socket, for someone who reads it on behalf of this stream's reader (the
        HBONE connection's poller): :meth:`receive_some` is refused meanwhile, and
        ``on_close`` runs first thing if the stream is closed, so the reader learns it."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._check_open()
        self._receiving = True
        self._close_hook = on_close
        try:
            yield self.socket
        finally:
            self._close_hook = None
            self._receiving = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TCP stream was closed by this side")

    async def _checkpoint(self) -> None:
        """After a call that did not wait: honour cancellation, and yield now and then."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._calls += 1
        if self._calls >= self._YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    # -- receiving --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` bytes (default 64 KiB); ``b""`` once the peer sent FIN."""
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        # Written out rather than shared with receive_into through a callback, and with
        # no helper coroutine on the usual path (wait, then read): this is the proxy's
        # hottest call, and each extra frame cost a measurable share of a small request.
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the TCP stream was closed by this side")
        self._receiving = True
        sock = self.socket
        waited = self._drained
        try:
            if waited:
                await self._wait(readable=True)
            while True:
                try:
                    data = sock.recv(size)
                    break
                except BlockingIOError:
                    await self._wait(readable=True)
                    waited = True
                except OSError as exc:
                    raise trio.BrokenResourceError(f"TCP receive failed: {exc}") from exc
            self._drained = 0 < len(data) < size
        finally:
            self._receiving = False
        if waited:
            self._calls = 0
        else:
            await self._checkpoint()
        return data

    async def receive_into(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with what arrived (at least one byte); 0 once the peer sent FIN."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the TCP stream was closed by this side")
        self._receiving = True
        size = len(buffer)
        waited = False
        try:
            if self._drained:
                await self._wait(readable=True)
                waited = True
            while True:
                try:
                    count = self.socket.recv_into(buffer)
                    break
                except BlockingIOError:
                    await self._wait(readable=True)
                    waited = True
                except OSError as exc:
                    raise trio.BrokenResourceError(f"TCP receive failed: {exc}") from exc
            self._drained = 0 < count < size
        finally:
            self._receiving = False
        if waited:
            self._calls = 0
        else:
            await self._checkpoint()
        return count

    # -- sending ----------------------------------------------------------------------

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel accepts now, without waiting; returns the byte count.

        Raises :class:`trio.BrokenResourceError` when the socket failed (peer reset),
        :class:`trio.BusyResourceError` during another task's ``send_all``.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_open()
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"TCP send failed: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; a cancelled call may have sent part of it (trio's rule)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_open()
        self._sending = True
        sock = self.socket
        total = len(data)
        sent = 0
        waited = False
        try:
            while sent < total:
                try:
                    # The whole buffer nearly always goes in one call: a view only for a rest.
                    sent += sock.send(memoryview(data)[sent:] if sent else data)
                except BlockingIOError:
                    await self._wait(readable=False)
                    waited = True
                except OSError as exc:
                    raise trio.BrokenResourceError(f"TCP send failed: {exc}") from exc
        finally:
            self._sending = False
        if waited:
            self._calls = 0
            return
        # _checkpoint written out: sends are the proxy's other hottest call.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._calls += 1
        if self._calls >= self._YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self._wait(readable=False)

    async def send_eof(self) -> None:
        """FIN: the peer reads EOF, we can keep receiving."""
        if self._sending:
            raise trio.BusyResourceError("send_eof while a send_all is in progress")
        self._check_open()
        await trio.lowlevel.checkpoint()
        with contextlib.suppress(OSError):  # the peer is already gone: nothing to tell it
            self.socket.shutdown(socket.SHUT_WR)

    # -- waiting and closing ----------------------------------------------------------

    async def _wait(self, *, readable: bool) -> None:
        try:
            if readable:
                await trio.lowlevel.wait_readable(self.socket)
            else:
                await trio.lowlevel.wait_writable(self.socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the TCP stream was closed while waiting") from None
        self._check_open()

    def close(self) -> None:
        """Close the socket now, without waiting (for code that cannot await, such as a
        timer's callback); a task waiting on it gets ClosedResourceError, and every later
        call too.  :meth:`aclose` afterwards only checkpoints."""
        if not self._closed:
            self._closed = True
            hook, self._close_hook = self._close_hook, None
            if hook is not None:
                hook()
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        """Close the socket (also when cancelled); a task waiting on it gets ClosedResourceError."""
        self.close()
        await trio.lowlevel.checkpoint()


async def open_tcp(host: str, port: int, *, sock: socket.socket | None = None) -> TcpStream:
    """Connect to ``host:port`` (an IP address); raises ``OSError`` when refused.

    ``sock``, when given, is an unconnected socket to connect from (created in another
    network namespace, or already bound); it is consumed, closed on any failure.
    """
    if sock is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if err:
            raise OSError(err, f"connect to {host}:{port} failed: {os.strerror(err)}")
        return TcpStream(sock)
    except BaseException:
        sock.close()
        raise
