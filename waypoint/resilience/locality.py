"""Locality-aware load balancing: priority levels, locality weights, priority load.

Semantics (Istio "Locality Load Balancing" task and "Destination Rule"
``LocalityLoadBalancerSetting``; Envoy "Priority levels", "Locality weighted
load balancing", "Overprovisioning factor"):

* **Failover** (the default when locality LB is enabled): hosts are ranked
  relative to the client's locality: same region, zone and subzone (0) >
  same region and zone (1) > same region (2) > the region ``failover`` maps the
  client's region to (3) > anywhere else (4).  Empty ranks are dropped, so levels
  are consecutive.
* **failoverPriority**: a list of labels; a host's rank is how many labels
  *from the end* must be dropped before all remaining labels equal the
  client's (all equal: 0; first one differs: ``len(labels)``).  The topology
  labels ``topology.kubernetes.io/region``, ``topology.kubernetes.io/zone`` and
  ``topology.istio.io/subzone`` are read from the locality.  When set, it takes
  precedence over ``failover``.
* Failover and failoverPriority need outlier detection: without it Istio puts
  every host at one level (nothing would ever mark a level unhealthy), and so
  do we (:func:`priority_levels` ``outlier_detection=False``).
* **distribute**: the first entry whose ``from`` matches the client locality
  sets weights: each ``to`` pattern's percentage is shared among the
  localities it matches, in proportion to their host weight; localities matched
  by no ``to`` get no traffic.  All hosts stay at one level.
* **Priority load** (Envoy, overprovisioning factor 1.4): a level's health is
  ``min(100, 140 * healthy / total)``; level 0 takes its health in percent of
  traffic, level 1 the next share, and so on.  If all levels together are
  below 100, their shares are scaled up to 100.
* Patterns: ``region/zone/subzone`` where a ``*`` segment matches anything from
  there on and a missing trailing segment matches anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from waypoint.resilience.config import LocalityLbSettings
from waypoint.resilience.hosts import Host, Locality

#: Envoy's default overprovisioning factor (1.4, as a percentage multiplier).
OVERPROVISIONING = 1.4

_TOPOLOGY_LABELS = {
    "topology.kubernetes.io/region": "region",
    "topology.kubernetes.io/zone": "zone",
    "topology.istio.io/subzone": "subzone",
}


def locality_matches(locality: Locality, pattern: str) -> bool:
    """Whether ``locality`` is covered by ``pattern`` (``region/zone/subzone`` with ``*``)."""
    for actual, wanted in zip((locality.region, locality.zone, locality.subzone),
                              pattern.split("/"), strict=False):
        if wanted == "*":
            return True
        if actual != wanted:
            return False
    return True


def failover_rank(client: Locality, host: Locality, failover: Mapping[str, str]) -> int:
    """Rank 0-4 of ``host`` for a client at ``client`` (lower is preferred)."""
    if host.region == client.region:
        if host.zone == client.zone:
            return 0 if host.subzone == client.subzone else 1
        return 2
    if failover.get(client.region) == host.region:
        return 3
    return 4


def _label(host_labels: Mapping[str, str], locality: Locality, key: str) -> str | None:
    attr = _TOPOLOGY_LABELS.get(key)
    if attr is not None:
        return str(getattr(locality, attr))
    return host_labels.get(key)


def label_rank(client_labels: Mapping[str, str], client_locality: Locality, host: Host,
               labels: Sequence[str]) -> int:
    """Rank of ``host`` under ``failoverPriority`` ``labels`` (0: all labels match)."""
    matched = 0
    for key in labels:
        want = _label(client_labels, client_locality, key)
        if want is None or _label(host.labels, host.locality, key) != want:
            break
        matched += 1
    return len(labels) - matched


def priority_levels(hosts: Sequence[Host], settings: LocalityLbSettings | None, *,
                    client_locality: Locality, client_labels: Mapping[str, str],
                    outlier_detection: bool) -> list[list[Host]]:
    """Split ``hosts`` into priority levels, most preferred first, none empty."""
    if (settings is None or not settings.enabled or settings.distribute
            or not outlier_detection):
        return [list(hosts)] if hosts else []
    if not settings.failover_priority and not client_locality.region:
        # A client of unknown locality has no "near" to prefer.
        return [list(hosts)] if hosts else []
    if settings.failover_priority:
        ranks = [label_rank(client_labels, client_locality, h, settings.failover_priority)
                 for h in hosts]
    else:
        failover = {f.from_: f.to for f in settings.failover}
        ranks = [failover_rank(client_locality, h.locality, failover) for h in hosts]
    levels: dict[int, list[Host]] = {}
    for rank, host in zip(ranks, hosts, strict=True):
        levels.setdefault(rank, []).append(host)
    return [levels[r] for r in sorted(levels)]


def locality_weights(hosts: Sequence[Host], settings: LocalityLbSettings | None,
                     client_locality: Locality) -> dict[Locality, float] | None:
    """Per-locality traffic weights from ``distribute``, or ``None`` when it does not apply.

    Localities absent from the result get no traffic.
    """
    if settings is None or not settings.enabled or not settings.distribute:
        return None
    rule = next((d for d in settings.distribute if locality_matches(client_locality, d.from_)),
                None)
    if rule is None:
        return None
    host_weight: dict[Locality, int] = {}
    for host in hosts:
        host_weight[host.locality] = host_weight.get(host.locality, 0) + host.weight
    unassigned = set(host_weight)
    weights: dict[Locality, float] = {}
    for pattern, percent in rule.to.items():
        matched = [loc for loc in unassigned if locality_matches(loc, pattern)]
        total = sum(host_weight[loc] for loc in matched)
        for loc in matched:
            unassigned.discard(loc)
            share = percent * host_weight[loc] / total
            if share > 0:
                weights[loc] = share
    return weights


def level_health(healthy: int, total: int) -> float:
    """A level's health in percent, with Envoy's overprovisioning factor."""
    if total == 0:
        return 0.0
    return min(100.0, OVERPROVISIONING * 100.0 * healthy / total)


def priority_load(health: Sequence[float]) -> list[float]:
    """Percent of traffic per level from each level's health (sums to 100, or all 0)."""
    total = min(100.0, sum(health))
    if total == 0:
        return [0.0] * len(health)
    remaining = 100.0
    load = []
    for h in health:
        share = min(remaining, h * 100.0 / total)
        load.append(share)
        remaining -= share
    # Rounding must not leave a sliver of traffic nowhere.
    if load and not math.isclose(sum(load), 100.0):
        load[-1] += 100.0 - sum(load)
    return load
