"""Micro-benchmark: authorization cost per check with few vs many policies elsewhere in the mesh.

The destination (``foo``, ``app=httpbin``) always has the same policies: a mesh-wide
DENY that does not match, a namespace DENY and two ALLOWs (the request matches the
second), plus a selector ALLOW.  Around them the mesh holds N policies in other
namespaces, half namespace-wide and half selecting ``app=httpbin`` (the same label, so
a label index that ignored namespaces would pay for them).  A flat ns/eval from N=10 to
N=10,000 shows the check does not scan the mesh.

Run: ``.venv/bin/python bench/authz_micro.py`` (one line per N; CPU ns per call, best of 5,
including the benchmark loop's own call overhead).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from common.authz.compile import PolicyObject, compile_authorization_policies
from common.authz.evaluate import check_connection, check_request
from common.authz.model import GatewayRef, RequestContext, ServiceRef, WorkloadRef
from common.identity import SpiffeId

GATEWAY = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def _destination_policies() -> list[PolicyObject]:
    from_bar = {"from": [{"source": {"namespaces": ["bar"], "ipBlocks": ["10.0.0.0/8"]}}],
                "to": [{"operation": {"ports": ["8080"]}}]}
    return [
        PolicyObject("istio-system", "mesh-deny", {"action": "DENY", "rules": [
            {"from": [{"source": {"ipBlocks": ["192.0.2.0/24"]}}]}]}),
        PolicyObject("foo", "deny-dev", {"action": "DENY", "rules": [
            {"from": [{"source": {"namespaces": ["dev", "test*"]}}]}]}),
        PolicyObject("foo", "allow-monitoring", {"rules": [
            {"from": [{"source": {"namespaces": ["monitoring"]}}]}]}),
        PolicyObject("foo", "allow-bar", {"rules": [from_bar]}),
        PolicyObject("foo", "httpbin-admin", {"selector": {"matchLabels": {"app": "httpbin"}},
                                              "rules": [{"from": [{"source": {
                                                  "principals": ["*/sa/admin"]}}]}]}),
        PolicyObject("foo", "wp-deny-admin", {"targetRefs": [GATEWAY], "action": "DENY",
                                              "rules": [{"to": [{"operation": {
                                                  "paths": ["/admin*"]}}]}]}),
        PolicyObject("foo", "wp-allow-get", {"targetRefs": [GATEWAY], "rules": [
            {"from": [{"source": {"namespaces": ["bar"]}}],
             "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/{**}"]}}]}]}),
    ]


def _elsewhere(count: int) -> list[PolicyObject]:
    out = []
    for i in range(count):
        ns = f"ns{i}"
        spec: dict[str, Any] = {"rules": [{"from": [{"source": {"namespaces": [ns]}}]}]}
        if i % 2:
            spec["selector"] = {"matchLabels": {"app": "httpbin"}}
        if i % 3 == 0:
            spec = {"targetRefs": [GATEWAY], **spec}
            spec.pop("selector", None)
        out.append(PolicyObject(ns, f"p{i}", spec))
    return out


def _per_call_ns(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    """Best of ``repeats`` runs, in CPU time: the machine is shared, wall time is noisy."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time_ns()
        for _ in range(iterations):
            fn()
        best = min(best, (time.process_time_ns() - start) / iterations)
    return best


_WORKLOAD = WorkloadRef("foo", {"app": "httpbin", "version": "v1"})
_CLIENT = SpiffeId("cluster.local", "bar", "client")
_CONN = RequestContext(source_identity=_CLIENT, source_ip=ip_address("10.1.2.3"),
                       destination_ip=ip_address("10.0.0.2"), destination_port=8080)
_REQUEST = RequestContext(source_identity=_CLIENT, source_ip=ip_address("10.1.2.3"),
                          destination_ip=ip_address("10.0.0.2"), destination_port=8080,
                          method="GET", host="httpbin.foo", path="/api/v1/items?x=1")
_GATEWAY, _SERVICE = GatewayRef("foo", "waypoint"), ServiceRef("foo", "httpbin")


def measure(count: int, iterations: int) -> str:
    """One result line for ``count`` policies elsewhere in the mesh."""
    objects = _destination_policies() + _elsewhere(count)
    start = time.perf_counter()
    cfg = compile_authorization_policies(objects)
    compile_s = time.perf_counter() - start
    assert not cfg.issues, cfg.issues
    decision = check_connection(cfg.ztunnel, _WORKLOAD, _CONN)
    assert decision.allowed and decision.policy == "foo/allow-bar", decision
    l7_decision = check_request(cfg.waypoint, _GATEWAY, _SERVICE, _REQUEST)
    assert l7_decision.allowed and l7_decision.policy == "foo/wp-allow-get", l7_decision
    serial = iter(range(10**12))

    def l4_check() -> object:
        return check_connection(cfg.ztunnel, _WORKLOAD, _CONN)

    def l7_check() -> object:
        return check_request(cfg.waypoint, _GATEWAY, _SERVICE, _REQUEST)

    def l4_uncached() -> object:
        # A label set never seen before: the index lookup runs instead of the memo.
        fresh = WorkloadRef("foo", {"app": "httpbin", "pod": str(next(serial))})
        return cfg.ztunnel.for_workload(fresh)

    return (f"policies_elsewhere={count:>6} compile_s={compile_s:7.3f} "
            f"l4_ns_per_eval={_per_call_ns(l4_check, iterations):7.0f} "
            f"l4_uncached_lookup_ns={_per_call_ns(l4_uncached, iterations // 4):7.0f} "
            f"l7_ns_per_eval={_per_call_ns(l7_check, iterations):7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--iterations", type=int, default=100_000)
    args = parser.parse_args()
    for count in args.counts:
        print(measure(count, args.iterations))


if __name__ == "__main__":
    main()
