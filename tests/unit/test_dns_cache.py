"""The forwarder's cache: TTLs honoured (fake clock), negative caching per SOA, LRU bound."""

from __future__ import annotations

from ztunnel.dns.cache import DnsCache, cache_ttl
from ztunnel.dns.wire import (
    FLAG_QR,
    FLAG_TC,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    Message,
    Question,
    address_record,
    name_from_text,
    opt_record,
    soa_record,
)

NAME = name_from_text("example.com")
KEY = ("example.com", TYPE_A, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def positive(*ttls: int) -> Message:
    return Message(1, FLAG_QR | RCODE_NOERROR, (Question(NAME, TYPE_A),),
                   tuple(address_record(NAME, f"192.0.2.{i + 1}", t) for i, t in enumerate(ttls)),
                   additionals=(opt_record(1232),))


def negative(rcode: int, soa_ttl: int, minimum: int) -> Message:
    return Message(1, FLAG_QR | rcode, (Question(NAME, TYPE_A),),
                   authorities=(soa_record(name_from_text("com"), soa_ttl, minimum),))


def cache(clock: Clock, entries: int = 100) -> DnsCache:
    return DnsCache(max_entries=entries, max_ttl=300, max_negative_ttl=60, clock=clock)


def test_positive_answer_lives_for_its_smallest_ttl_and_ages() -> None:
    clock = Clock()
    c = cache(clock)
    assert c.put(KEY, positive(120, 40))
    clock.now += 15.5
    hit = c.get(KEY)
    assert hit is not None
    assert [r.ttl for r in hit.answers] == [105, 25]  # aged by whole seconds spent here
    assert hit.edns_payload() is None  # the upstream's OPT is not replayed
    clock.now += 24.4  # 39.9 s after storing
    assert c.get(KEY) is not None
    clock.now += 0.2
    assert c.get(KEY) is None
    assert len(c) == 0


def test_ttl_is_capped() -> None:
    assert cache_ttl(positive(86400), max_ttl=300, max_negative_ttl=60) == 300


def test_nxdomain_is_cached_for_the_soa_minimum_capped() -> None:
    clock = Clock()
    c = cache(clock)
    assert c.put(KEY, negative(RCODE_NXDOMAIN, 3600, 10))
    clock.now += 9.9
    assert c.get(KEY) is not None
    clock.now += 0.2
    assert c.get(KEY) is None
    # SOA TTL smaller than MINIMUM wins; a huge MINIMUM is capped.
    assert cache_ttl(negative(RCODE_NXDOMAIN, 5, 900), max_ttl=300, max_negative_ttl=60) == 5
    assert cache_ttl(negative(RCODE_NXDOMAIN, 900, 900), max_ttl=300,
                     max_negative_ttl=60) == 60


def test_nodata_with_soa_is_cached_without_soa_is_not() -> None:
    nodata = negative(RCODE_NOERROR, 30, 30)
    assert cache_ttl(nodata, max_ttl=300, max_negative_ttl=60) == 30
    bare = Message(1, FLAG_QR, (Question(NAME, TYPE_A),))
    assert cache_ttl(bare, max_ttl=300, max_negative_ttl=60) is None


def test_failures_truncation_and_zero_ttl_are_never_cached() -> None:
    c = cache(Clock())
    assert not c.put(KEY, Message(1, FLAG_QR | RCODE_SERVFAIL, (Question(NAME, TYPE_A),)))
    truncated = positive(60)
    assert not c.put(KEY, Message(truncated.id, truncated.flags | FLAG_TC, truncated.questions,
                                  truncated.answers))
    assert not c.put(KEY, positive(0))
    assert len(c) == 0


def test_lru_bound_evicts_the_least_recently_used() -> None:
    c = cache(Clock(), entries=3)
    keys = [(f"n{i}.example", TYPE_A, 1) for i in range(4)]
    for key in keys[:3]:
        c.put(key, positive(60))
    assert c.get(keys[0]) is not None  # n0 is now the most recently used
    c.put(keys[3], positive(60))
    assert len(c) == 3
    assert c.get(keys[1]) is None
    assert all(c.get(k) is not None for k in (keys[0], keys[2], keys[3]))
