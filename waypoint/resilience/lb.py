"""Load-balancing algorithms over a fixed list of hosts.

Each balancer is built once per host-set change (O(n), or O(table) for the hash
balancers) and then picks in O(1) or O(log n) with no allocation.  Which hosts
are in the list (healthy ones, one priority level, one locality) is the
picker's business (:mod:`waypoint.resilience.picker`).

Semantics (Envoy "Load balancers" architecture page; Istio "Destination Rule"
``LoadBalancerSettings``):

* Round robin: in turn; with unequal weights, earliest-deadline-first
  scheduling (each host is due every ``1/weight``), which spreads a heavy host's
  turns instead of bunching them.  The start is random so that many waypoints
  do not march in step.
* Least request: power of two choices: two random hosts, the one with fewer
  active requests wins.  With unequal weights the two are drawn by weight and
  compared by ``active / weight``.
* Random: uniform, or by weight.
* Ring hash (Ketama): every host owns points on a 64-bit ring in proportion to
  its weight, at least ``minimum_ring_size`` points in all; a key goes to the
  first point at or after its hash.  Unlike Envoy, the points per host are kept
  while the ring stays within 1x-4x the minimum (:func:`ring_points_per_weight`),
  so adding a host to N moves about 1/(N+1) of the keys, all to the new host.
* Maglev: a lookup table (prime size, 65537 by default) filled from each host's
  permutation; one table read per pick.  Adding a host moves slightly more than
  1/(N+1) of the keys but lookups are O(1).
* The hash balancers are built over every host of their group, healthy or not,
  and step past unusable hosts at pick time (ring: the next point; Maglev: a
  rehash), so an ejection moves only the keys of the ejected host and never
  forces a table rebuild on the request path.

Hashes are xxHash64 (as Envoy's), stable across processes and machines, so
every waypoint replica maps a key to the same host.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence

import xxhash

from waypoint.resilience.hosts import Host

_hash64 = xxhash.xxh64_intdigest

#: Envoy's ``maximum_ring_size`` default (8M points).
MAX_RING_SIZE = 8 * 1024 * 1024


def _uniform_weights(hosts: Sequence[Host]) -> bool:
    first = hosts[0].weight
    return all(h.weight == first for h in hosts)


class RoundRobin:
    """Round robin, weighted by earliest deadline first when weights differ."""

    __slots__ = ("_heap", "_hosts", "_next", "_seq")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._next = rng.randrange(len(self._hosts))
        self._heap: list[tuple[float, int, Host]] | None = None
        self._seq = itertools.count()
        if not _uniform_weights(self._hosts):
            # Entries: (deadline, tie-break sequence, host); deadline advances by 1/weight.
            self._heap = [(1.0 / h.weight, next(self._seq), h) for h in self._hosts]
            heapq.heapify(self._heap)
            for _ in range(self._next):
                self._advance()

    def _advance(self) -> Host:
        assert self._heap is not None
        deadline, _, host = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + 1.0 / host.weight, next(self._seq), host))
        return host

    def pick(self, rng: random.Random) -> Host:
        if self._heap is not None:
            return self._advance()
        i = self._next
        self._next = (i + 1) % len(self._hosts)
        return self._hosts[i]


class _Weighted:
    """Draw a host at random, uniformly or by weight (bisect over cumulative weights)."""

    __slots__ = ("_cumulative", "_hosts", "_total")

    def __init__(self, hosts: Sequence[Host]) -> None:
        self._hosts = tuple(hosts)
        if _uniform_weights(self._hosts):
            self._cumulative: list[int] | None = None
            self._total = len(self._hosts)
        else:
            self._cumulative = list(itertools.accumulate(h.weight for h in self._hosts))
            self._total = self._cumulative[-1]

    def draw(self, rng: random.Random) -> Host:
        # rng.random() scaled: randrange costs several times more per call.
        if self._cumulative is None:
            return self._hosts[int(rng.random() * self._total)]
        return self._hosts[bisect.bisect_right(self._cumulative, rng.random() * self._total)]


class RandomBalancer:
    """Random choice, by weight when weights differ."""

    __slots__ = ("_draw",)

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._draw = _Weighted(hosts).draw

    def pick(self, rng: random.Random) -> Host:
        return self._draw(rng)


class LeastRequest:
    """Power of two choices on active requests (weight-adjusted when weights differ)."""

    __slots__ = ("_draw", "_hosts", "_weighted")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._weighted = not _uniform_weights(self._hosts)
        self._draw = _Weighted(hosts).draw

    def pick(self, rng: random.Random) -> Host:
        hosts = self._hosts
        n = len(hosts)
        if n == 1:
            return hosts[0]
        if self._weighted:
            a, b = self._draw(rng), self._draw(rng)
            return b if b.active_requests * a.weight < a.active_requests * b.weight else a
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = hosts[i], hosts[j]
        return b if b.active_requests < a.active_requests else a


Usable = Callable[[Host], bool]


def ring_points_per_weight(total_weight: int, minimum_ring_size: int, previous: int | None,
                           maximum_ring_size: int = MAX_RING_SIZE) -> int:
    """Ring points per unit of host weight, kept stable across host-set changes.

    Envoy rescales the ring on every change so it holds about
    ``minimum_ring_size`` points; that shifts points between old hosts too.  We
    keep ``previous`` while the ring stays within 1x-4x the minimum (and under
    the maximum), so adding a host moves keys only to it.
    """
    needed = max(1, math.ceil(minimum_ring_size / total_weight))
    ceiling = min(4 * minimum_ring_size, maximum_ring_size)
    if previous is not None and previous >= needed and previous * total_weight <= ceiling:
        return previous
    return max(1, min(needed, maximum_ring_size // total_weight))


class RingHash:
    """Ketama ring over all hosts of a group; picks step past unusable hosts."""

    __slots__ = ("_points", "_ring_hosts", "hosts")

    def __init__(self, hosts: Sequence[Host], points_per_weight: int) -> None:
        """Each host gets ``weight * points_per_weight`` points, hashed from ``address_i``."""
        self.hosts = tuple(hosts)
        entries = [
            (_hash64(f"{host.address}_{i}".encode()), host.address, host)
            for host in self.hosts
            for i in range(host.weight * points_per_weight)
        ]
        entries.sort(key=lambda e: (e[0], e[1]))
        self._points = [e[0] for e in entries]
        self._ring_hosts = [e[2] for e in entries]

    @property
    def size(self) -> int:
        return len(self._points)

    def pick(self, key_hash: int, usable: Usable) -> Host | None:
        """The first usable host at or after ``key_hash`` on the ring."""
        n = len(self._points)
        start = bisect.bisect_left(self._points, key_hash)
        ring = self._ring_hosts
        host = ring[start % n]
        if usable(host):
            return host
        for k in range(1, n):
            host = ring[(start + k) % n]
            if usable(host):
                return host
        return None


class Maglev:
    """Maglev lookup table over all hosts of a group (weighted, as Envoy builds it)."""

    __slots__ = ("_table", "hosts", "table_size")

    def __init__(self, hosts: Sequence[Host], table_size: int = 65537) -> None:
        self.hosts = tuple(hosts)
        self.table_size = m = table_size
        max_weight = max(h.weight for h in self.hosts)
        offsets = []
        skips = []
        for h in self.hosts:
            key = h.address.encode()
            offsets.append(xxhash.xxh64_intdigest(key, 0) % m)
            skips.append(xxhash.xxh64_intdigest(key, 1) % (m - 1) + 1)
        nexts = [0] * len(self.hosts)
        targets = [0.0] * len(self.hosts)
        table: list[Host | None] = [None] * m
        filled = 0
        iteration = 1
        while filled < m:
            for i, host in enumerate(self.hosts):
                # A host of the largest weight takes a slot every round; one of a
                # third of it, every third round.
                if iteration * host.weight < targets[i]:
                    continue
                targets[i] += max_weight
                c = (offsets[i] + skips[i] * nexts[i]) % m
                while table[c] is not None:
                    nexts[i] += 1
                    c = (offsets[i] + skips[i] * nexts[i]) % m
                table[c] = host
                nexts[i] += 1
                filled += 1
                if filled == m:
                    break
            iteration += 1
        self._table: list[Host] = [h for h in table if h is not None]

    def pick(self, key_hash: int, usable: Usable) -> Host | None:
        """The host for ``key_hash``; if it is unusable, rehash (seeded 1, 2, ...)."""
        table = self._table
        m = self.table_size
        host = table[key_hash % m]
        if usable(host):
            return host
        # Bounded rehashing, then a linear scan so that a usable host is always found.
        key = key_hash.to_bytes(8, "little")
        for seed in range(1, 1 + 4 * len(self.hosts)):
            host = table[_hash64(key, seed) % m]
            if usable(host):
                return host
        for host in self.hosts:
            if usable(host):
                return host
        return None


SimpleBalancer = RoundRobin | LeastRequest | RandomBalancer
HashBalancer = RingHash | Maglev
