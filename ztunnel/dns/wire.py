"""DNS messages (RFC 1035), sans I/O: :func:`parse` bytes into a :class:`Message`, :func:`build`
bytes from one.

Theory of operation.  A name is a tuple of labels as bytes, case kept as received (a
client that randomises case, the "0x20" trick, gets its question back unchanged);
:func:`name_text` gives the lower-case dotted form used for lookups.

Compression pointers are followed only backwards: each pointer must point before the
start of the stretch of labels that contains it, so a loop, or a pointer into the
future, is a :class:`~common.errors.DnsFormatError` rather than a hang.  The names inside
the RDATA of the types that carry them (CNAME, NS, PTR, DNAME, MX, SOA, SRV) are expanded
while parsing, because the pointers in them are only valid at their original offsets; the
builder writes RDATA uncompressed and compresses owner names only.  Everything else is
kept as opaque bytes, so unknown record types pass through a proxy untouched.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, replace

from common.errors import DnsFormatError

__all__ = [
    "CLASS_IN", "FLAG_AA", "FLAG_QR", "FLAG_RA", "FLAG_RD", "FLAG_TC", "MAX_MESSAGE",
    "OPCODE_QUERY", "RCODE_FORMERR", "RCODE_NOERROR", "RCODE_NOTIMP", "RCODE_NXDOMAIN",
    "RCODE_REFUSED", "RCODE_SERVFAIL", "TYPE_A", "TYPE_AAAA", "TYPE_CNAME", "TYPE_OPT",
    "TYPE_SOA", "Message", "Name", "Question", "Record", "address_record", "build",
    "formerr_for", "name_from_text", "name_text", "opt_record", "parse", "soa_minimum",
    "soa_record",
]

Name = tuple[bytes, ...]

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_DNAME = 39
TYPE_OPT = 41
CLASS_IN = 1

OPCODE_QUERY = 0
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080

MAX_MESSAGE = 65535       # the TCP length prefix is two bytes
MAX_NAME = 255            # RFC 1035 2.3.4, in wire form
MAX_LABEL = 63

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_Q_FIXED = struct.Struct("!HH")

# RDATA layout of the types that embed names: (fixed bytes before the names, number of
# names, fixed bytes after them).  Only these may carry compression (RFC 3597 section 4).
_NAME_RDATA: dict[int, tuple[int, int, int]] = {
    TYPE_NS: (0, 1, 0), TYPE_CNAME: (0, 1, 0), TYPE_PTR: (0, 1, 0), TYPE_DNAME: (0, 1, 0),
    TYPE_MX: (2, 1, 0), TYPE_SOA: (0, 2, 20), TYPE_SRV: (6, 1, 0),
}


@dataclass(frozen=True, slots=True)
class Question:
    name: Name
    qtype: int
    qclass: int = CLASS_IN

    @property
    def key(self) -> tuple[str, int, int]:
        """What a cache keys on: the name without case, type and class."""
        return (name_text(self.name), self.qtype, self.qclass)


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record; ``rdata`` has every embedded name expanded (no pointers)."""

    name: Name
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authorities: tuple[Record, ...] = ()
    additionals: tuple[Record, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def question(self) -> Question | None:
        return self.questions[0] if len(self.questions) == 1 else None

    def edns_payload(self) -> int | None:
        """The UDP payload size the sender's OPT record announces, None without EDNS."""
        for record in self.additionals:
            if record.rtype == TYPE_OPT:
                return record.rclass
        return None

    def without_opt(self) -> Message:
        return replace(self, additionals=tuple(r for r in self.additionals
                                               if r.rtype != TYPE_OPT))


# -- names --------------------------------------------------------------------------------


def name_text(name: Name) -> str:
    """Lower-case dotted form without the trailing dot (the root is ``""``)."""
    return b".".join(name).decode("latin-1").lower()


def name_from_text(text: str) -> Name:
    """Labels of a dotted name (a trailing dot is ignored); ValueError when it cannot exist."""
    stripped = text.rstrip(".")
    if not stripped:
        return ()
    labels = tuple(label.encode("ascii") for label in stripped.split("."))
    if any(not label or len(label) > MAX_LABEL for label in labels) or \
            sum(len(label) + 1 for label in labels) + 1 > MAX_NAME:
        raise ValueError(f"{text!r} is not a valid DNS name")
    return labels


def _read_name(data: bytes, pos: int) -> tuple[Name, int]:
    """The name at ``pos`` and the offset just after it (after the first pointer, if any)."""
    labels: list[bytes] = []
    wire_length = 1
    end: int | None = None
    segment_start = pos
    while True:
        if pos >= len(data):
            raise DnsFormatError("a name runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError("a compression pointer is cut off")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            if target >= segment_start:
                raise DnsFormatError("a compression pointer points forward or loops")
            pos = segment_start = target
            continue
        if kind:
            raise DnsFormatError(f"label type {kind:#x} is not supported")
        if length == 0:
            return tuple(labels), (end if end is not None else pos + 1)
        wire_length += length + 1
        if wire_length > MAX_NAME:
            raise DnsFormatError("a name is longer than 255 bytes")
        if pos + 1 + length > len(data):
            raise DnsFormatError("a label runs past the end of the message")
        labels.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length


def _encode_name(name: Name) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in name) + b"\x00"


# -- parsing ------------------------------------------------------------------------------


def parse(data: bytes) -> Message:
    """The message in ``data``; DnsFormatError when it is truncated or malformed."""
    if len(data) > MAX_MESSAGE:
        raise DnsFormatError("a DNS message is at most 65535 bytes")
    if len(data) < _HEADER.size:
        raise DnsFormatError("shorter than a DNS header (12 bytes)")
    msg_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    pos = _HEADER.size
    questions = []
    for _ in range(qdcount):
        name, pos = _read_name(data, pos)
        if pos + _Q_FIXED.size > len(data):
            raise DnsFormatError("a question is cut off before its type and class")
        qtype, qclass = _Q_FIXED.unpack_from(data, pos)
        pos += _Q_FIXED.size
        questions.append(Question(name, qtype, qclass))
    sections: list[tuple[Record, ...]] = []
    for count in (ancount, nscount, arcount):
        records = []
        for _ in range(count):
            record, pos = _read_record(data, pos)
            records.append(record)
        sections.append(tuple(records))
    return Message(msg_id, flags, tuple(questions), *sections)


def _read_record(data: bytes, pos: int) -> tuple[Record, int]:
    name, pos = _read_name(data, pos)
    if pos + _RR_FIXED.size > len(data):
        raise DnsFormatError("a record is cut off before its RDATA")
    rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
    start = pos + _RR_FIXED.size
    end = start + rdlength
    if end > len(data):
        raise DnsFormatError("a record's RDATA runs past the end of the message")
    layout = _NAME_RDATA.get(rtype)
    rdata = data[start:end] if layout is None else _expand_rdata(data, start, end, *layout)
    return Record(name, rtype, rclass, ttl, rdata), end


def _expand_rdata(data: bytes, start: int, end: int, before: int, names: int,
                  after: int) -> bytes:
    if start + before > end:
        raise DnsFormatError("RDATA shorter than its type requires")
    parts = [data[start:start + before]]
    pos = start + before
    for _ in range(names):
        if pos >= end:
            raise DnsFormatError("RDATA shorter than its type requires")
        name, pos = _read_name(data, pos)
        parts.append(_encode_name(name))
    if pos + after != end:
        raise DnsFormatError("RDATA length does not match its contents")
    parts.append(data[pos:end])
    return b"".join(parts)


# -- building -----------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()
        self.offsets: dict[tuple[bytes, ...], int] = {}

    def name(self, name: Name) -> None:
        lowered = tuple(label.lower() for label in name)
        for i in range(len(name)):
            offset = self.offsets.get(lowered[i:])
            if offset is not None:
                self.out += struct.pack("!H", 0xC000 | offset)
                return
            if len(self.out) < 0x4000:  # a pointer has 14 bits
                self.offsets[lowered[i:]] = len(self.out)
            self.out.append(len(name[i]))
            self.out += name[i]
        self.out.append(0)

    def record(self, record: Record) -> None:
        self.name(record.name)
        self.out += _RR_FIXED.pack(record.rtype, record.rclass, record.ttl & 0xFFFFFFFF,
                                   len(record.rdata))
        self.out += record.rdata


def build(message: Message, *, limit: int = MAX_MESSAGE) -> bytes:
    """The wire form of ``message``, owner names compressed.

    Over ``limit`` bytes (a UDP client's payload size), the records are left out and TC is
    set, so the client asks again over TCP; its OPT record stays.
    """
    encoded = _build(message)
    if len(encoded) <= limit:
        return encoded
    opt = tuple(r for r in message.additionals if r.rtype == TYPE_OPT)
    return _build(replace(message, flags=message.flags | FLAG_TC, answers=(),
                          authorities=(), additionals=opt))


def _build(message: Message) -> bytes:
    w = _Writer()
    w.out += _HEADER.pack(message.id, message.flags & 0xFFFF, len(message.questions),
                          len(message.answers), len(message.authorities),
                          len(message.additionals))
    for q in message.questions:
        w.name(q.name)
        w.out += _Q_FIXED.pack(q.qtype, q.qclass)
    for section in (message.answers, message.authorities, message.additionals):
        for record in section:
            w.record(record)
    return bytes(w.out)


# -- helpers for answers -------------------------------------------------------------------


def address_record(name: Name, address: str, ttl: int) -> Record:
    """An A or AAAA record, by the address' family (OSError for a malformed address)."""
    if ":" in address:
        return Record(name, TYPE_AAAA, CLASS_IN, ttl, socket.inet_pton(socket.AF_INET6, address))
    return Record(name, TYPE_A, CLASS_IN, ttl, socket.inet_pton(socket.AF_INET, address))


def soa_record(zone: Name, ttl: int, minimum: int) -> Record:
    """A synthetic SOA for ``zone`` (what CoreDNS puts in negative answers), so resolvers
    can cache NXDOMAIN and NODATA for ``minimum`` seconds (RFC 2308)."""
    mname = (b"ns", b"dns", *zone)
    rname = (b"hostmaster", *zone)
    timers = struct.pack("!IIIII", 1, 7200, 1800, 86400, minimum)
    return Record(zone, TYPE_SOA, CLASS_IN, ttl,
                  _encode_name(mname) + _encode_name(rname) + timers)


def soa_minimum(record: Record) -> int:
    """The MINIMUM field of an (expanded) SOA record."""
    if record.rtype != TYPE_SOA or len(record.rdata) < 20:
        raise DnsFormatError("not an SOA record")
    minimum: int = struct.unpack_from("!I", record.rdata, len(record.rdata) - 4)[0]
    return minimum


def opt_record(payload: int) -> Record:
    """An EDNS(0) OPT pseudo-record announcing ``payload`` bytes over UDP, no options."""
    return Record((), TYPE_OPT, payload, 0, b"")


def formerr_for(data: bytes) -> bytes | None:
    """FORMERR for bytes that do not parse but at least carry an id; None: drop them."""
    if len(data) < 2:
        return None
    if len(data) >= 3 and data[2] & 0x80:
        return None  # a response (QR set): never answer those, or two proxies ping-pong
    msg_id = struct.unpack_from("!H", data)[0]
    opcode_rd = (data[2] & 0x79) << 8 if len(data) >= 3 else 0
    return _HEADER.pack(msg_id, FLAG_QR | opcode_rd | FLAG_RA | RCODE_FORMERR, 0, 0, 0, 0)
