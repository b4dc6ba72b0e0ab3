"""Egress cores: ServiceEntry VIP auto-allocation, DNS answers for it, REGISTRY_ONLY."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from common.errors import NameResolutionError
from common.kube.objects import KubeObject
from common.service_entries import (
    AUTO_RANGE,
    allocate_addresses,
    registered_addresses,
    resolve_entry_host,
)
from common.translate import translate
from tests.unit.mesh_objects import namespace, pod
from ztunnel.decide import OUTBOUND_POLICY_LABEL, Passthrough, Refused, decide_outbound
from ztunnel.dns.zone import ServiceEntryHosts


def entry(name: str, hosts: list[str], *, ns: str = "demo", resolution: str = "DNS",
          addresses: list[str] | None = None) -> KubeObject:
    spec: dict[str, Any] = {"hosts": hosts, "ports": [{"number": 443, "name": "https",
                                                       "protocol": "TLS"}],
                            "resolution": resolution, "location": "MESH_EXTERNAL"}
    if addresses is not None:
        spec["addresses"] = addresses
    return KubeObject.model_validate({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"}, "spec": spec})


def test_allocation_is_deterministic_per_host_and_in_the_class_e_range() -> None:
    entries = (entry("api", ["api.example.com", "www.example.com"]),
               entry("fixed", ["fixed.example.com"], addresses=["192.0.2.7"]),
               entry("none", ["raw.example.com"], resolution="NONE"),
               entry("wild", ["*.wild.example.com"]))
    first = allocate_addresses(entries)
    again = allocate_addresses(tuple(reversed(entries)))
    by_host = {o.spec["hosts"][0]: o.spec.get("addresses") for o in first}
    assert by_host == {o.spec["hosts"][0]: o.spec.get("addresses") for o in again}
    api, www = by_host["api.example.com"], by_host["www.example.com"]
    assert api and www and api != www
    assert all(ipaddress.ip_address(a[0]) in AUTO_RANGE for a in (api, www))
    assert by_host["fixed.example.com"] == ["192.0.2.7"]
    assert by_host["raw.example.com"] is None and by_host["*.wild.example.com"] is None
    assert registered_addresses(first) == {api[0], www[0], "192.0.2.7"}
    # The DNS proxy's zone answers the allocated address.
    assert ServiceEntryHosts.from_specs(o.spec for o in first).get("api.example.com") == (
        api[0],)


def test_colliding_slots_probe_to_distinct_addresses() -> None:
    many = tuple(entry(f"e{i}", [f"h{i}.example.com"]) for i in range(300))
    addresses = [o.spec["addresses"][0] for o in allocate_addresses(many)]
    assert len(set(addresses)) == 300


def _snapshot(policy: str | None) -> Any:
    labels = {"istio.io/dataplane-mode": "ambient"}
    if policy:
        labels[OUTBOUND_POLICY_LABEL] = policy
    return translate([namespace("demo", **labels), pod("client", ip="10.1.0.1"),
                      entry("api", ["api.example.com"], addresses=["203.0.113.9"])])


def test_registry_only_refuses_unregistered_and_admits_service_entries() -> None:
    rng = random.Random(1)
    snap = _snapshot("REGISTRY_ONLY")
    client = snap.workloads_by_ip["10.1.0.1"]
    refused = decide_outbound(snap, client, "198.51.100.1", 443, rng)
    assert isinstance(refused, Refused)
    assert refused.reason.startswith("REGISTRY_ONLY: 198.51.100.1:443 is not a service")
    assert "add a ServiceEntry" in refused.reason
    assert isinstance(decide_outbound(snap, client, "203.0.113.9", 443, rng), Passthrough)
    open_snap = _snapshot(None)
    assert isinstance(decide_outbound(open_snap, open_snap.workloads_by_ip["10.1.0.1"],
                                      "198.51.100.1", 443, rng), Passthrough)


def test_an_auto_allocated_dns_entry_is_dialled_by_its_host() -> None:
    snap = translate([namespace("demo", **{"istio.io/dataplane-mode": "ambient"}),
                      pod("client", ip="10.1.0.1"), entry("api", ["api.example.com"])])
    (vip,) = snap.service_entries[0].spec["addresses"]
    decision = decide_outbound(snap, snap.workloads_by_ip["10.1.0.1"], vip, 443,
                               random.Random(0))
    assert isinstance(decision, Passthrough) and decision.resolve == "api.example.com"


async def test_resolve_entry_host_names_the_fix_when_it_fails() -> None:
    assert await resolve_entry_host("localhost", 80) in (("127.0.0.1", 80), ("::1", 80))
    with pytest.raises(NameResolutionError, match="does not resolve"):
        await resolve_entry_host("no-such-host.invalid", 80)
