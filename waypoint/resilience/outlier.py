"""Outlier detection: eject hosts that fail in a row, bring them back after a while.

Semantics (Envoy "Outlier detection" architecture page and ``OutlierDetection``
proto; Istio "Destination Rule" ``OutlierDetection``):

* Consecutive 5xx: every 5xx response adds one to the host's streak, any other
  response resets it.  Consecutive gateway errors: the same for 502/503/504.
  Reaching a threshold ejects the host at once (not at the next interval), and
  resets that streak.
* Locally originated failures (connect failure, reset, timeout) count as 503
  (timeout: 504), so they feed both streaks, unless
  ``split_external_local_origin_errors``: then they feed their own
  ``consecutive_local_origin_failures`` streak, which a successful connect resets.
* Ejection lasts ``base_ejection_time x num_ejections``, capped at
  ``max(base_ejection_time, max_ejection_time)``.  ``num_ejections`` grows by
  one per ejection and shrinks by one per ``interval`` sweep in which the host
  is not ejected.
* A host is ejected only while the ejected share is below
  ``max_ejection_percent`` (Envoy's rule: the last ejection may overshoot it, so
  one host can always be ejected, as Istio's docs promise).
* Expired ejections end at the ``interval`` sweep (:meth:`OutlierDetector.sweep`)
  or sooner when a pick looks (:meth:`OutlierDetector.expire`, O(1) when nothing is due).
* ``min_health_percent`` (panic) is the picker's job: below it, ejections are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

from common.logging import get_logger
from waypoint.resilience.config import OutlierDetectionSettings
from waypoint.resilience.hosts import Host

_log = get_logger("waypoint.outlier")


class LocalFailure(Enum):
    """A failure the waypoint saw itself, with no response from the host."""

    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"
    TIMEOUT = "timeout"


#: The HTTP status Envoy maps each local failure to when errors are not split.
_LOCAL_STATUS = {LocalFailure.CONNECT_FAILURE: 503, LocalFailure.RESET: 503,
                 LocalFailure.TIMEOUT: 504}


class OutlierDetector:
    """Ejection state of one cluster's hosts (the counters live on the hosts)."""

    __slots__ = ("_hosts", "_log", "_next_expiry", "ejected_count", "settings", "version")

    def __init__(self, settings: OutlierDetectionSettings, hosts: Iterable[Host] = (),
                 cluster: str = "") -> None:
        """``cluster`` names the destination in log lines."""
        self.settings = settings
        self._log = _log.bind(cluster=cluster)
        self._hosts: list[Host] = []
        self.ejected_count = 0
        self._next_expiry = math.inf
        #: Bumped on every ejection and return, so pickers know to rebuild.
        self.version = 0
        self.set_hosts(hosts)

    def set_hosts(self, hosts: Iterable[Host]) -> None:
        """Replace the host set (discovery update); surviving hosts keep their state."""
        self._hosts = list(hosts)
        self.ejected_count = sum(1 for h in self._hosts if h.ejected)
        self._recompute_expiry()
        self.version += 1

    def ejection_duration(self, host: Host) -> float:
        """How long ``host``'s current ejection lasts."""
        s = self.settings
        return min(s.base_ejection_time * max(host.num_ejections, 1),
                   max(s.base_ejection_time, s.max_ejection_time))

    def _may_eject(self) -> bool:
        total = len(self._hosts)
        if total == 0:
            return False
        if self.ejected_count == 0:
            return True
        return 100.0 * self.ejected_count / total < self.settings.max_ejection_percent

    def _eject(self, host: Host, now: float, reason: str) -> bool:
        if host.ejected or not self._may_eject():
            return False
        host.ejected = True
        host.ejected_at = now
        host.num_ejections += 1
        self.ejected_count += 1
        self._next_expiry = min(self._next_expiry, now + self.ejection_duration(host))
        self.version += 1
        self._log.info("host ejected", host=host.address, reason=reason,
                  duration_s=self.ejection_duration(host), ejected=self.ejected_count,
                  hosts=len(self._hosts))
        return True

    def report_response(self, host: Host, status: int, now: float) -> bool:
        """Account a response from ``host``; ``True`` if this ejected it."""
        s = self.settings
        ejected = False
        if status >= 500:
            host.consecutive_5xx += 1
            if s.consecutive_5xx is not None and host.consecutive_5xx >= s.consecutive_5xx:
                host.consecutive_5xx = 0
                ejected = self._eject(host, now, "consecutive_5xx")
        else:
            host.consecutive_5xx = 0
        if status in (502, 503, 504):
            host.consecutive_gateway += 1
            limit = s.consecutive_gateway_errors
            if limit is not None and host.consecutive_gateway >= limit:
                host.consecutive_gateway = 0
                ejected = self._eject(host, now, "consecutive_gateway_errors") or ejected
        else:
            host.consecutive_gateway = 0
        return ejected

    def report_local_failure(self, host: Host, failure: LocalFailure, now: float) -> bool:
        """Account a locally originated failure; ``True`` if this ejected the host."""
        s = self.settings
        if not s.split_external_local_origin_errors:
            return self.report_response(host, _LOCAL_STATUS[failure], now)
        host.consecutive_local += 1
        limit = s.consecutive_local_origin_failures
        if limit is not None and host.consecutive_local >= limit:
            host.consecutive_local = 0
            return self._eject(host, now, "consecutive_local_origin_failures")
        return False

    def report_connect_success(self, host: Host) -> None:
        """A connection to ``host`` succeeded (resets the local-origin streak when split)."""
        if self.settings.split_external_local_origin_errors:
            host.consecutive_local = 0

    def is_ejected(self, host: Host, now: float) -> bool:
        """Whether ``host`` is out of rotation at ``now`` (expired ejections end here)."""
        if host.ejected and now >= self._next_expiry:
            self.expire(now)
        return host.ejected

    def expire(self, now: float) -> bool:
        """End every ejection whose time has passed; ``True`` if any host returned."""
        if now < self._next_expiry:
            return False
        returned = False
        for host in self._hosts:
            if host.ejected and now - host.ejected_at >= self.ejection_duration(host):
                host.ejected = False
                self.ejected_count -= 1
                returned = True
                self._log.info("host returned", host=host.address, ejected=self.ejected_count)
        self._recompute_expiry()
        if returned:
            self.version += 1
        return returned

    def sweep(self, now: float) -> bool:
        """The ``interval`` timer: end expired ejections and decay the multipliers."""
        for host in self._hosts:
            if not host.ejected and host.num_ejections > 0:
                host.num_ejections -= 1
        self._next_expiry = -math.inf
        return self.expire(now)

    def _recompute_expiry(self) -> None:
        self._next_expiry = min(
            (h.ejected_at + self.ejection_duration(h) for h in self._hosts if h.ejected),
            default=math.inf)
