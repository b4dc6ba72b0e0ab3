"""DNS wire format: round trips, compression (and its abuse), truncation, limits."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DnsFormatError
from ztunnel.dns.wire import (
    CLASS_IN,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    RCODE_FORMERR,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_SOA,
    Message,
    Question,
    Record,
    address_record,
    build,
    formerr_for,
    name_from_text,
    name_text,
    opt_record,
    parse,
    soa_minimum,
    soa_record,
)

from .dns_helpers import query_bytes

NAME = name_from_text("Echo.Default.svc.cluster.local")


def _encode(name: str) -> bytes:
    return b"".join(bytes((len(x),)) + x for x in name_from_text(name)) + b"\x00"


def _response() -> Message:
    target = name_from_text("web.example.com")
    cname = Record(NAME, TYPE_CNAME, CLASS_IN, 60, _encode("web.example.com"))
    mx = Record(target, 15, CLASS_IN, 60, b"\x00\x0a" + _encode("mail.example.com"))
    srv = Record(target, 33, CLASS_IN, 60, b"\x00\x01\x00\x02\x00\x50" + _encode("a.example.com"))
    txt = Record(target, 16, CLASS_IN, 60, b"\x05hello")
    return Message(
        7, FLAG_QR | FLAG_RD, (Question(NAME, TYPE_A),),
        answers=(cname, address_record(target, "10.1.2.3", 30),
                 address_record(target, "fd00::1", 30), mx, srv, txt),
        authorities=(soa_record(name_from_text("cluster.local"), 30, 5),),
        additionals=(opt_record(1232),))


def test_round_trip_keeps_every_section_and_case() -> None:
    msg = _response()
    assert parse(build(msg)) == msg
    assert parse(build(msg)).questions[0].name[0] == b"Echo"  # 0x20 case survives


def test_owner_names_are_compressed() -> None:
    msg = _response()
    wire = build(msg)
    assert wire.count(b"\x04Echo") == 1
    assert wire.count(b"\x07example\x03com") >= 1
    naive = sum(len(_encode(name_text(r.name))) for r in msg.answers)
    assert len(wire) < 12 + naive + sum(10 + len(r.rdata) for r in msg.answers) + 100


def test_pointers_inside_rdata_are_expanded_so_they_survive_a_rebuild() -> None:
    # The CNAME's target is a pointer to the question name (offset 12).
    header = struct.pack("!HHHHHH", 1, FLAG_QR, 1, 2, 0, 0)
    question = _encode("a.example.com") + struct.pack("!HH", TYPE_A, CLASS_IN)
    cname = (_encode("x.org") + struct.pack("!HHIH", TYPE_CNAME, CLASS_IN, 5, 2)
             + b"\xc0\x0c")
    a_rec = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, 5, 4) + bytes((1, 2, 3, 4))
    msg = parse(header + question + cname + a_rec)
    assert msg.answers[0].rdata == _encode("a.example.com")
    assert msg.answers[1].name == name_from_text("a.example.com")
    # Rebuilt with another question first: the CNAME target must still read right.
    moved = Message(1, FLAG_QR, (Question(name_from_text("zzz.test"), TYPE_A),),
                    msg.answers)
    assert parse(build(moved)).answers == msg.answers


@pytest.mark.parametrize("pointer", [b"\xc0\x0c", b"\xc0\x10", b"\xc0\x20"])
def test_compression_loops_and_forward_pointers_are_errors(pointer: bytes) -> None:
    header = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    # The question name at 12 is one label, then a pointer to itself / forward.
    data = header + b"\x01a" + pointer + struct.pack("!HH", TYPE_A, CLASS_IN) + b"\x00" * 20
    with pytest.raises(DnsFormatError):
        parse(data)


def test_two_pointers_bouncing_between_each_other_are_an_error() -> None:
    header = struct.pack("!HHHHHH", 1, FLAG_QR, 1, 1, 0, 0)
    question = b"\xc0\x12" + struct.pack("!HH", TYPE_A, CLASS_IN)   # 12 -> 18
    answer = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, 1, 4) + b"\x01\x02\x03\x04"
    with pytest.raises(DnsFormatError):
        parse(header + question + answer)


def test_every_truncation_of_a_message_is_an_error() -> None:
    wire = build(_response())
    for cut in range(len(wire)):
        with pytest.raises(DnsFormatError):
            parse(wire[:cut])


def test_names_over_255_bytes_are_refused() -> None:
    labels = [b"a" * 63] * 4  # 4 * 64 + 1 = 257 bytes
    header = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    data = header + b"".join(bytes((63,)) + x for x in labels) + b"\x00" + b"\x00\x01\x00\x01"
    with pytest.raises(DnsFormatError):
        parse(data)
    with pytest.raises(ValueError):
        name_from_text(".".join(["a" * 63] * 4))
    with pytest.raises(ValueError):
        name_from_text("a" * 64 + ".com")


def test_extended_label_types_are_refused() -> None:
    header = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    with pytest.raises(DnsFormatError):
        parse(header + b"\x41abc\x00\x00\x01\x00\x01")


def test_rdata_length_must_match_the_names_inside() -> None:
    header = struct.pack("!HHHHHH", 1, FLAG_QR, 0, 1, 0, 0)
    rr = _encode("a.org") + struct.pack("!HHIH", TYPE_CNAME, CLASS_IN, 1, 9) + _encode("b.org") \
        + b"\x00\x00"  # two stray bytes inside the declared RDATA
    with pytest.raises(DnsFormatError):
        parse(header + rr)


def test_build_over_the_limit_sets_tc_and_keeps_only_the_question_and_opt() -> None:
    msg = _response()
    small = parse(build(msg, limit=100))
    assert small.flags & FLAG_TC
    assert small.questions == msg.questions
    assert small.answers == () and small.authorities == ()
    assert small.edns_payload() == 1232


def test_soa_minimum_reads_the_last_field() -> None:
    soa = soa_record(name_from_text("cluster.local"), 30, 7)
    assert soa.rtype == TYPE_SOA
    assert soa_minimum(parse(build(Message(1, FLAG_QR, authorities=(soa,)))).authorities[0]) == 7


def test_formerr_keeps_the_id_and_never_answers_a_response() -> None:
    reply = formerr_for(b"\x12\x34\x01\x00garbage")
    assert reply is not None
    msg = parse(reply)
    assert msg.id == 0x1234 and msg.rcode == RCODE_FORMERR and msg.is_response
    assert formerr_for(b"\x12") is None
    assert formerr_for(b"\x12\x34\x81\x00") is None


def test_query_helper_round_trips() -> None:
    msg = parse(query_bytes("echo", TYPE_AAAA, edns=4096))
    assert msg.question == Question(name_from_text("echo"), TYPE_AAAA)
    assert msg.edns_payload() == 4096 and not msg.is_response


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_fail_with_a_format_error(data: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        parse(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=12, max_value=200), st.binary(min_size=1, max_size=4))
def test_corrupted_valid_messages_never_crash(position: int, garbage: bytes) -> None:
    wire = bytearray(build(_response()))
    position %= len(wire)
    wire[position:position + len(garbage)] = garbage
    try:
        msg = parse(bytes(wire))
    except DnsFormatError:
        return
    build(msg)  # whatever parsed can be rebuilt
