"""A bounded, TTL-honouring cache of upstream DNS answers, sans I/O (the clock is injected).

Keyed by (name without case, type, class).  How long an answer may be kept:

* a positive answer: the smallest TTL among its answer records (RFC 2181 section 5.2
  makes them one RRset's; a CNAME chain is only as fresh as its shortest link);
* NXDOMAIN and NODATA: ``min(SOA TTL, SOA MINIMUM)`` from the authority section (RFC 2308
  section 5); without an SOA the negative answer is not cached at all (section 5 again);
* both capped (``max_ttl``, ``max_negative_ttl``), so a mistaken huge TTL upstream cannot
  pin a stale address for a day;
* SERVFAIL, REFUSED, truncated answers and TTL 0: never.

A hit hands back the stored message with every TTL reduced by the time it spent here, so
clients downstream never keep a record longer than its owner allowed.  The entry count is
bounded; the least recently used entry goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from ztunnel.dns.wire import (
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    TYPE_OPT,
    TYPE_SOA,
    Message,
    Record,
    soa_minimum,
)

CacheKey = tuple[str, int, int]


def cache_ttl(response: Message, *, max_ttl: float, max_negative_ttl: float) -> float | None:
    """How many seconds ``response`` may be served from a cache; None: not at all."""
    if response.truncated:
        return None
    answers = [r for r in response.answers if r.rtype != TYPE_OPT]
    rcode = response.rcode
    if rcode == RCODE_NOERROR and answers:
        ttl: float = min(r.ttl for r in answers)
        ttl = min(ttl, max_ttl)
    elif rcode == RCODE_NXDOMAIN or (rcode == RCODE_NOERROR and not answers):
        soas = [r for r in response.authorities if r.rtype == TYPE_SOA]
        if not soas:
            return None
        ttl = min(min(r.ttl, soa_minimum(r)) for r in soas)
        ttl = min(ttl, max_negative_ttl)
    else:
        return None
    return ttl if ttl > 0 else None


@dataclass(slots=True)
class _Entry:
    response: Message
    stored_at: float
    expires_at: float


def _aged(records: tuple[Record, ...], elapsed: int) -> tuple[Record, ...]:
    return tuple(r if r.rtype == TYPE_OPT else replace(r, ttl=max(r.ttl - elapsed, 0))
                 for r in records)


class DnsCache:
    """LRU of at most ``max_entries`` upstream responses, each kept for its :func:`cache_ttl`."""

    def __init__(self, *, max_entries: int, max_ttl: float, max_negative_ttl: float,
                 clock: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Message | None:
        """The cached response with its TTLs aged, or None (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        elapsed = int(now - entry.stored_at)
        if elapsed <= 0:
            return entry.response
        r = entry.response
        return replace(r, answers=_aged(r.answers, elapsed),
                       authorities=_aged(r.authorities, elapsed),
                       additionals=_aged(r.additionals, elapsed))

    def put(self, key: CacheKey, response: Message) -> bool:
        """Store ``response`` if it may be cached (see the module docstring); True if stored."""
        ttl = cache_ttl(response, max_ttl=self.max_ttl,
                        max_negative_ttl=self.max_negative_ttl)
        if ttl is None:
            return False
        now = self._clock()
        self._entries[key] = _Entry(response.without_opt(), now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True
