"""HPACK for HBONE without the dynamic table: every header field a cached literal.

The h2 library's encoder Huffman-codes every value in Python and searches and grows its
dynamic table per field.  For HBONE's CONNECT requests and their answers that was a
fifth of ztunnel's CPU per new connection (bench/ztunnel_l4.py --churn --profile): the
``traceparent`` is new for every request, so it is coded from scratch and churns the
table, and the peer must Huffman-decode it again.

This encoder never adds to the dynamic table.  Each field is a literal *without
indexing* (RFC 7541 6.2.2; *never indexed*, 6.2.3, where the caller marked it
sensitive), its name by static-table index where there is one, its value a raw string.
Without the dynamic table a field's encoding depends on nothing but the field, so
the bytes of each field are cached: the constant fields of a connection (method,
authority, forwarded, baggage) cost a dictionary lookup, a fresh ``traceparent`` a few
byte operations, and the peer decodes raw strings.  Blocks grow by the bytes Huffman
and indexing would have saved, a few dozen per request.

Table size updates the peer's SETTINGS ask for are still signalled first in the next
block (RFC 7541 4.2), by the base class's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hpack
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

_WITHOUT_INDEXING = 0x00
_NEVER_INDEXED = 0x10
# Fields cached before the cache starts over: unique values (a traceparent) fill it,
# the constant ones come back after a clear at the cost of one encoding each.
_CACHE_LIMIT = 512


def _static_name_indexes() -> dict[bytes, int]:
    names: dict[bytes, int] = {}
    for index, (name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
        names.setdefault(name, index)
    return names


_STATIC_NAMES = _static_name_indexes()


def _string(data: bytes) -> bytes:
    return bytes(encode_integer(len(data), 7)) + data  # H bit 0: raw octets


def encode_field(name: bytes, value: bytes, *, sensitive: bool = False) -> bytes:
    """One header field as a literal without indexing (never indexed if sensitive)."""
    flag = _NEVER_INDEXED if sensitive else _WITHOUT_INDEXING
    index = _STATIC_NAMES.get(name)
    if index is None:
        return bytes([flag]) + _string(name) + _string(value)
    head = encode_integer(index, 4)
    head[0] |= flag
    return bytes(head) + _string(value)


class LiteralEncoder(hpack.Encoder):
    """An ``hpack.Encoder`` that keeps its dynamic table empty (see module doc);
    install it as ``H2Connection.encoder``."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[bytes, bytes, bool], bytes] = {}

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        """``headers``: (name, value) or (name, value, sensitive) tuples or HeaderTuples,
        pseudo-headers first (h2 passes them so); ``huffman`` is ignored."""
        block: list[bytes] = []
        if self.header_table.resized:
            block.append(bytes(self._encode_table_size_change()))
            self.header_table.resized = False
        cache = self._cache
        for header in headers:
            if isinstance(header, hpack.HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and bool(header[2])
            name, value = _as_bytes(header[0]), _as_bytes(header[1])
            key = (name, value, sensitive)
            encoded = cache.get(key)
            if encoded is None:
                encoded = encode_field(name, value, sensitive=sensitive)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[key] = encoded
            block.append(encoded)
        return b"".join(block)


def _as_bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")
