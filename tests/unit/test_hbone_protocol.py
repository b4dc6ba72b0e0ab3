"""The sans-I/O HTTP/2 core, driven over a fake link: no sockets, no trio."""

from __future__ import annotations

import random
import struct

import h2.connection
import h2.errors
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import Http2ViolationError, ProtocolError
from common.hbone.protocol import (
    MAX_CONTINUATION_FRAMES,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_SETTINGS_ENTRIES,
    RESET_BURST,
    STREAM_WINDOW,
    DataChunk,
    Event,
    H2Protocol,
)
from common.hbone.request import build_request


def _pump(src: H2Protocol, dst: H2Protocol, *, split: int | None = None) -> list[Event]:
    wire = b"".join(bytes(p) for p in src.data_to_send())
    events: list[Event] = []
    if split is None:
        if wire:
            events.extend(dst.receive_data(wire))
        return events
    for start in range(0, len(wire), split):
        events.extend(dst.receive_data(wire[start:start + split]))
    return events


def _handshake() -> tuple[H2Protocol, H2Protocol]:
    client, server = H2Protocol(client_side=True), H2Protocol(client_side=False)
    _pump(client, server)
    _pump(server, client)
    _pump(client, server)
    return client, server


def _open(client: H2Protocol, server: H2Protocol) -> int:
    stream_id = client.send_request(build_request("10.0.0.1:80"))
    events = _pump(client, server)
    assert any(isinstance(e, h2.events.RequestReceived) for e in events)
    server.send_response(stream_id, 200, end_stream=False)
    events = _pump(server, client)
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
    return stream_id


def _data(events: list[Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events
                    if isinstance(e, DataChunk) and e.stream_id == stream_id)


def test_settings_offer_windows_and_frame_size() -> None:
    client, _server = _handshake()
    # What each side learnt from the other's SETTINGS.
    assert client._h2.remote_settings.initial_window_size == STREAM_WINDOW
    assert client._h2.remote_settings.max_frame_size == MAX_FRAME_SIZE
    assert client.peer_max_concurrent_streams == 100
    # The connection window was widened to 16 MiB with a WINDOW_UPDATE on stream 0.
    assert client._h2.outbound_flow_control_window == 16 * 1024 * 1024


def test_data_round_trip_survives_any_read_split() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    payload = random.Random(1).randbytes(3 * MAX_FRAME_SIZE + 12345)
    sent = client.send_data(stream_id, memoryview(payload))
    assert sent == min(len(payload), STREAM_WINDOW)
    for split in (1, 7, 9, 10, 4096, 262_144):
        # Byte-by-byte feeding is slow in Python: a smaller payload still crosses
        # several frame boundaries at every offset.
        body = payload[:20_000] if split < 100 else payload[:300_000]
        other_client, other_server = _handshake()
        other_client._h2.max_outbound_frame_size = 16_384
        sid = _open(other_client, other_server)
        other_client.send_data(sid, memoryview(body))
        other_client.end_stream(sid)
        events = _pump(other_client, other_server, split=split)
        assert _data(events, sid) == body
        assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_data_frames_respect_peer_max_frame_size() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    # Before it sees a bigger SETTINGS, a peer gets 16 KiB frames (RFC 9113 default);
    # simulate such a peer by lowering what h2 believes.
    client._h2.max_outbound_frame_size = 16_384
    client.send_data(stream_id, memoryview(b"a" * 100_000))
    wire = b"".join(bytes(p) for p in client.data_to_send())
    lengths = []
    pos = 0
    while pos < len(wire):
        hi, lo = struct.unpack(">HB", wire[pos:pos + 3])
        length = (hi << 8) | lo
        lengths.append(length)
        pos += 9 + length
    assert max(lengths) == 16_384
    assert sum(lengths) == 100_000


def test_window_stops_sender_until_consumer_acknowledges() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    big = memoryview(bytes(STREAM_WINDOW + 1000))
    assert client.send_data(stream_id, big) == STREAM_WINDOW
    assert client.send_window(stream_id) == 0
    events = _pump(client, server)
    received = len(_data(events, stream_id))
    assert received == STREAM_WINDOW
    # Nothing acknowledged: still no window, whatever else happens on the link.
    _pump(server, client)
    assert client.send_window(stream_id) == 0
    server.acknowledge(stream_id, received)
    _pump(server, client)
    assert client.send_window(stream_id) == STREAM_WINDOW


def test_peer_exceeding_stream_window_is_a_flow_control_error() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    client.send_data(stream_id, memoryview(bytes(STREAM_WINDOW)))
    _pump(client, server)
    # A misbehaving peer ignores the window: forge one more DATA frame.
    forged = struct.pack(">HBBBL", 0, 10, 0, 0, stream_id) + b"x" * 10
    with pytest.raises(ProtocolError, match="window"):
        server.receive_data(forged)
    goaway = b"".join(bytes(p) for p in server.data_to_send())
    events = client.receive_data(goaway)
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


def test_padded_data_frame_delivers_payload_and_credits_padding() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    body = b"hello"
    padded = struct.pack(">HBBBL", 0, 1 + len(body) + 4, 0, 0x8 | 0x1, stream_id)
    padded += bytes([4]) + body + b"\0" * 4
    events = server.receive_data(padded)
    assert _data(events, stream_id) == body
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_half_close_each_way_independently() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    client.send_data(stream_id, memoryview(b"request"))
    client.end_stream(stream_id)
    events = _pump(client, server)
    assert _data(events, stream_id) == b"request"
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    # The server still sends after the client's END_STREAM.
    server.send_data(stream_id, memoryview(b"reply"))
    server.end_stream(stream_id)
    events = _pump(server, client)
    assert _data(events, stream_id) == b"reply"
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_data_for_a_reset_stream_is_dropped_and_frees_the_connection_window() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    server.reset_stream(stream_id)
    client.send_data(stream_id, memoryview(bytes(1000)))
    events = _pump(client, server)
    assert _data(events, stream_id) == b""
    assert server._conn_window + server._conn_credit == 16 * 1024 * 1024


def test_rapid_reset_flood_gets_enhance_your_calm() -> None:
    client = H2Protocol(client_side=True)
    server = H2Protocol(client_side=False, clock=lambda: 0.0)  # all in one instant
    _pump(client, server)
    _pump(server, client)
    with pytest.raises(Http2ViolationError, match="rapid-reset") as caught:
        for _ in range(RESET_BURST + 10):
            stream_id = client.send_request(build_request("10.0.0.1:80"))
            client.reset_stream(stream_id)
            _pump(client, server)
    assert caught.value.reason == "rapid_reset"
    events = _pump(server, client)
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_resets_at_a_modest_rate_are_fine() -> None:
    now = [0.0]
    client = H2Protocol(client_side=True)
    server = H2Protocol(client_side=False, clock=lambda: now[0])
    _pump(client, server)
    _pump(server, client)
    for _ in range(RESET_BURST * 3):
        now[0] += 0.02  # 50 resets per second, half the refill rate
        stream_id = client.send_request(build_request("10.0.0.1:80"))
        client.reset_stream(stream_id)
        _pump(client, server)
    assert not server.closed


def test_a_server_resetting_many_streams_is_no_flood_for_the_client() -> None:
    # A waypoint resets each tunnel it finished; a pool carrying hundreds of short
    # requests a second must not take that for CVE-2023-44487 and drop the connection.
    client = H2Protocol(client_side=True, clock=lambda: 0.0)  # all in one instant
    server = H2Protocol(client_side=False)
    _pump(client, server)
    _pump(server, client)
    for _ in range(RESET_BURST * 2):
        stream_id = client.send_request(build_request("10.0.0.1:80"))
        _pump(client, server)
        server.reset_stream(stream_id)
        _pump(server, client)
    assert not client.closed


def test_graceful_goaway_lets_open_streams_finish() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    server.close()
    events = _pump(server, client)
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated[0].last_stream_id == stream_id
    assert terminated[0].error_code == h2.errors.ErrorCodes.NO_ERROR
    # Both sides keep using the stream after the GOAWAY.
    client.send_data(stream_id, memoryview(b"more"))
    client.end_stream(stream_id)
    assert _data(_pump(client, server), stream_id) == b"more"
    server.send_data(stream_id, memoryview(b"done"))
    server.end_stream(stream_id)
    assert _data(_pump(server, client), stream_id) == b"done"


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    _client, server = _handshake()
    header = struct.pack(">HBBBL", (MAX_FRAME_SIZE + 1) >> 8, (MAX_FRAME_SIZE + 1) & 0xFF,
                         0x1, 0x4, 1)
    with pytest.raises(ProtocolError, match="max frame size"):
        server.receive_data(header)


def test_interoperates_with_plain_h2_peer() -> None:
    """Our fast DATA path must look like ordinary HTTP/2 to a stock h2 peer."""
    import h2.config

    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                header_encoding=None))
    peer.initiate_connection()
    client = H2Protocol(client_side=True)
    peer_events = peer.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
    client.receive_data(peer.data_to_send())
    peer.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
    stream_id = client.send_request(build_request("10.0.0.1:80"))
    client.send_data(stream_id, memoryview(b"z" * 50_000))  # within the 64 KiB default
    client.end_stream(stream_id)
    peer_events = peer.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
    body = b"".join(e.data for e in peer_events if isinstance(e, h2.events.DataReceived))
    assert body == b"z" * 50_000
    assert any(isinstance(e, h2.events.StreamEnded) for e in peer_events)


def test_window_update_fast_path_matches_h2_semantics() -> None:
    client, server = _handshake()
    stream_id = _open(client, server)
    before = client.send_window(stream_id)
    conn_before = client._h2.outbound_flow_control_window
    update = struct.pack(">HBBBL", 0, 4, 0x8, 0, 0) + struct.pack(">L", 1000)
    update += struct.pack(">HBBBL", 0, 4, 0x8, 0, stream_id) + struct.pack(">L", 500)
    events = client.receive_data(update)
    assert [(e.stream_id, e.delta) for e in events
            if isinstance(e, h2.events.WindowUpdated)] == [(0, 1000), (stream_id, 500)]
    assert client._h2.outbound_flow_control_window == conn_before + 1000
    assert client.send_window(stream_id) == min(before + 500, conn_before + 1000)
    # A closed stream's late WINDOW_UPDATE is ignored, as RFC 9113 allows.
    client.reset_stream(stream_id)
    assert client.receive_data(update[13:]) == []
    # A zero increment on the connection is a connection error (h2 decides).
    with pytest.raises(ProtocolError):
        client.receive_data(struct.pack(">HBBBL", 0, 4, 0x8, 0, 0) + struct.pack(">L", 0))


def test_stalled_streams_cannot_starve_the_connection_window() -> None:
    """Streams whose readers stall hold 13.5 of 16 MiB; another keeps flowing."""
    client, server = _handshake()
    for size in (STREAM_WINDOW, STREAM_WINDOW, STREAM_WINDOW, 1536 * 1024):
        stalled = _open(client, server)
        client.send_data(stalled, memoryview(bytes(size)))
        _pump(client, server)
    busy = _open(client, server)
    moved = 0
    for _ in range(40):  # 40 rounds of whatever the window allows: far more than 4 MiB
        sent = client.send_data(busy, memoryview(bytes(256 * 1024)))
        assert sent > 0, f"connection window starved after {moved} bytes"
        received = len(_data(_pump(client, server), busy))
        server.acknowledge(busy, received)
        _pump(server, client)
        moved += received
    assert moved > 8 * 1024 * 1024


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=6),
       pads=st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=12))
def test_any_frames_any_cuts_deliver_the_same_bytes(sizes: list[int], pads: list[int],
                                                    cuts: list[int]) -> None:
    """Stock h2 frames (padded or not, small frames) cut anywhere: same payload, in order."""
    import h2.config

    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    peer.initiate_connection()
    server = H2Protocol(client_side=False)
    server.receive_data(peer.data_to_send())
    peer.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
    stream_id = peer.get_next_available_stream_id()
    peer.send_headers(stream_id, build_request("10.0.0.1:80"))
    rng = random.Random(sum(sizes) + len(cuts))
    expected = b""
    for index, size in enumerate(sizes):
        body = rng.randbytes(min(size, 16_000))
        expected += body
        peer.send_data(stream_id, body, pad_length=pads[index % len(pads)] if index % 2 else None)
    peer.end_stream(stream_id)
    wire = peer.data_to_send()
    events: list[Event] = []
    position = 0
    for cut in sorted(set(cuts)):
        if position < cut < len(wire):
            events.extend(server.receive_data(wire[position:cut]))
            position = cut
    events.extend(server.receive_data(wire[position:]))
    assert _data(events, stream_id) == expected
    assert sum(isinstance(e, h2.events.StreamEnded) for e in events) == 1


def test_continuation_flood_is_refused() -> None:
    _client, server = _handshake()
    headers = struct.pack(">HBBBL", 0, 1, 0x1, 0, 1) + b"\x82"  # HEADERS, no END_HEADERS
    continuation = struct.pack(">HBBBL", 16_000 >> 8, 16_000 & 0xFF, 0x9, 0, 1) + bytes(16_000)
    with pytest.raises(Http2ViolationError, match="CONTINUATION") as caught:
        server.receive_data(headers + continuation * 8)
    assert caught.value.reason == "header_list_too_large"


# -- frame size and header list bounds ------------------------------------------------------


def _stock_client(server: H2Protocol) -> h2.connection.H2Connection:
    """A stock h2 client that has seen our SETTINGS (so it may use 1 MiB frames)."""
    import h2.config

    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    peer.initiate_connection()
    server.receive_data(peer.data_to_send())
    peer.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
    server.receive_data(peer.data_to_send())  # its SETTINGS ACK
    server.data_to_send()
    assert peer.max_outbound_frame_size == MAX_FRAME_SIZE
    return peer


def _frames(wire: bytes) -> list[tuple[int, int]]:
    """(type, length) of each frame on ``wire``."""
    frames = []
    pos = 0
    while pos < len(wire):
        hi, lo, ftype = struct.unpack(">HBB", wire[pos:pos + 4])
        length = (hi << 8) | lo
        frames.append((ftype, length))
        pos += 9 + length
    return frames


def _large_request(size: int) -> list[tuple[bytes, bytes]]:
    """A CONNECT whose header block is about ``size`` bytes (random values do not compress)."""
    rng = random.Random(size)
    junk = [(f"x-pad-{i}".encode(), rng.randbytes(700).hex().encode()[:1000])
            for i in range(size // 1010)]
    return [*build_request("10.0.0.1:80"), *junk]


def test_headers_frame_larger_than_16_kib_is_accepted_up_to_the_advertised_size() -> None:
    """RFC 9113 4.2: we advertise 1 MiB frames, so a HEADERS frame over the 16 KiB default
    (here one frame over 32 KiB from a stock h2 client) must be taken, not a FRAME_SIZE_ERROR."""
    server = H2Protocol(client_side=False)
    peer = _stock_client(server)
    stream_id = peer.get_next_available_stream_id()
    request = _large_request(48 * 1024)
    peer.send_headers(stream_id, request)
    wire = peer.data_to_send()
    frames = _frames(wire)
    assert len(frames) == 1 and frames[0][0] == 0x1 and frames[0][1] > 32 * 1024, frames
    events = server.receive_data(wire)
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert len(received) == 1 and received[0].headers == request
    assert not server.closed and server.data_to_send() == []


def test_headers_and_continuation_frames_over_16_kib_each_are_accepted() -> None:
    """A 60 KiB block as a 30 KiB HEADERS frame and a 30 KiB CONTINUATION, cut anywhere."""
    server = H2Protocol(client_side=False)
    peer = _stock_client(server)
    peer.max_outbound_frame_size = 30 * 1024
    stream_id = peer.get_next_available_stream_id()
    request = _large_request(58 * 1024)
    peer.send_headers(stream_id, request)
    wire = peer.data_to_send()
    assert [t for t, _ in _frames(wire)] == [0x1, 0x9], _frames(wire)
    events: list[Event] = []
    for start in range(0, len(wire), 7000):
        events.extend(server.receive_data(wire[start:start + 7000]))
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert len(received) == 1 and received[0].headers == request


def test_unknown_frame_of_the_advertised_size_is_ignored_and_a_larger_one_refused() -> None:
    """Any frame type may be MAX_FRAME_SIZE long (RFC 9113 4.2); unknown types are ignored
    (5.5), skipped as they arrive rather than buffered.  One byte more is a
    FRAME_SIZE_ERROR, refused before anything is buffered."""
    client, server = _handshake()
    stream_id = _open(client, server)
    unknown = struct.pack(">HBBBL", MAX_FRAME_SIZE >> 8, MAX_FRAME_SIZE & 0xFF, 0xFA, 0, 0)
    wire = unknown + bytes(MAX_FRAME_SIZE)
    for start in range(0, len(wire), 256 * 1024):
        assert server.receive_data(wire[start:start + 256 * 1024]) == []
        assert len(server._partial) <= 9
    # The connection carries on: the next frame is read where the unknown one ended.
    client.send_data(stream_id, memoryview(b"after"))
    assert _data(_pump(client, server), stream_id) == b"after"
    assert not server.closed
    too_long = MAX_FRAME_SIZE + 1
    with pytest.raises(Http2ViolationError, match="max frame size") as caught:
        server.receive_data(struct.pack(">HBBBL", too_long >> 8, too_long & 0xFF, 0xFA, 0, 0))
    assert caught.value.reason == "protocol_error"
    assert len(server._partial) <= 9


def test_header_block_over_the_limit_in_one_frame_is_refused_before_it_is_buffered() -> None:
    """Larger frames must not open a way around the header bound: a 100 KiB HEADERS
    frame is refused on its frame header, none of its payload held."""
    server = H2Protocol(client_side=False)
    peer = _stock_client(server)
    peer.send_headers(peer.get_next_available_stream_id(), _large_request(100 * 1024))
    wire = peer.data_to_send()
    assert _frames(wire)[0][1] > MAX_HEADER_LIST_SIZE
    with pytest.raises(Http2ViolationError, match="header block") as caught:
        server.receive_data(wire[:4096])
    assert caught.value.reason == "header_list_too_large"
    assert len(server._partial) <= 9
    events = peer.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_header_list_that_decodes_over_the_limit_is_refused() -> None:
    """HPACK bomb: a small block whose indexed entries expand past 64 KiB decoded."""
    server = H2Protocol(client_side=False)
    peer = _stock_client(server)
    big = (b"x-big", b"v" * 3000)
    request = [*build_request("10.0.0.1:80"), *[big] * 25]  # 25 x 3 KiB, one table entry
    peer.send_headers(peer.get_next_available_stream_id(), request)
    wire = peer.data_to_send()
    assert len(wire) < 8 * 1024  # compressed: well under the block bound
    with pytest.raises(Http2ViolationError) as caught:
        server.receive_data(wire)
    assert caught.value.reason == "header_list_too_large"
    events = peer.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_settings_frame_with_many_entries_is_refused_as_a_flood() -> None:
    """A legal but absurd SETTINGS frame (h2 applies 1 MiB of it in a quarter second,
    the loop blocked) is refused on its header, as nghttp2 does; 32 entries are fine."""
    _client, server = _handshake()
    entry = struct.pack(">HL", 0x1, 4096)  # HEADER_TABLE_SIZE, repeated
    ok = MAX_SETTINGS_ENTRIES * entry
    server.receive_data(struct.pack(">HBBBL", 0, len(ok), 0x4, 0, 0) + ok)
    assert not server.closed
    many = (MAX_FRAME_SIZE // 6) * entry
    with pytest.raises(Http2ViolationError, match="SETTINGS") as caught:
        server.receive_data(struct.pack(">HBBBL", len(many) >> 8, len(many) & 0xFF, 0x4, 0, 0)
                            + many[:1000])
    assert caught.value.reason == "flood"


def test_continuation_flood_of_empty_frames_is_refused() -> None:
    """Empty CONTINUATION frames cost no header bytes: their number is bounded too."""
    _client, server = _handshake()
    headers = struct.pack(">HBBBL", 0, 1, 0x1, 0, 1) + b"\x82"  # HEADERS, no END_HEADERS
    empty = struct.pack(">HBBBL", 0, 0, 0x9, 0, 1)
    server.receive_data(headers + empty * MAX_CONTINUATION_FRAMES)
    with pytest.raises(Http2ViolationError, match="CONTINUATION flood") as caught:
        server.receive_data(empty)
    assert caught.value.reason == "flood"
