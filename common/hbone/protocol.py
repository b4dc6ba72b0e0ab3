"""Sans-I/O HTTP/2 connection for HBONE: bytes in, events out; frames out, no sockets.

Theory of operation
-------------------
``h2`` keeps the connection and stream state (HEADERS, SETTINGS, RST_STREAM, GOAWAY,
PING, WINDOW_UPDATE from the peer, HPACK), but its DATA path copies every frame
several times and ANCHORS.md measured it slower than Envoy's whole tunnel.  So DATA
frames take a path of our own, in both directions:

* Receive: :meth:`H2Protocol.receive_data` splits the byte stream into frames itself.
  Every non-DATA frame is handed to ``h2`` whole.  A DATA frame's payload is delivered
  as it arrives (a 1 MiB frame read in 256 KiB pieces gives four :class:`DataChunk`
  events, no reassembly), and flow control for received DATA is ours alone: ``h2``
  never sees a non-empty DATA frame, so its inbound windows are never consumed and we
  never ask it to widen them.  To keep ``h2``'s stream state right, a DATA frame that
  carries END_STREAM is replayed to ``h2`` as an empty DATA frame with END_STREAM
  once its payload was delivered; a DATA frame for a stream we do not hold open is
  replayed empty at once, so ``h2`` answers it (RST_STREAM or GOAWAY) as it would.
* WINDOW_UPDATE and GOAWAY from the peer are handled here too (h2's generic frame
  path is slow for the former, and h2 refuses all further frames after the latter).
* Send: :meth:`H2Protocol.send_data` builds DATA frame headers itself, queues the
  caller's payload as a memoryview (no copy) and debits the same outbound window
  counters ``h2`` keeps, so ``h2``'s view of the peer's windows stays exact.
  END_STREAM goes through ``h2`` (an empty DATA frame) so its state machine sees it.

Output order is preserved by always draining ``h2``'s buffer into ours before we
append frames of our own.

Limits: any frame up to the MAX_FRAME_SIZE we advertise is accepted (RFC 9113 4.2),
HEADERS and CONTINUATION included; what bounds a header block is its own size
(MAX_HEADER_LIST_SIZE, checked on each frame header before the frame is buffered), the
number of CONTINUATION frames in it, and ``h2``'s HPACK decoder bounding the decoded
list.  Frames of unknown types are skipped as they stream past, never buffered
(RFC 9113 5.5); a SETTINGS frame may carry at most MAX_SETTINGS_ENTRIES settings.  A
peer refused for breaking or abusing HTTP/2 raises
:class:`common.errors.Http2ViolationError` whose ``reason`` says how, in one word.

Our inbound windows are credited (WINDOW_UPDATE) only when the application says the
bytes were consumed (:meth:`H2Protocol.acknowledge`), which is what makes a slow
reader slow the writer.  The peer can therefore have at most one stream window
(4 MiB) of unconsumed data queued per stream; more is a FLOW_CONTROL_ERROR.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from common.errors import Http2ViolationError
from common.hbone.hpack_literal import LiteralEncoder

# DESIGN.md section 4: what we offer every HBONE peer.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_CONCURRENT_STREAMS = 100
# HBONE requests carry a handful of short headers; 64 KiB stops header bombs early.
MAX_HEADER_LIST_SIZE = 64 * 1024
# CVE-2024-27316 with empty frames: a header block that never ends costs no bytes, only
# frames.  64 KiB in the smallest frames any peer must accept (16 KiB) takes 4.
MAX_CONTINUATION_FRAMES = 32
# A peer has seven settings to send.  One 1 MiB SETTINGS frame holds 174,762 entries,
# which h2 takes a quarter of a second to apply, the event loop blocked all along; so,
# like nghttp2 (Envoy's codec), refuse more than 32 in one frame.
MAX_SETTINGS_ENTRIES = 32
# RFC 9113: the initial connection window before any WINDOW_UPDATE, and the largest.
_DEFAULT_WINDOW = 65_535
_MAX_WINDOW = 2**31 - 1
# Credits are batched: a WINDOW_UPDATE per MiB (stream) or 4 MiB (connection), not
# per read; the sender still always has three quarters of a window in hand.
_STREAM_CREDIT_THRESHOLD = STREAM_WINDOW // 4
_CONNECTION_CREDIT_THRESHOLD = CONNECTION_WINDOW // 4

# CVE-2023-44487 (rapid reset): a token bucket of peer-sent RST_STREAM frames.  A well
# behaved client cancels a stream now and then; thousands per second is an attack.
RESET_BURST = 200
RESET_RATE_PER_SECOND = 100.0
# CVE-2019-9512/9515 (PING and SETTINGS floods): each such frame owes the peer an ACK.
# A peer that floods and never reads leaves those ACKs queued here, 17 bytes of our
# memory per 17 bytes it sends, without end.  A writer that keeps up collects them
# (data_to_send) long before this many pile up; only a peer that stops reading does not.
MAX_OWED_ACKS = 10_000

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length as (hi16, lo8), type, flags, stream
_DATA = 0x0
_HEADERS = 0x1
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_CONTINUATION = 0x9
_FLAG_END_STREAM = 0x1
_FLAG_END_HEADERS = 0x4
_FLAG_PADDED = 0x8


# Not frozen: one is made per received DATA piece, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs twice as much.
@dataclass(slots=True, kw_only=True)
class DataChunk:
    """Payload bytes received on ``stream_id`` (a piece of one DATA frame, padding removed)."""

    stream_id: int
    data: bytes | memoryview  # a view only when receive_data was asked to lend them


Event = DataChunk | h2.events.Event


def _error_code(code: int) -> h2.errors.ErrorCodes | int:
    try:
        return h2.errors.ErrorCodes(code)
    except ValueError:
        return code


def _frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


class H2Protocol:
    """One HTTP/2 connection's state, either side; never blocks, never does I/O.

    Call :meth:`receive_data` with bytes from the peer and act on the events; call
    :meth:`data_to_send` after every call and write what it returns, in order.
    Methods raise :class:`common.errors.Http2ViolationError` (a ``ProtocolError``) when
    the peer broke the protocol; a GOAWAY is then already queued in :meth:`data_to_send`.
    """

    def __init__(self, *, client_side: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.client_side = client_side
        self._clock = clock
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.encoder = LiteralEncoder()
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        else:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        # h2 takes initial values as already acknowledged, so the hook that raises its
        # own limits when the peer ACKs our SETTINGS never runs: without these two lines
        # it keeps the 16 KiB frame default and refuses a HEADERS frame we invited.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self._out: list[bytes | memoryview] = []
        self._h2.initiate_connection()
        self._flush_h2()
        # The connection window is widened once, by us, and tracked by us from here on.
        self._out.append(self._window_update(0, CONNECTION_WINDOW - _DEFAULT_WINDOW))

        self._preface_left = 0 if client_side else len(_PREFACE)
        self._partial = bytearray()  # a frame header, or a whole non-DATA frame, in progress
        self._frame_len = -1  # length of the non-DATA frame being collected, -1 if none
        self._expect_continuation = False
        self._header_block = 0  # bytes of the header block being received
        self._continuations = 0  # CONTINUATION frames of that block so far
        # DATA frame in progress: stream, payload bytes still to come, padding after them.
        self._data_stream = 0
        self._data_left = 0
        self._pad_left = 0
        self._data_flags = 0
        self._data_deliver = False
        self._lend = False  # the current receive_data call lends payload views

        self._receiving: set[int] = set()  # streams whose peer side is open and registered
        self._conn_window = CONNECTION_WINDOW
        self._stream_window: dict[int, int] = {}
        self._conn_credit = 0
        self._stream_credit: dict[int, int] = {}

        self._reset_tokens = float(RESET_BURST)
        self._reset_stamp = clock()
        self.closed = False  # h2 is done: an error GOAWAY went out or came in
        self.goaway_sent = False
        self._owed_acks = 0  # PING/SETTINGS ACKs queued since the writer last collected

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the peer, in order; the caller writes it all."""
        self._flush_h2()
        out, self._out = self._out, []
        self._owed_acks = 0
        return out

    def has_output(self) -> bool:
        """True when :meth:`data_to_send` would return something."""
        return bool(self._out or self._h2._data_to_send)

    def _flush_h2(self) -> None:
        # h2's data_to_send copies its buffer and allocates a new one on every call, even
        # an empty one; this runs several times per message, so look first.
        if self._h2._data_to_send:
            self._out.append(self._h2.data_to_send())

    @staticmethod
    def _window_update(stream_id: int, increment: int) -> bytes:
        return _frame_header(4, _WINDOW_UPDATE, 0, stream_id) + struct.pack(">L", increment)

    # -- requests and responses -----------------------------------------------------------

    def send_request(self, headers: list[tuple[bytes, bytes]]) -> int:
        """Open a stream with a request HEADERS frame (no END_STREAM); returns its id."""
        stream_id: int = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, headers)
        return stream_id

    def send_response(self, stream_id: int, status: int, *, end_stream: bool) -> None:
        """Answer a request; a non-200 answer normally ends the stream."""
        self._h2.send_headers(stream_id, [(b":status", str(status).encode())],
                              end_stream=end_stream)
        if end_stream and self._stream_open(stream_id):
            # RFC 9113 section 8.1: after a complete answer, RST_STREAM(NO_ERROR) tells the
            # client to stop sending the request body; it frees the stream slot too.
            self.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _start_receiving(self, stream_id: int) -> None:
        self._receiving.add(stream_id)
        self._stream_window[stream_id] = STREAM_WINDOW
        self._stream_credit[stream_id] = 0

    def _stop_receiving(self, stream_id: int) -> None:
        self._receiving.discard(stream_id)
        self._stream_window.pop(stream_id, None)
        self._stream_credit.pop(stream_id, None)

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM, unless the stream is already closed both ways."""
        self._stop_receiving(stream_id)
        if self._stream_open(stream_id) and not self.closed:
            self._h2.reset_stream(stream_id, error_code)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side of the stream (END_STREAM on an empty DATA frame)."""
        if not self.closed:
            self._h2.end_stream(stream_id)

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Queue GOAWAY.  With NO_ERROR it is graceful: streams already open carry on
        (h2 itself would refuse to send anything after its GOAWAY, so this one is
        ours); with an error code the connection is over."""
        if self.closed or (self.goaway_sent and error_code == h2.errors.ErrorCodes.NO_ERROR):
            return
        if error_code != h2.errors.ErrorCodes.NO_ERROR:
            self.closed = True
            self._h2.close_connection(error_code=error_code)
            return
        self.goaway_sent = True
        last: int = self._h2.highest_inbound_stream_id
        self._flush_h2()
        self._out.append(_frame_header(8, _GOAWAY, 0, 0) + struct.pack(">LL", last, error_code))

    # -- sending DATA ---------------------------------------------------------------------

    def send_window(self, stream_id: int) -> int:
        """How many payload bytes the peer lets us send on ``stream_id`` now."""
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return 0
        window: int = min(self._h2.outbound_flow_control_window,
                          stream.outbound_flow_control_window)
        return max(window, 0)

    def frame_small(self, stream_id: int, data: memoryview) -> bytes | None:
        """All of ``data`` as one DATA frame in one new buffer, when nothing else is queued
        for the peer and the windows and frame size take it whole; else ``None``, and
        nothing was done.

        The fast path of a small message: one call and one copy instead of queueing
        frame pieces to join them again.  Keep ``data`` small (a copy is made).
        """
        if self._out or self._h2._data_to_send:
            return None
        stream = self._h2.streams.get(stream_id)
        size = len(data)
        if (stream is None or stream.closed or size > self._h2.outbound_flow_control_window
                or size > stream.outbound_flow_control_window
                or size > self._h2.max_outbound_frame_size):
            return None
        self._h2.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size
        return _FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA, 0, stream_id) + data

    def send_data(self, stream_id: int, data: memoryview) -> int:
        """Queue as much of ``data`` as the peer's windows allow; return the bytes taken.

        ``data`` is queued by reference: keep it unchanged until :meth:`data_to_send`'s
        result was written.
        """
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed:
            raise h2.exceptions.StreamClosedError(stream_id)
        take = min(len(data), self._h2.outbound_flow_control_window,
                   stream.outbound_flow_control_window)
        if take <= 0:
            return 0
        self._flush_h2()
        max_frame: int = self._h2.max_outbound_frame_size
        out = self._out
        data = data[:take]
        for start in range(0, take, max_frame):
            piece = data[start:start + max_frame]
            out.append(_frame_header(len(piece), _DATA, 0, stream_id))
            out.append(piece)
        # The same counters h2.send_data would debit, so h2's window view stays exact.
        self._h2.outbound_flow_control_window -= take
        stream.outbound_flow_control_window -= take
        return take

    # -- flow control credits -------------------------------------------------------------

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` bytes of ``stream_id``: credit the peer."""
        if size <= 0:
            return
        self._conn_credit += size
        # Batching must never starve the connection: when streams whose readers are
        # stalled hold most of the connection window, whatever the others consumed
        # is credited at once, or they could wait on a credit that never fills up.
        if (self._conn_credit >= _CONNECTION_CREDIT_THRESHOLD
                or self._conn_window < CONNECTION_WINDOW // 2):
            self._flush_h2()
            self._out.append(self._window_update(0, self._conn_credit))
            self._conn_window += self._conn_credit
            self._conn_credit = 0
        if stream_id in self._receiving:
            credit = self._stream_credit[stream_id] + size
            if credit >= _STREAM_CREDIT_THRESHOLD:
                self._flush_h2()
                self._out.append(self._window_update(stream_id, credit))
                self._stream_window[stream_id] += credit
                credit = 0
            self._stream_credit[stream_id] = credit

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, *,
                     lend: bool = False) -> list[Event]:
        """Feed bytes read from the peer; return what happened, in order.

        ``data`` may be a view of a buffer the caller reuses: payload handed out in
        :class:`DataChunk` is copied, except when ``data`` is immutable ``bytes`` made
        entirely of payload, which is handed on as is.  With ``lend`` payload is
        handed out as views of ``data``, uncopied: valid only until the caller reuses
        its buffer, so whoever keeps one must copy it (most are written onward at once).
        """
        self._lend = lend
        events: list[Event] = []
        view = memoryview(data)
        pos = 0
        end = len(data)
        try:
            if self._preface_left:
                take = min(self._preface_left, end)
                events.extend(self._h2.receive_data(data[:take]))
                self._preface_left -= take
                pos = take
            while pos < end:
                if self._data_left or self._pad_left:
                    pos = self._continue_data(data, view, pos, end, events)
                elif self._frame_len >= 0:
                    take = min(self._frame_len - len(self._partial), end - pos)
                    self._partial += view[pos:pos + take]
                    pos += take
                    if len(self._partial) == self._frame_len:
                        self._complete_frame(events)
                else:
                    pos = self._start_frame(view, pos, end, events)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            # h2 raises DenialOfServiceError only for a decoded header list over its bound.
            reason = ("header_list_too_large"
                      if isinstance(exc, h2.exceptions.DenialOfServiceError) else "protocol_error")
            raise Http2ViolationError(f"peer broke HTTP/2: {exc}", reason=reason) from exc
        return events

    def _start_frame(self, view: memoryview, pos: int, end: int, events: list[Event]) -> int:
        """Read a frame header (possibly across reads) and set up the frame's handling."""
        need = 9 - len(self._partial)
        if need > 0:
            take = min(need, end - pos)
            self._partial += view[pos:pos + take]
            pos += take
            if len(self._partial) < 9:
                return pos
        hi, lo, ftype, flags, stream_id = _FRAME_HEADER.unpack(self._partial[:9])
        length = (hi << 8) | lo
        stream_id &= 0x7FFF_FFFF
        if length > MAX_FRAME_SIZE:
            self._fail(h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                       f"frame of {length} bytes exceeds our max frame size {MAX_FRAME_SIZE}",
                       "protocol_error")
        if ftype > _CONTINUATION and not self._expect_continuation:
            # An unknown or extension type is ignored: its payload is skipped as it
            # arrives, like DATA padding (see _continue_data), with nothing delivered.
            self._partial.clear()
            self._data_deliver = False
            self._pad_left = length
            return pos
        if ftype == _SETTINGS and length > 6 * MAX_SETTINGS_ENTRIES:
            self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                       f"SETTINGS frame with {length // 6} settings, over "
                       f"{MAX_SETTINGS_ENTRIES}", "flood")
        if ftype != _DATA or self._expect_continuation or stream_id == 0:
            # h2 checks the length and everything else of non-DATA frames itself.
            self._frame_len = 9 + length
            if ftype in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                # A header block is buffered whole before HPACK sees it: bound it, or
                # endless CONTINUATION frames (CVE-2024-27316 pattern) grow memory.
                if ftype == _CONTINUATION:
                    self._header_block += length
                    self._continuations += 1
                else:
                    self._header_block = length
                    self._continuations = 0
                if self._header_block > MAX_HEADER_LIST_SIZE:
                    self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                               f"header block over {MAX_HEADER_LIST_SIZE} bytes "
                               "(CONTINUATION flood?)", "header_list_too_large")
                if self._continuations > MAX_CONTINUATION_FRAMES:
                    self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                               f"header block in over {MAX_CONTINUATION_FRAMES} CONTINUATION "
                               "frames (CONTINUATION flood, CVE-2024-27316)", "flood")
                self._expect_continuation = not flags & _FLAG_END_HEADERS
            if len(self._partial) == self._frame_len:
                self._complete_frame(events)
            return pos
        if flags & _FLAG_PADDED:
            if length < 1:
                self._fail(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, "padded DATA frame with no body",
                           "protocol_error")
            if len(self._partial) < 10:
                if pos == end:
                    return pos
                self._partial += view[pos:pos + 1]
                pos += 1
            pad = self._partial[9]
            if pad > length - 1:
                self._fail(h2.errors.ErrorCodes.PROTOCOL_ERROR, "DATA padding longer than frame",
                           "protocol_error")
            payload = length - 1 - pad
        else:
            pad = -1
            payload = length
        self._partial.clear()
        if length > self._conn_window:
            self._fail(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
                       "peer sent more DATA than the connection window allows", "protocol_error")
        self._conn_window -= length
        self._data_stream = stream_id
        self._data_flags = flags
        self._data_left = payload
        self._pad_left = max(pad, 0)  # the pad-length byte itself is already read
        deliver = stream_id in self._receiving
        self._data_deliver = deliver
        if deliver:
            window = self._stream_window[stream_id]
            if length > window:
                self._fail(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
                           f"peer sent more DATA than stream {stream_id}'s window allows",
                           "protocol_error")
            self._stream_window[stream_id] = window - length
            # The pad-length byte and padding count against the windows but carry nothing.
            if pad >= 0:
                self.acknowledge(stream_id, pad + 1)
        else:
            # Not ours (closed, reset, or never opened): free the connection window and
            # let h2 answer the frame as it would.
            self.acknowledge(0, length)
            self._feed_h2(_frame_header(0, _DATA, flags & ~_FLAG_PADDED, stream_id), events)
        if payload == 0 and not self._pad_left:
            self._finish_data(events)
        return pos

    def _continue_data(self, data: bytes | bytearray | memoryview, view: memoryview, pos: int,
                       end: int,
                       events: list[Event]) -> int:
        if self._data_left:
            take = min(self._data_left, end - pos)
            if self._data_deliver:
                chunk: bytes | memoryview
                if take == end and isinstance(data, bytes):
                    chunk = data
                elif self._lend:
                    chunk = view[pos:pos + take]
                else:
                    chunk = view[pos:pos + take].tobytes()
                events.append(DataChunk(stream_id=self._data_stream, data=chunk))
            pos += take
            self._data_left -= take
        if not self._data_left:
            take = min(self._pad_left, end - pos)
            pos += take
            self._pad_left -= take
            if not self._pad_left:
                self._finish_data(events)
        return pos

    def _complete_frame(self, events: list[Event]) -> None:
        frame = bytes(self._partial)
        self._partial.clear()
        self._frame_len = -1
        ftype = frame[3]
        if ftype == _WINDOW_UPDATE and not self._expect_continuation:
            self._receive_window_update(frame, events)
        elif ftype == _GOAWAY and not self._expect_continuation:
            self._receive_goaway(frame, events)
        else:
            self._feed_h2(frame, events)

    def _receive_window_update(self, frame: bytes, events: list[Event]) -> None:
        """The common valid WINDOW_UPDATE, applied to h2's own counters directly.

        A bulk sender gets one every few hundred KiB and h2's generic frame path cost
        ~200 us each (profiled).  Anything unusual (bad length, zero increment,
        overflow, a stream h2 does not hold open) still goes to h2, which answers it
        as the RFC says.
        """
        stream_id = int.from_bytes(frame[5:9]) & 0x7FFF_FFFF
        increment = int.from_bytes(frame[9:13]) & 0x7FFF_FFFF if len(frame) == 13 else 0
        if increment:
            if stream_id == 0:
                window = self._h2.outbound_flow_control_window + increment
                if window <= _MAX_WINDOW:
                    self._h2.outbound_flow_control_window = window
                    events.append(h2.events.WindowUpdated(stream_id=0, delta=increment))
                    return
            else:
                stream = self._h2.streams.get(stream_id)
                if stream is not None and not stream.closed:
                    window = stream.outbound_flow_control_window + increment
                    if window <= _MAX_WINDOW:
                        stream.outbound_flow_control_window = window
                        events.append(h2.events.WindowUpdated(stream_id=stream_id,
                                                              delta=increment))
                        return
        self._feed_h2(frame, events)

    def _receive_goaway(self, frame: bytes, events: list[Event]) -> None:
        """GOAWAY is ours too: h2 would refuse all further frames after one, but the
        streams the peer already accepted must run to completion."""
        if len(frame) < 17 or frame[5:9] != b"\0\0\0\0":
            self._fail(h2.errors.ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY frame",
                       "protocol_error")
        last, code = struct.unpack(">LL", frame[9:17])
        event = h2.events.ConnectionTerminated()
        event.last_stream_id = last & 0x7FFF_FFFF
        event.error_code = _error_code(code)
        event.additional_data = frame[17:]
        events.append(event)

    def _finish_data(self, events: list[Event]) -> None:
        if self._data_deliver and self._data_flags & _FLAG_END_STREAM:
            self._feed_h2(_frame_header(0, _DATA, _FLAG_END_STREAM, self._data_stream), events)

    def _feed_h2(self, frame: bytes, events: list[Event]) -> None:
        for event in self._h2.receive_data(frame):
            if isinstance(event, h2.events.DataReceived):
                # Only our empty END_STREAM replays reach h2; their events carry nothing.
                continue
            if isinstance(event, h2.events.RequestReceived | h2.events.ResponseReceived):
                # Registered before the caller sees the event: DATA may follow in the
                # same read.
                self._start_receiving(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._stop_receiving(event.stream_id)
            elif isinstance(event, h2.events.PingReceived | h2.events.RemoteSettingsChanged):
                self._owed_acks += 1
                if self._owed_acks > MAX_OWED_ACKS:
                    self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                               f"peer sent over {MAX_OWED_ACKS} PING/SETTINGS frames without "
                               "reading our ACKs (control-frame flood, CVE-2019-9512/9515)",
                               "flood")
            elif isinstance(event, h2.events.StreamReset):
                self._stop_receiving(event.stream_id)
                # Only a client can flood with resets (it opens the streams it cancels, and
                # each costs the server the work of starting one); a server resetting our
                # finished streams is no attack, and a busy pool sees hundreds a second.
                if event.remote_reset and not self.client_side:
                    self._count_reset()
            events.append(event)

    def _count_reset(self) -> None:
        now = self._clock()
        refill = (now - self._reset_stamp) * RESET_RATE_PER_SECOND
        self._reset_tokens = min(float(RESET_BURST), self._reset_tokens + refill)
        self._reset_stamp = now
        self._reset_tokens -= 1
        if self._reset_tokens < 0:
            self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                       f"peer reset more than {RESET_BURST} streams in a burst "
                       f"(rapid-reset flood, CVE-2023-44487)", "rapid_reset")

    def _fail(self, code: int, message: str, reason: str) -> None:
        self.close(code)
        raise Http2ViolationError(message, reason=reason)

    # -- introspection --------------------------------------------------------------------

    @property
    def peer_max_concurrent_streams(self) -> int:
        value: int = self._h2.remote_settings.max_concurrent_streams
        return value
