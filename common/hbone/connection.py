"""The trio shell around :class:`H2Protocol`: one HBONE connection over one byte stream.

Theory of operation
-------------------
Two tasks per connection.  The *reader* reads large chunks (256 KiB) and feeds them
to the protocol, dispatching the events to streams; it never writes, so a peer that
stops reading cannot block it (no deadlock of two readers each stuck in a write).
The *writer* is the only task that writes: it collects pending stream payloads (as
far as the peer's windows allow, round-robin, a bounded batch per stream per round)
plus the protocol's own frames, and writes them in order.  A stream's ``send_all``
returns when its bytes went out, so an application can never queue more than the
one buffer it passed in.

Fast path for sends: when the writer is idle (not writing, nothing left over from a
previous write), :meth:`HboneStream.send_all` frames its bytes and writes them to the
transport in its own task, through the transport's synchronous ``try_send`` (our
TLSStream has one), and returns without waking the writer: a task switch to the
writer and one back per message was most of a small request's cost.  Whatever the
socket does not take at once is left to the writer as a backlog, written before
anything else, and the sender then waits for it like any other send.  The fast path
never waits while it holds the transport, so the writer can never find it busy.

Polled sources: a relay copying a plain TCP socket into one of our streams
(:meth:`HboneStream.pump_from`) does not wait on its socket in its own task.  The
socket joins a private epoll set of the connection (created with the first one), and
one *poller* task waits on that set's fd: on readiness it reads each ready socket
(64 KiB), frames what it read, and writes the whole pass's frames by the fast path
above in one write, all synchronously.  So a batch of requests from many connections
costs one task step instead of one each (the profile blamed trio's per-wake-up cost:
~10-15 us of loop, EPOLLONESHOT re-arm and resumption per task step on this machine),
and one TLS record run and one syscall, which also wakes the peer once, instead of one
each (this cut the ztunnel pair's CPU per small request by 40 %).  Whenever the poller
cannot finish on its own (a write would block, EOF, an error, a closed stream) it
unregisters the socket and hands the bytes back to the relay's task, which sends them
the ordinary way (waiting for the writer, so backpressure holds: no socket is read
while its bytes are still pending) and then registers the socket again.  A read that
fills the 64 KiB buffer marks the source as bulk and hands it back for good: the
relay's own loop, with its growing reads, moves bulk more cheaply.

The connection ends when the transport reaches EOF or fails, on a protocol error
(GOAWAY already queued and flushed), or when we close it after a GOAWAY once its
last stream finished.  Every stream still open then fails with
:class:`StreamResetError`.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import structlog
import trio

from common.errors import MeshError, ProtocolError, TransportError
from common.hbone.protocol import DataChunk, Event, H2Protocol
from common.hbone.stream import HboneStream, StreamResetError
from common.identity import SpiffeId
from common.logging import get_logger
from common.tcp import TcpStream

READ_SIZE = 256 * 1024
_FIRST_READ_SIZE = 16 * 1024
# A connection whose 256 KiB reads fill up is carrying bulk: 1 MiB reads then cost
# 17 % less CPU per GiB on the receiving ztunnel (fewer wake-ups, TLS drains and
# larger writes into the pod's socket; bench/ztunnel_l4.py --bulk).
_BULK_READ_SIZE = 1024 * 1024
# Payload taken from one stream per writer round: large enough to amortize the round,
# small enough that one bulk stream cannot starve the others.
_SEND_BATCH = 1024 * 1024
# Writes below this size are joined into one buffer (one TLS record run, one syscall);
# larger payloads go out by reference, uncopied.
_COALESCE_BELOW = 64 * 1024
_TLS_RECORD = 16 * 1024  # the largest TLS record payload
# A task whose sends all complete at once never yields; this often it does anyway
# (shielded), so one busy stream cannot starve the other tasks.
_YIELD_EVERY = 16

# Errors that mean "the transport is gone", from trio streams or A's TLSStream.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    TransportError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)

RequestCallback = Callable[["HboneConnection", h2.events.RequestReceived], None]

_log = get_logger("hbone")


# What the poller tells a polled source's task (HboneConnection._pump_polled): EOF, the
# socket or the connection failed (``error`` set), or bytes or a bulk source to handle.
_EOF, _FAILED, _READY = "eof", "failed", "ready"
# One read of the poller: a request or response arrives whole; a read that fills it
# marks the source as bulk, handed back to the relay's own loop.
_POLL_READ = 64 * 1024


@dataclass(slots=True, eq=False)
class _Polled:
    """A plain socket whose reads the poller task does for a stream (see module doc)."""

    stream: HboneStream
    sock: Any  # socket.socket
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    registered: bool = False
    state: str | None = None  # set by the poller when the owning task must act
    data: bytes = b""  # read but not yet (all) written
    # ``data`` was framed and its rest is in the backlog: the writer's mark of it
    pending: _PendingSend | None = None
    bulk: bool = False  # a read filled the poller's buffer
    error: BaseException | None = None
    count: int = 0


@dataclass(slots=True)
class _PendingSend:
    stream: HboneStream
    view: memoryview
    pos: int = 0
    done: bool = False
    error: BaseException | None = None


class HboneConnection:
    """One HTTP/2 connection carrying HBONE streams; either side.

    Run :meth:`run` in a nursery; it returns when the connection is over.
    """

    def __init__(self, transport: trio.abc.HalfCloseableStream | trio.abc.Stream, *,
                 client_side: bool, peer_identity: SpiffeId | None = None,
                 peer_address: tuple[str, int] | None = None,
                 on_request: RequestCallback | None = None,
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.transport = transport
        self.client_side = client_side
        self.peer_identity = peer_identity
        self.peer_address = peer_address
        self.protocol = H2Protocol(client_side=client_side, clock=trio.current_time)
        self.log = log or _log.bind(peer=str(peer_identity) if peer_identity else None,
                                    peer_addr=peer_address)
        self._on_request = on_request
        self.streams: dict[int, HboneStream] = {}
        self._sends: dict[int, _PendingSend] = {}
        self._written: list[_PendingSend] = []
        # Fast path state: the transport's synchronous send, bytes a fast send left
        # unwritten (the writer writes them first), and whether the writer is writing.
        self._try_send: Callable[[bytes | memoryview], int] | None = getattr(
            transport, "try_send", None)
        # A transport that may take bytes before their ciphertext is all out (our
        # TLSStream): then the writer must finish sending it (an empty backlog write).
        self._has_unsent: Callable[[], bool] | None = getattr(transport, "has_unsent", None)
        self._backlog: list[bytes | memoryview] = []
        self._writing = False
        self._fast_sends = 0
        # Polled sources: created with the first one (most connections never have one).
        self._poll: select.epoll | None = None
        self._poller_done = False
        self._polled: dict[int, _Polled] = {}
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._senders = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()  # unparked whenever the stream set changes
        self._stopping = False
        self.closed = False
        self.goaway_received = False
        self.draining = False
        self.error: BaseException | None = None
        self.nursery: trio.Nursery | None = None
        self._done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; streams still open then fail."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                task_status.started()
                await self._reader()
                self._fail_streams(self.error)
                self._stop_writer()
                # Give the writer a moment to flush a GOAWAY; a dead peer must not hold us.
                with trio.move_on_after(1.0):
                    await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._fail_streams(self.error)
            with trio.CancelScope(shield=True):
                await _close_quietly(self.transport)
            self._idle_lot.unpark_all()

    @property
    def available(self) -> bool:
        """True while new streams may be opened on this connection."""
        return not (self.closed or self.goaway_received or self.draining or self.protocol.closed)

    @property
    def max_streams(self) -> int:
        return min(100, self.protocol.peer_max_concurrent_streams)

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """GOAWAY now and end the connection once its last stream finished."""
        self.draining = True
        self.protocol.close(error_code)
        self._wake_writer()
        self._maybe_finish()

    async def wait_idle(self) -> None:
        """Return once the connection has no streams or is closed."""
        while self.streams and not self.closed:
            await self._idle_lot.park()

    async def wait_busy(self) -> None:
        """Return once the connection has a stream or is closed."""
        while not self.streams and not self.closed:
            await self._idle_lot.park()

    async def close_when_idle(self, idle_seconds: float) -> None:
        """GOAWAY and close once the connection had no stream for ``idle_seconds``."""
        while not self.closed and not self.draining:
            await self.wait_idle()
            if self.closed:
                return
            with trio.move_on_after(idle_seconds):
                await self.wait_busy()
                continue
            if not self.streams:
                self.log.debug("hbone idle connection closed", idle_seconds=idle_seconds)
                self.close()
                return

    def _maybe_finish(self) -> None:
        self._idle_lot.unpark_all()
        if not self.streams and (self.draining or self.goaway_received):
            self._stopping = True
            self._wake_writer()

    # -- streams --------------------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]]) -> HboneStream:
        """Send a request now (no await); the caller then awaits its response."""
        if not self.available:
            raise StreamResetError("connection no longer accepts streams", retryable=True)
        try:
            stream_id = self.protocol.send_request(headers)
        except h2.exceptions.TooManyStreamsError as exc:
            raise StreamResetError("peer's stream limit reached", retryable=True) from exc
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        self._idle_lot.unpark_all()
        self._wake_writer()
        return stream

    def accept_stream(self, stream_id: int) -> HboneStream:
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        self._idle_lot.unpark_all()
        return stream

    def respond(self, stream: HboneStream, status: int) -> None:
        """Answer a request: 200 opens the tunnel, anything else ends the stream."""
        ok = status == 200
        try:
            self.protocol.send_response(stream.stream_id, status, end_stream=not ok)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamResetError("the client reset the stream before the answer") from exc
        if not ok:
            stream._local_ended = True
            stream._close_now()
        self._wake_writer()

    def _acknowledge(self, stream_id: int, size: int) -> None:
        # Most credits are batched inside the protocol: wake the writer only when a
        # WINDOW_UPDATE is actually due (a wake-up per chunk costs a task step).
        if not self.closed:
            self.protocol.acknowledge(stream_id, size)
            if self.protocol.has_output():
                self._wake_writer()

    def _end_stream(self, stream: HboneStream) -> None:
        if self.closed:
            return
        try:
            self.protocol.end_stream(stream.stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self._wake_writer()
        self._retire_if_finished(stream)

    def _retire_if_finished(self, stream: HboneStream) -> None:
        if stream._remote_ended and stream._local_ended and stream._error is None:
            # Both directions done: the stream no longer counts against the pool.
            self.streams.pop(stream.stream_id, None)
            self._maybe_finish()

    def _forget(self, stream: HboneStream, *, reset: bool, unconsumed: int) -> None:
        pending = self._sends.pop(stream.stream_id, None)
        if pending is not None:
            pending.error = StreamResetError("the HBONE stream was closed while sending")
            self._senders.unpark_all()
        if not self.closed:
            if reset:
                self.protocol.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            # Bytes nobody will read still free the connection window.
            self.protocol.acknowledge(0, unconsumed)
            self._wake_writer()
        self.streams.pop(stream.stream_id, None)
        self._maybe_finish()

    # -- polled sources ---------------------------------------------------------------

    async def _pump_polled(self, stream: HboneStream, source: TcpStream) -> tuple[int, bool]:
        """Copy ``source`` into ``stream`` with the reads done by the poller task.

        Returns ``(bytes copied, True)`` at EOF, or ``(bytes copied, False)`` once a read
        filled the poller's buffer: the source is busy (bulk), and the caller's own loop
        with its growing reads serves it better.  Raises what the socket or the stream
        raised.  Cancellation unregisters the socket; bytes the poller read but could
        not send yet are then lost with the relay that was cancelled.
        """
        if self.closed or self._poller_done:
            raise StreamResetError("the HBONE connection is closed")
        poll = self._poll
        if poll is None:
            assert self.nursery is not None
            poll = self._poll = select.epoll()
            self.nursery.start_soon(self._poller, poll)

        def closed_meanwhile() -> None:
            # The source was closed by another task: stop reading it, fail its reader.
            if entry.registered:
                entry.registered = False
                with contextlib.suppress(OSError, ValueError):
                    poll.unregister(fd)
            entry.error = trio.ClosedResourceError("the TCP stream was closed while relayed")
            entry.state = _FAILED
            entry.lot.unpark_all()

        with source.lent_socket(closed_meanwhile) as sock:
            entry = _Polled(stream, sock)
            fd = sock.fileno()
            self._polled[fd] = entry
            try:
                return await self._serve_polled(poll, fd, entry)
            finally:
                self._polled.pop(fd, None)
                if entry.registered:
                    entry.registered = False
                    with contextlib.suppress(OSError, ValueError):
                        poll.unregister(fd)

    async def _serve_polled(self, poll: select.epoll, fd: int, entry: _Polled
                            ) -> tuple[int, bool]:
        stream = entry.stream
        while True:
            if self._poller_done:
                raise StreamResetError("the HBONE connection is closed")
            poll.register(fd, select.EPOLLIN)
            entry.registered = True
            while entry.state is None:
                await entry.lot.park()
            state, entry.state = entry.state, None
            if state == _EOF:
                return entry.count, True
            if entry.error is not None:
                raise entry.error
            data, entry.data = entry.data, b""
            pending, entry.pending = entry.pending, None
            if pending is not None:
                await self._wait_sent(stream, pending)
            elif data:
                stream._check_sendable()
                await self._send_rest(stream, memoryview(data), partial=False)
            if entry.bulk:
                return entry.count, False

    async def _poller(self, poll: select.epoll) -> None:
        """One task reads every polled source: a readiness costs a loop over ready
        sockets, not a task step each, and the pass's frames go out in one write (see
        module doc)."""
        polled = self._polled
        buffer = bytearray(_POLL_READ)
        view = memoryview(buffer)  # sliced per read: one copy into ``data``, not two
        try:
            while True:
                await trio.lowlevel.wait_readable(poll.fileno())
                framed: list[tuple[int, _Polled, bytes]] = []
                for fd, _events in poll.poll(0):
                    entry = polled.get(fd)
                    if entry is None or not entry.registered:
                        continue
                    try:
                        count = entry.sock.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        error = trio.BrokenResourceError(f"TCP receive failed: {exc}")
                        error.__cause__ = exc
                        entry.error = error
                        self._hand_back(poll, fd, entry, _FAILED)
                        continue
                    if not count:
                        self._hand_back(poll, fd, entry, _EOF)
                        continue
                    entry.count += count
                    data = bytes(view[:count])
                    entry.bulk = count == _POLL_READ
                    if self._frame_polled(entry.stream, data):
                        framed.append((fd, entry, data))
                        continue
                    # The fast path does not apply: the relay's task sends the bytes.
                    entry.data = data
                    self._hand_back(poll, fd, entry, _READY)
                if not framed:
                    continue
                # One write for every source read in this pass: with many requests in
                # flight a pass finds several, and each write is a TLS record and a
                # syscall that also wakes the peer.
                written = self._write_now(_coalesce(self.protocol.data_to_send()))
                for fd, entry, data in framed:
                    if not written:
                        # Framed, and its rest is in the backlog: its task waits for the
                        # writer (no read of the socket until then: backpressure).  The
                        # mark is queued now, before the writer can flush the backlog.
                        entry.pending = self._mark_backlogged(stream=entry.stream,
                                                              view=memoryview(data))
                        self._hand_back(poll, fd, entry, _READY)
                    elif entry.bulk:
                        self._hand_back(poll, fd, entry, _READY)
        finally:
            self._poller_done = True
            poll.close()
            for entry in polled.values():
                entry.registered = False
                entry.error = StreamResetError("the HBONE connection is closed")
                entry.state = _FAILED
                entry.lot.unpark_all()

    def _frame_polled(self, stream: HboneStream, data: bytes) -> bool:
        """Queue ``data`` whole as DATA frames for the poller's write of this pass, when
        the fast path applies (see :meth:`_send_now`); else do nothing, return False."""
        if (self._try_send is None or not self._fast_path_open()
                or stream._error is not None or stream._closed
                or len(data) > self.protocol.send_window(stream.stream_id)):
            return False
        self.protocol.send_data(stream.stream_id, memoryview(data))
        return True

    @staticmethod
    def _hand_back(poll: select.epoll, fd: int, entry: _Polled, state: str) -> None:
        poll.unregister(fd)
        entry.registered = False
        entry.state = state
        entry.lot.unpark_all()

    # -- sending ------------------------------------------------------------------------

    async def _send(self, stream: HboneStream, view: memoryview) -> None:
        if self.closed:
            raise StreamResetError("the HBONE connection is closed")
        # Before writing: a call cancelled on entry sends nothing (as trio's own streams).
        await trio.lowlevel.checkpoint_if_cancelled()
        written = self._send_now(stream, view)
        if written is True:
            self._fast_sends += 1
            if self._fast_sends >= _YIELD_EVERY:
                self._fast_sends = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._send_rest(stream, view, written is False)

    async def _send_rest(self, stream: HboneStream, view: memoryview, partial: bool) -> None:
        """Wait until the writer sent ``view``; ``partial``: the fast path already framed
        it and left the rest in the backlog."""
        if self.closed:
            raise StreamResetError("the HBONE connection is closed")
        if partial:
            pending = self._mark_backlogged(stream, view)
        else:
            pending = _PendingSend(stream, view)
            self._sends[stream.stream_id] = pending
            self._wake_writer()
        await self._wait_sent(stream, pending)

    def _mark_backlogged(self, stream: HboneStream, view: memoryview) -> _PendingSend:
        """A send the fast path framed and partly wrote: done once the writer wrote the
        backlog (the next write after this call marks it)."""
        pending = _PendingSend(stream, view, pos=len(view))
        self._written.append(pending)
        self._wake_writer()
        return pending

    async def _wait_sent(self, stream: HboneStream, pending: _PendingSend) -> None:
        if self.closed and not pending.done:
            raise StreamResetError("the HBONE connection is closed")
        try:
            while not pending.done:
                if pending.error is not None:
                    raise pending.error
                await self._senders.park()
        except BaseException:
            if not pending.done:
                # Cancelled or failed mid-way: the peer holds part of the buffer, so the
                # stream can only be reset (trio's contract for a cancelled send_all).
                self._sends.pop(stream.stream_id, None)
                stream._on_error(StreamResetError("send was interrupted; stream reset"))
                if not self.closed:
                    self.protocol.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                    self._wake_writer()
            raise
        if pending.error is not None:
            raise pending.error

    def _send_now(self, stream: HboneStream, view: memoryview) -> bool | None:
        """The fast path: frame ``view`` and write it from the caller's task.

        Returns ``True`` when all of it was written, ``False`` when it was framed but
        the rest waits in the backlog for the writer, ``None`` when the fast path does
        not apply (nothing was done).  A transport error is not raised here: the
        unwritten bytes go to the backlog and the writer meets the error itself and
        ends the connection the one usual way.
        """
        try_send = self._try_send
        if try_send is None or not self._fast_path_open():
            return None
        if len(view) < _COALESCE_BELOW:
            # The usual small message: one frame in one buffer, one write.
            frame = self.protocol.frame_small(stream.stream_id, view)
            if frame is not None:
                try:
                    sent = try_send(frame)
                except TRANSPORT_ERRORS:
                    sent = 0
                if sent < len(frame):
                    self._backlog = [memoryview(frame)[sent:]]
                    return False
                return self._all_out()
        if len(view) > self.protocol.send_window(stream.stream_id):
            return None
        self.protocol.send_data(stream.stream_id, view)
        return self._write_now(_coalesce(self.protocol.data_to_send()))

    def _fast_path_open(self) -> bool:
        """A send may be written from the sender's task: the writer is not writing and
        has nothing left over (it would be overtaken), and the connection is not ending."""
        return not (self._writing or self._backlog or self._stopping)

    def _write_now(self, chunks: list[bytes | memoryview]) -> bool:
        """Write framed ``chunks`` synchronously; False when the rest went to the backlog
        (the writer writes it first; a transport error is left for the writer to meet)."""
        assert self._try_send is not None
        for index, chunk in enumerate(chunks):
            try:
                sent = self._try_send(chunk)
            except TRANSPORT_ERRORS:
                sent = 0
            if sent < len(chunk):
                # TLS rule: a retried write starts with the same bytes; the backlog does.
                self._backlog = [memoryview(chunk)[sent:], *chunks[index + 1:]]
                return False
        return self._all_out()

    def _all_out(self) -> bool:
        """After a fast write: True when the transport has nothing left to send; else the
        writer is left an empty write, which sends the rest (False, as a backlog)."""
        if self._has_unsent is not None and self._has_unsent():
            self._backlog = [b""]
            return False
        return True

    async def _wait_send_window(self, stream: HboneStream) -> None:
        while (not self.closed and stream._error is None
               and self.protocol.send_window(stream.stream_id) <= 0):
            await self._senders.park()
        await trio.lowlevel.checkpoint()

    def _fail_streams(self, cause: BaseException | None) -> None:
        text = f"HBONE connection lost: {cause}" if cause else "HBONE connection closed"
        for stream in list(self.streams.values()):
            stream._on_error(StreamResetError(text, retryable=stream.status is None))
        for pending in [*self._sends.values(), *self._written]:
            pending.error = StreamResetError(text)
        self._sends.clear()
        self._written.clear()
        self.streams.clear()
        self._senders.unpark_all()
        self._idle_lot.unpark_all()

    # -- reader ---------------------------------------------------------------------------

    async def _reader(self) -> None:
        protocol = self.protocol
        receive_into: Callable[[memoryview], Awaitable[int]] | None = getattr(
            self.transport, "receive_into", None)
        # With receive_into (our TLSStream) one buffer serves every read: no 256 KiB
        # allocation and zero-fill per read, and only the bytes read are copied out.
        # It starts small and grows each time a read fills it, so that thousands of idle
        # pooled connections do not each pin 256 KiB (ztunnel's buffers do the same),
        # and only a bulk connection gets the 1 MiB one.
        buffer = memoryview(bytearray(_FIRST_READ_SIZE))
        try:
            while not self._stopping:
                if receive_into is not None:
                    count = await receive_into(buffer)
                    data: bytes | bytearray | memoryview = buffer[:count]
                    if count == len(buffer) < _BULK_READ_SIZE:
                        grown = READ_SIZE if count < READ_SIZE else _BULK_READ_SIZE
                        buffer = memoryview(bytearray(grown))
                else:
                    data = await self.transport.receive_some(READ_SIZE)
                if not data:
                    if not (self.draining or self.goaway_received) or self.streams:
                        self.log.debug("hbone peer closed the connection")
                    return
                # Lent views of the read buffer: a stream copies only what it queues,
                # and the read buffer is not reused before the events are dispatched.
                for event in protocol.receive_data(data, lend=True):
                    self._dispatch(event)
                if protocol.has_output():
                    self._wake_writer()
        except ProtocolError as exc:
            self.error = exc
            self.log.warning("hbone protocol error, connection closed", reason=str(exc))
            self._wake_writer()
        except TRANSPORT_ERRORS as exc:
            self.error = exc
            if self.streams:
                self.log.info("hbone connection lost", reason=str(exc))

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataChunk):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream._closed:
                self.protocol.acknowledge(event.stream_id, len(event.data))
            else:
                stream._on_data(event.data)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_writer()
            self._senders.unpark_all()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_end()
                self._retire_if_finished(stream)
        elif isinstance(event, h2.events.RequestReceived):
            if self._on_request is None:
                self.protocol.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self._on_request(self, event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response(_status(event.headers))
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        self._sends.pop(event.stream_id, None)
        if stream is None:
            return
        code = int(event.error_code or 0)
        refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
        if code == h2.errors.ErrorCodes.NO_ERROR and stream._remote_ended:
            # RFC 9113 8.1: a complete answer followed by "stop sending": not an error.
            stream._local_ended = True
        else:
            stream._on_error(StreamResetError(
                f"peer reset HBONE stream {event.stream_id} ({_code_name(code)})",
                error_code=code, retryable=refused and stream.status is None))
        self._senders.unpark_all()
        self._maybe_finish()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True
        last = event.last_stream_id if event.last_stream_id is not None else 2**31 - 1
        code = int(event.error_code or 0)
        if code != h2.errors.ErrorCodes.NO_ERROR:
            self.log.info("hbone peer sent GOAWAY", error=_code_name(code))
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                self.streams.pop(stream_id)
                stream._on_error(StreamResetError(
                    "peer is going away and did not process this stream",
                    error_code=code, retryable=True))
        self._maybe_finish()

    # -- writer ---------------------------------------------------------------------------

    def _wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    def _stop_writer(self) -> None:
        self._stopping = True
        self._wake_writer()

    async def _writer(self) -> None:
        try:
            while True:
                pieces = self._collect()
                if pieces:
                    self._writing = True
                    try:
                        await self._write(pieces)
                    finally:
                        self._writing = False
                    for pending in self._written:
                        pending.done = True
                    if self._written:
                        self._written.clear()
                        self._senders.unpark_all()
                    continue
                if self._stopping:
                    break
                await self._writer_lot.park()
            if (self.draining or self.goaway_received) and not self.streams:
                # A GOAWAY went out or came in and no stream is left: the connection is
                # done, so end the reader too rather than wait for the peer to hang up.
                await _close_quietly(self.transport)
        except TRANSPORT_ERRORS as exc:
            if self.error is None:
                self.error = exc
            await _close_quietly(self.transport)
        finally:
            self._done.set()

    def _collect(self) -> list[bytes | memoryview]:
        protocol = self.protocol
        for stream_id, pending in list(self._sends.items()):
            try:
                taken = protocol.send_data(stream_id, pending.view[pending.pos:pending.pos
                                                                   + _SEND_BATCH])
            except h2.exceptions.StreamClosedError:
                pending.error = StreamResetError(f"HBONE stream {stream_id} is closed")
                del self._sends[stream_id]
                self._senders.unpark_all()
                continue
            pending.pos += taken
            if pending.pos == len(pending.view):
                del self._sends[stream_id]
                self._written.append(pending)
        pieces = protocol.data_to_send()
        if self._backlog:
            pieces[:0] = self._backlog
            self._backlog = []
        return pieces

    async def _write(self, pieces: list[bytes | memoryview]) -> None:
        send = self.transport.send_all
        for chunk in _coalesce(pieces):
            await send(chunk)


def _coalesce(pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Group frames into writes: small pieces joined (one TLS record run, one syscall),
    large payloads by reference, uncopied."""
    chunks: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < _COALESCE_BELOW:
            small.append(piece)
            continue
        if small:
            # Frame headers and control frames ride in front of the payload's first
            # TLS record (a 16 KiB copy) instead of costing a record and a write of
            # their own.
            size = sum(len(p) for p in small)
            head = max(_TLS_RECORD - size, 0)
            small.append(piece[:head])
            chunks.append(b"".join(small))
            small = []
            piece = piece[head:]
        chunks.append(piece)
    if small:
        chunks.append(small[0] if len(small) == 1 else b"".join(small))
    return chunks


def _status(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                break
    return 0


def _code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


async def _close_quietly(transport: Any) -> None:
    gone = (MeshError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    with trio.CancelScope(shield=True), contextlib.suppress(*gone):
        await transport.aclose()

