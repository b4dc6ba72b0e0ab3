"""EndpointPicker: which host of one cluster gets this try.

Theory of operation: the picker combines the pieces of this package for one
destination cluster.  Hosts are split into priority levels and locality groups
(:mod:`~waypoint.resilience.locality`); each group has a balancer over its
usable hosts (:mod:`~waypoint.resilience.lb`); the outlier detector
(:mod:`~waypoint.resilience.outlier`) decides which hosts are usable.  The
derived state is rebuilt only when the host set or an ejection changes (the
detector's ``version``), so a pick costs a version check, a draw for the level
(and locality), and one balancer pick.

A pick:

1. ends expired ejections (O(1) unless one is due);
2. draws a priority level by priority load (Envoy overprovisioning 1.4);
3. draws a locality group by ``distribute`` weight x health (Envoy "Locality
   weighted load balancing"), if ``distribute`` applies;
4. picks a host: consistent hash when configured and the request has a key,
   else the simple policy; hosts in ``exclude`` (previous tries) are avoided for
   up to ``max_attempts`` picks, as Envoy's ``previous_hosts`` predicate with
   ``host_selection_retry_max_attempts`` does, and then by a scan of the group
   (unlike Envoy, so that a retry reaches another host whenever the chosen
   level and locality have one).

Panic (Istio ``minHealthPercent``, Envoy "Panic threshold"): when fewer than
that percent of a level's hosts are healthy, the level uses all its hosts,
ejected or not (consistent hash included).  Istio's default 0 never panics:
with every host ejected the pick is ``None`` and the shell answers 503
``no healthy upstream`` (flag ``UH``).

``PASSTHROUGH`` is not a pick: the shell connects to the original destination.
The picker treats it as ``RANDOM`` if asked anyway.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType

from waypoint.resilience.config import (
    LoadBalancerSettings,
    LocalityLbSettings,
    OutlierDetectionSettings,
    SimpleLb,
)
from waypoint.resilience.hosts import Host, Locality
from waypoint.resilience.lb import (
    HashBalancer,
    LeastRequest,
    Maglev,
    RandomBalancer,
    RingHash,
    RoundRobin,
    SimpleBalancer,
    ring_points_per_weight,
)
from waypoint.resilience.locality import (
    level_health,
    locality_weights,
    priority_levels,
    priority_load,
)
from waypoint.resilience.outlier import LocalFailure, OutlierDetector

#: Istio's mesh-wide default (``meshConfig.localityLbSetting.enabled: true``).
MESH_DEFAULT_LOCALITY_LB = LocalityLbSettings()

#: Body and response flag when no host can be picked (Envoy's).
NO_HEALTHY_UPSTREAM_BODY = b"no healthy upstream"
NO_HEALTHY_UPSTREAM_FLAG = "UH"

_SIMPLE: dict[SimpleLb, type[SimpleBalancer]] = {
    SimpleLb.ROUND_ROBIN: RoundRobin,
    SimpleLb.LEAST_REQUEST: LeastRequest,
    SimpleLb.RANDOM: RandomBalancer,
    SimpleLb.PASSTHROUGH: RandomBalancer,
}


def _not_ejected(host: Host) -> bool:
    return not host.ejected


def _any_host(host: Host) -> bool:
    return True


class _Group:
    """Hosts of one locality (or a whole level) and their balancers."""

    __slots__ = ("balancer", "hash", "hosts", "panic", "usable", "weight")

    def __init__(self, hosts: list[Host], weight: float, hash_balancer: HashBalancer | None
                 ) -> None:
        self.hosts = hosts
        self.weight = weight
        self.hash = hash_balancer
        self.usable: list[Host] = []
        self.panic = False
        self.balancer: SimpleBalancer | None = None


class _Level:
    """One priority level: its locality groups and their cumulative pick weights."""

    __slots__ = ("cumulative", "groups")

    def __init__(self, groups: list[_Group]) -> None:
        self.groups = groups
        self.cumulative: list[float] = []


class EndpointPicker:
    """Chooses hosts for one cluster; owns its outlier detector."""

    def __init__(self, hosts: Iterable[Host], lb: LoadBalancerSettings,
                 outlier: OutlierDetectionSettings | None = None, *,
                 client_locality: Locality | None = None,
                 client_labels: Mapping[str, str] | None = None, cluster: str = "") -> None:
        """``client_locality``/``client_labels``: the waypoint's own (for locality
        preference); ``cluster`` names the destination in log lines."""
        self.lb = lb
        self.detector = (OutlierDetector(outlier, (), cluster) if outlier is not None
                         else None)
        self._min_health = outlier.min_health_percent if outlier is not None else 0.0
        self._client_locality = client_locality or Locality()
        self._client_labels = client_labels or MappingProxyType({})
        self._hosts: list[Host] = []
        self._levels: list[_Level] = []
        self._level_of: dict[Host, int] = {}
        self._level_cumulative: list[float] = []
        self._built_version = -1
        self._ring_points: dict[tuple[int, Locality | None], int] = {}
        self._dirty = True
        self.set_hosts(hosts)

    @property
    def hosts(self) -> Sequence[Host]:
        """Every host of the cluster, ejected or not."""
        return self._hosts

    def set_hosts(self, hosts: Iterable[Host]) -> None:
        """Replace the host set (discovery update).

        A host whose address, weight, locality and labels are unchanged keeps its
        existing object, and so its outlier and least-request state.
        """
        old = {h.address: h for h in self._hosts}
        merged: list[Host] = []
        for host in hosts:
            prev = old.get(host.address)
            same = (prev is not None and prev.weight == host.weight
                    and prev.locality == host.locality and prev.labels == host.labels)
            merged.append(prev if same and prev is not None else host)
        self._hosts = merged
        if self.detector is not None:
            self.detector.set_hosts(merged)
        self._build_levels()
        self._dirty = True

    def _build_levels(self) -> None:
        locality_lb = self.lb.locality_lb or MESH_DEFAULT_LOCALITY_LB
        levels = priority_levels(self._hosts, locality_lb, client_locality=self._client_locality,
                                 client_labels=self._client_labels,
                                 outlier_detection=self.detector is not None)
        weights = locality_weights(self._hosts, locality_lb, self._client_locality)
        self._levels = []
        self._level_of = {}
        for rank, level_hosts in enumerate(levels):
            if weights is None:
                groups = [_Group(level_hosts, 1.0,
                                 self._hash_balancer(level_hosts, (rank, None)))]
            else:
                by_locality: dict[Locality, list[Host]] = {}
                for host in level_hosts:
                    if host.locality in weights:
                        by_locality.setdefault(host.locality, []).append(host)
                groups = [_Group(hs, weights[loc], self._hash_balancer(hs, (rank, loc)))
                          for loc, hs in by_locality.items()]
            if groups:
                for group in groups:
                    for host in group.hosts:
                        self._level_of[host] = len(self._levels)
                self._levels.append(_Level(groups))

    def _hash_balancer(self, hosts: list[Host], key: tuple[int, Locality | None]
                       ) -> HashBalancer | None:
        ch = self.lb.consistent_hash
        if ch is None or not hosts:
            return None
        if ch.algorithm == "maglev":
            return Maglev(hosts, ch.table_size)
        # Per-group ring density survives host changes, so new hosts only take keys.
        points = ring_points_per_weight(sum(h.weight for h in hosts), ch.minimum_ring_size,
                                        self._ring_points.get(key))
        self._ring_points[key] = points
        return RingHash(hosts, points)

    def _refresh(self, rng: random.Random) -> None:
        """Recompute usable hosts, balancers and loads after a health or host change."""
        make: type[SimpleBalancer] = (
            RandomBalancer if self.lb.consistent_hash is not None else _SIMPLE[self.lb.simple])
        health: list[float] = []
        for level in self._levels:
            healthy = [[h for h in g.hosts if not h.ejected] for g in level.groups]
            healthy_total = sum(len(hs) for hs in healthy)
            level_total = sum(len(g.hosts) for g in level.groups)
            # Envoy decides panic per priority level, then uses all of its hosts.
            panic = 100.0 * healthy_total < self._min_health * level_total
            weights = []
            for group, group_healthy in zip(level.groups, healthy, strict=True):
                group.panic = panic
                group.usable = group.hosts if panic else group_healthy
                group.balancer = make(group.usable, rng) if group.usable else None
                # Locality weight scaled by the locality's health (Envoy "Locality
                # weighted load balancing"); in panic every host counts.
                weights.append(group.weight * level_health(
                    len(group.usable), len(group.hosts)))
            level.cumulative = list(itertools.accumulate(weights))
            health.append(level_health(healthy_total, level_total))
        load = priority_load(health)
        if self._levels and not any(load):
            # Envoy: when every level is down, all load goes to the first level,
            # which only yields hosts if it is in panic.
            load[0] = 100.0
        self._level_cumulative = list(itertools.accumulate(load))
        self._built_version = self.detector.version if self.detector is not None else 0
        self._dirty = False

    def pick(self, now: float, rng: random.Random, hash_key: int | None = None,
             exclude: Collection[Host] = (), max_attempts: int = 5,
             avoid_excluded_levels: bool = False) -> Host | None:
        """A host for the next try, or ``None``: answer 503 ``no healthy upstream``.

        ``avoid_excluded_levels`` (Istio ``retryRemoteLocalities``, Envoy's
        ``previous_priorities``): draw the level among those no excluded host is
        in, by their share of the priority load, while any such level has load.
        """
        detector = self.detector
        if detector is not None:
            detector.expire(now)
            if detector.version != self._built_version:
                self._dirty = True
        if self._dirty:
            self._refresh(rng)
        levels = self._levels
        if not levels:
            return None
        if len(levels) == 1:
            level = levels[0]
        elif avoid_excluded_levels and exclude:
            level = self._level_avoiding(exclude, rng)
        else:
            cumulative = self._level_cumulative
            index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
            level = levels[min(index, len(levels) - 1)]
        groups = level.groups
        if len(groups) == 1:
            group = groups[0]
        else:
            cumulative = level.cumulative
            if cumulative[-1] <= 0:
                return None
            index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
            group = groups[min(index, len(groups) - 1)]
        balancer = group.balancer
        if balancer is None:
            return None
        if hash_key is not None and group.hash is not None:
            if exclude:
                panic = group.panic
                host = group.hash.pick(
                    hash_key, lambda h: (panic or not h.ejected) and h not in exclude)
            else:
                host = group.hash.pick(hash_key, _any_host if group.panic else _not_ejected)
            return host if host is not None else balancer.pick(rng)
        host = balancer.pick(rng)
        if exclude and host in exclude:
            for _ in range(max_attempts - 1):
                host = balancer.pick(rng)
                if host not in exclude:
                    return host
            # Unlucky draws: take any other usable host of the group before giving up,
            # so that a retry goes to another host whenever one exists.
            return next((h for h in group.usable if h not in exclude), host)
        return host

    def _level_avoiding(self, exclude: Collection[Host], rng: random.Random) -> _Level:
        tried = {self._level_of.get(h) for h in exclude}
        loads = [b - a for a, b in zip([0.0, *self._level_cumulative], self._level_cumulative,
                                       strict=False)]
        candidates = [(i, load) for i, load in enumerate(loads) if i not in tried and load > 0]
        if not candidates:
            candidates = [(i, load) for i, load in enumerate(loads) if i not in tried]
        if not candidates:
            candidates = list(enumerate(loads))
        cumulative = list(itertools.accumulate(load for _, load in candidates))
        if cumulative[-1] <= 0:
            return self._levels[candidates[0][0]]
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self._levels[candidates[min(index, len(candidates) - 1)][0]]

    def request_started(self, host: Host) -> None:
        """Count an active request on ``host`` (least request reads it)."""
        host.active_requests += 1

    def request_finished(self, host: Host) -> None:
        host.active_requests -= 1

    def report_response(self, host: Host, status: int, now: float) -> bool:
        """Feed a response status to outlier detection; ``True`` if ``host`` was ejected."""
        return self.detector is not None and self.detector.report_response(host, status, now)

    def report_local_failure(self, host: Host, failure: LocalFailure, now: float) -> bool:
        """Feed a connect failure, reset or timeout to outlier detection."""
        return (self.detector is not None
                and self.detector.report_local_failure(host, failure, now))

    def sweep(self, now: float) -> None:
        """Run every outlier ``interval`` (the shell's timer)."""
        if self.detector is not None:
            self.detector.sweep(now)
