"""Upstream hosts of one cluster, with the live counters the decision cores share.

A :class:`Host` is one endpoint (pod IP:port) of a destination.  Its identity
fields are set by discovery; its counters are mutated only by this package's
cores (least-request counts by the picker, failure streaks and ejection by the
outlier detector), always synchronously, so a cancellation between two awaits
in the trio shell cannot leave them half-updated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from common.errors import ConfigError

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Locality:
    """Where a workload runs: ``region/zone/subzone`` (Kubernetes topology labels).

    Empty strings mean "unknown"; Istio treats an unknown level as not matching.
    """

    region: str = ""
    zone: str = ""
    subzone: str = ""

    @classmethod
    def parse(cls, text: str) -> Locality:
        """Parse ``region/zone/subzone`` (any suffix may be missing)."""
        parts = [*text.split("/"), "", "", ""][:3]
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p)


class Host:
    """One upstream endpoint and its shared counters.

    ``weight`` is the endpoint's load-balancing weight (>= 1).  ``labels`` are the
    workload's labels, used by ``failoverPriority``.  Hosts compare by identity.
    """

    __slots__ = (
        "active_requests",
        "address",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected",
        "ejected_at",
        "labels",
        "locality",
        "num_ejections",
        "weight",
    )

    def __init__(self, address: str, *, weight: int = 1, locality: Locality | None = None,
                 labels: Mapping[str, str] | None = None) -> None:
        if weight < 1:
            raise ConfigError(f"endpoint {address}: LB weight must be >= 1, got {weight}")
        self.address = address
        self.weight = weight
        self.locality = locality if locality is not None else Locality()
        self.labels = labels if labels is not None else _EMPTY_LABELS
        self.active_requests = 0
        # Outlier-detection state; see outlier.py.
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejected = False
        self.ejected_at = 0.0
        self.num_ejections = 0

    def __repr__(self) -> str:
        state = " ejected" if self.ejected else ""
        return f"<Host {self.address} w={self.weight} {self.locality}{state}>"
