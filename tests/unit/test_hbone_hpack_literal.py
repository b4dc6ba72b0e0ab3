"""HBONE's HPACK encoder without the dynamic table (common.hbone.hpack_literal)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.hbone.hpack_literal import _CACHE_LIMIT, LiteralEncoder, encode_field
from common.hbone.protocol import H2Protocol

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.244.1.7:8080"),
           (b"forwarded", b'for="10.244.0.5"'),
           (b"baggage", b"k8s.namespace.name=demo,k8s.deployment.name=sleep"),
           (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]


def test_blocks_decode_to_the_same_fields_and_leave_the_peer_table_empty() -> None:
    encoder, decoder = LiteralEncoder(), hpack.Decoder()
    for _ in range(3):
        assert decoder.decode(encoder.encode(CONNECT), raw=True) == CONNECT
    assert len(decoder.header_table.dynamic_entries) == 0
    assert len(encoder.header_table.dynamic_entries) == 0


def test_fields_are_raw_literals_with_the_static_name_index() -> None:
    # :method is static entry 2 (GET): literal without indexing, 4-bit index 2, raw value.
    assert encode_field(b":method", b"CONNECT") == b"\x02\x07CONNECT"
    # A name outside the static table: 0x00, then the name, then the value.
    assert encode_field(b"x-b", b"v") == b"\x00\x03x-b\x01v"
    assert encode_field(b"x-b", b"v", sensitive=True) == b"\x10\x03x-b\x01v"


def test_sensitive_fields_stay_never_indexed_for_the_peer() -> None:
    block = LiteralEncoder().encode([(b":method", b"GET"),
                                     hpack.NeverIndexedHeaderTuple(b"authorization", b"s3")])
    decoded = hpack.Decoder().decode(block, raw=True)
    assert decoded[1] == (b"authorization", b"s3")
    assert isinstance(decoded[1], hpack.NeverIndexedHeaderTuple)


def test_a_smaller_table_the_peer_asks_for_is_signalled_first() -> None:
    encoder, decoder = LiteralEncoder(), hpack.Decoder()
    encoder.header_table_size = 0
    block = encoder.encode(CONNECT[:2])
    assert block[0] & 0xE0 == 0x20  # dynamic table size update (RFC 7541 6.3)
    assert decoder.decode(block, raw=True) == CONNECT[:2]
    assert decoder.header_table.maxsize == 0
    assert encoder.encode(CONNECT[:2])[0] & 0xE0 != 0x20  # signalled once


def test_the_cache_stays_bounded_under_unique_values() -> None:
    encoder = LiteralEncoder()
    for index in range(3 * _CACHE_LIMIT):
        encoder.encode([(b"traceparent", f"00-{index:032x}-0000000000000001-01".encode())])
    assert len(encoder._cache) <= _CACHE_LIMIT


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40).map(bytes.lower),
                          st.binary(max_size=300)), max_size=12))
def test_any_fields_round_trip(fields: list[tuple[bytes, bytes]]) -> None:
    assert hpack.Decoder().decode(LiteralEncoder().encode(fields), raw=True) == fields


@pytest.mark.parametrize("client_side", [True, False])
def test_the_protocol_uses_it(client_side: bool) -> None:
    assert isinstance(H2Protocol(client_side=client_side)._h2.encoder, LiteralEncoder)


def test_a_stock_h2_peer_reads_our_connect_request() -> None:
    client = H2Protocol(client_side=True)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    stream_id = client.send_request(CONNECT)
    wire = b"".join(bytes(piece) for piece in client.data_to_send())
    events = server.receive_data(wire)
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert received[0].stream_id == stream_id
    assert [(bytes(n), bytes(v)) for n, v in received[0].headers] == CONNECT
