"""One tunneled byte stream (an HTTP/2 stream of a HBONE connection) as a trio stream.

Backpressure: bytes handed out by :meth:`HboneStream.receive_some` are credited to
the peer (WINDOW_UPDATE) on the *next* call, that is once the consumer has written
them onward and come back for more.  The peer can never have more than our stream
window (4 MiB) queued here, whatever the speed difference between the two ends.

Direct delivery: a consumer that copies everything it reads into a plain socket (the
relay) may register that socket with :meth:`HboneStream.set_direct_sink`.  While the
consumer is parked in :meth:`receive_some` with nothing queued, the connection's
reader task then writes received DATA straight into the sink (non-blocking) and
credits the peer at once: the bytes were written onward, and the consumer task is
never woken for them, which saved two task switches per message.  Whatever the
sink does not take at once (it would block, or it failed) is queued as usual, in
order, and the consumer's own ``send_all`` waits for the socket or reports its error.

Half-close: :meth:`send_eof` sends END_STREAM; reading continues until the peer's
END_STREAM (``b""``).  :meth:`aclose` ends gracefully when the peer already ended,
otherwise resets the stream (CANCEL), like closing a TCP socket with the peer
still sending.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

import trio

from common.errors import StreamBrokenError, StreamClosedError
from common.tcp import TcpStream

if TYPE_CHECKING:
    from common.hbone.connection import HboneConnection


class StreamResetError(StreamBrokenError):
    """The peer reset the stream, or its connection was lost.

    ``retryable`` is true when the peer cannot have acted on the request
    (REFUSED_STREAM, a GOAWAY that excluded it, or a connection lost before any
    answer); the pool then retries once on a fresh connection.
    """

    def __init__(self, message: str, *, error_code: int | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.retryable = retryable


class DirectSink(Protocol):
    """A byte sink that can take bytes synchronously (e.g. :class:`common.tcp.TcpStream`)."""

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what can be written now without waiting; return the byte count."""
        ...


# What a failing sink raises from try_send: the bytes are then queued, and the
# consumer's send_all to the same sink raises the error where it can be handled.
_SINK_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)


class HboneStream(trio.abc.HalfCloseableStream):
    """A bidirectional byte stream tunneled through HBONE, with independent half-close."""

    # Slots and a queue made on first use: ztunnel holds one of these per tunneled
    # connection, and an empty deque alone is 760 bytes (bench memory case).
    __slots__ = (
        "_closed",
        "_error",
        "_local_ended",
        "_queue",
        "_queued",
        "_readers",
        "_receiving",
        "_remote_ended",
        "_response",
        "_sending",
        "_sink",
        "_unacked",
        "connection",
        "direct_bytes",
        "status",
        "stream_id",
    )

    def __init__(self, connection: HboneConnection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.status: int | None = None
        self._queue: deque[bytes | bytearray] | None = None
        self._queued = 0
        self._unacked = 0
        self._remote_ended = False
        self._local_ended = False
        self._closed = False
        self._error: StreamResetError | None = None
        self._readers = trio.lowlevel.ParkingLot()
        self._response = trio.Event()
        self._receiving = False
        self._sending = False
        self._sink: DirectSink | None = None
        self.direct_bytes = 0  # received bytes the reader task wrote into the sink itself

    # -- what the connection calls --------------------------------------------------------

    def _on_response(self, status: int) -> None:
        self.status = status
        self._response.set()

    def _on_data(self, data: bytes | memoryview) -> None:
        """Bytes received; a view is valid only during this call (copied if queued)."""
        sink = self._sink
        # Only while the consumer waits with nothing queued: anything else would
        # overtake bytes it holds or has queued.
        if sink is not None and self._receiving and not self._queue:
            try:
                sent = sink.try_send(data)
            except _SINK_ERRORS:
                sent = 0
            if sent:
                self.direct_bytes += sent
                self.connection._acknowledge(self.stream_id, sent)
                if sent == len(data):
                    return
                data = data[sent:]
        if self._queue is None:
            self._queue = deque()
        self._queue.append(bytes(data) if isinstance(data, memoryview) else data)
        self._queued += len(data)
        self._readers.unpark_all()

    def _on_end(self) -> None:
        self._remote_ended = True
        self._readers.unpark_all()
        self._response.set()

    def _on_error(self, error: StreamResetError) -> None:
        if self._error is None:
            self._error = error
        self._readers.unpark_all()
        self._response.set()

    def set_direct_sink(self, sink: DirectSink | None) -> None:
        """Let the reader task write received bytes into ``sink`` itself (see module doc).

        The caller must be the one consumer, copying everything :meth:`receive_some`
        returns into ``sink`` with ``send_all``; ``None`` ends direct delivery.
        """
        self._sink = sink

    @property
    def buffered(self) -> int:
        """Received bytes waiting for the consumer (bounded by our stream window)."""
        return self._queued

    async def _wait_response(self) -> int:
        await self._response.wait()
        if self.status is None:
            if self._error is not None:
                raise self._error
            raise StreamResetError("the peer ended the stream without answering",
                                   retryable=False)
        return self.status

    # -- trio stream interface ------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the peer; ``b""`` once the peer sent END_STREAM."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise StreamClosedError("the HBONE stream was closed by this side")
        self._receiving = True
        waited = False
        try:
            self._credit()
            while not self._queue:
                if self._error is not None:
                    raise self._error
                if self._remote_ended:
                    break
                waited = True
                await self._readers.park()
                if self._closed:
                    raise StreamClosedError("the HBONE stream was closed while receiving")
            if self._queue:
                chunk = self._queue.popleft()
                if max_bytes is not None and len(chunk) > max_bytes:
                    self._queue.appendleft(chunk[max_bytes:])
                    chunk = chunk[:max_bytes]
                self._queued -= len(chunk)
                self._unacked += len(chunk)
            else:
                chunk = b""
        finally:
            self._receiving = False
        if not waited:
            # Parking was our checkpoint; without it, yield once as every trio call must.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    def _credit(self) -> None:
        if self._unacked:
            self.connection._acknowledge(self.stream_id, self._unacked)
            self._unacked = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes; returns once they were written to the connection."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_sendable()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            await self.connection._send(self, view)
        finally:
            self._sending = False

    async def pump_from(self, source: TcpStream) -> tuple[int, bool]:
        """Send what arrives on ``source`` until its EOF, with the reads done by the
        connection's poller task (see :mod:`common.hbone.connection`).

        Returns ``(bytes sent, True)`` at EOF, or ``(bytes sent, False)`` when the source
        proved busy (bulk): the caller goes on copying with its own reads.  Raises what
        the source or this stream raised; the caller must be this stream's only sender.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_sendable()
        self._sending = True
        try:
            return await self.connection._pump_polled(self, source)
        finally:
            self._sending = False

    def _check_sendable(self) -> None:
        if self._closed:
            raise StreamClosedError("the HBONE stream was closed by this side")
        if self._local_ended:
            raise StreamClosedError("send after send_eof on this HBONE stream")
        if self._error is not None:
            raise self._error

    async def wait_send_all_might_not_block(self) -> None:
        await self.connection._wait_send_window(self)

    async def send_eof(self) -> None:
        """END_STREAM: the peer reads EOF; we can keep receiving."""
        if self._sending:
            raise trio.BusyResourceError("send_eof while a send_all is in progress")
        await trio.lowlevel.checkpoint()
        if self._local_ended or self._closed:
            return
        if self._error is not None:
            raise self._error
        self._local_ended = True
        self.connection._end_stream(self)

    async def aclose(self) -> None:
        """Close both directions (graceful when the peer already ended); never blocks."""
        self._close_now()
        await trio.lowlevel.checkpoint_if_cancelled()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        graceful = self._remote_ended and self._error is None
        if graceful and not self._local_ended:
            self._local_ended = True
            self.connection._end_stream(self)
        unconsumed = self._queued + self._unacked
        self._queue = None
        self._queued = self._unacked = 0
        self.connection._forget(self, reset=not graceful, unconsumed=unconsumed)
        self._readers.unpark_all()
        self._response.set()
