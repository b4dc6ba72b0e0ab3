"""Control-plane scale (issue 8, case 6): the mesh snapshot at 10,000 pods.

Builds a snapshot from API objects -- 10,000 pods in 50 namespaces (half of them
ambient) on 20 nodes in 3 zones, 1,000 Services each with an EndpointSlice of 10 pods,
10 waypoints, 500 HTTPRoutes + 500 VirtualServices (kept raw), 50 AuthorizationPolicies --
and reports:

* ``parse``: JSON dicts -> typed objects (what the informers do on a list), for scale;
* ``build``: typed objects -> first snapshot (:func:`common.translate.translate`);
* ``change``: one event applied to a built translator and a new snapshot taken, for a
  pod added, removed, relabelled (leaving the mesh), an EndpointSlice updated, and a
  namespace relabelled (200 pods re-translated);
* ``lookup``: per-request cost of a workload by IP, a service by VIP (the bare dict
  probe), and the whole outbound decision (:func:`ztunnel.decide.decide_outbound`, from
  the packed address ``SO_ORIGINAL_DST`` gives) in a 10-pod mesh against the 10,000-pod
  one, measured alternately, for a working set of 10 destinations and for destinations
  spread over the whole mesh (see :func:`measure_lookups`);
* ``memory``: tracemalloc of the API objects and of translator + snapshot.

Run: ``.venv/bin/python bench/control_scale.py`` (``--quick`` for 2,000 pods,
``--json PATH`` to write the figures).  Times are CPU time of this process (median of
repeats; lookups best of rounds), so other load on the machine shows less.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import socket
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from common.kube.objects import Resource, parse_object
from common.model import Snapshot
from common.translate import MeshTranslator, translate
from ztunnel.decide import decide_outbound

PODS_PER_SERVICE = 10
NAMESPACES = 50
NODES = 20
ZONES = ("a", "b", "c")
WAYPOINTS = 10
POLICIES = 50
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def _meta(name: str, ns: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": "1", **extra}
    if ns is not None:
        meta["namespace"] = ns
    return meta


def _pod_ip(i: int) -> str:
    return f"10.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def mesh_documents(pods: int, routes: int) -> list[dict[str, Any]]:
    """The API objects of a mesh with ``pods`` pods, as JSON documents."""
    docs: list[dict[str, Any]] = []
    for n in range(NODES):
        docs.append({"kind": "Node", "apiVersion": "v1", "metadata": _meta(f"node-{n}", labels={
            "topology.kubernetes.io/region": "eu",
            "topology.kubernetes.io/zone": ZONES[n % len(ZONES)]})})
    for n in range(NAMESPACES):
        labels = dict(AMBIENT) if n % 2 == 0 else {}
        if n < WAYPOINTS:
            labels["istio.io/use-waypoint"] = "waypoint"
        docs.append({"kind": "Namespace", "apiVersion": "v1",
                     "metadata": _meta(f"ns-{n}", labels=labels)})
    for n in range(min(WAYPOINTS, NAMESPACES)):
        ns = f"ns-{n}"
        docs.append({"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
                     "metadata": _meta("waypoint", ns),
                     "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                         {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
        for r in range(2):
            docs.append(_pod_doc(f"waypoint-{r}", ns, f"10.200.{n}.{r + 1}", n + r,
                                 {"gateway.networking.k8s.io/gateway-name": "waypoint"},
                                 "waypoint"))
    services = max(1, pods // PODS_PER_SERVICE)
    for s in range(services):
        ns = f"ns-{s % NAMESPACES}"
        name = f"svc-{s}"
        vip = f"10.96.{s // 256}.{s % 256}"
        docs.append({"kind": "Service", "apiVersion": "v1", "metadata": _meta(name, ns),
                     "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
                              "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        endpoints = []
        for p in range(PODS_PER_SERVICE):
            i = s * PODS_PER_SERVICE + p
            if i >= pods:
                break
            ip = _pod_ip(i)
            docs.append(_pod_doc(f"{name}-{p}", ns, ip, i, {"app": name, "version": "v1"}, name))
            endpoints.append({"addresses": [ip], "conditions": {"ready": True},
                              "nodeName": f"node-{i % NODES}",
                              "targetRef": {"kind": "Pod", "name": f"{name}-{p}",
                                            "namespace": ns, "uid": f"uid-{ns}-{name}-{p}"}})
        docs.append(_slice_doc(name, ns, endpoints))
    for r in range(routes):
        s = r % services
        ns, name = f"ns-{s % NAMESPACES}", f"svc-{s}"
        if r % 2 == 0:
            docs.append({"kind": "HTTPRoute", "apiVersion": "gateway.networking.k8s.io/v1",
                         "metadata": _meta(f"route-{r}", ns),
                         "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name}],
                                  "rules": [{"matches": [{"path": {"type": "PathPrefix",
                                                                   "value": f"/r{r}"}}],
                                             "backendRefs": [{"name": name, "port": 80}]}]}})
        else:
            docs.append({"kind": "VirtualService", "apiVersion": "networking.istio.io/v1",
                         "metadata": _meta(f"vs-{r}", ns),
                         "spec": {"hosts": [name], "http": [{"route": [
                             {"destination": {"host": name}, "weight": 100}]}]}})
    for p in range(POLICIES):
        ns = f"ns-{p % NAMESPACES}"
        docs.append({"kind": "AuthorizationPolicy", "apiVersion": "security.istio.io/v1",
                     "metadata": _meta(f"allow-{p}", ns),
                     "spec": {"selector": {"matchLabels": {"app": f"svc-{p}"}}, "rules": [
                         {"from": [{"source": {"namespaces": [ns, "monitoring"]}}]}]}})
    return docs


def _pod_doc(name: str, ns: str, ip: str, i: int, labels: dict[str, str],
             account: str) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": _meta(name, ns, uid=f"uid-{ns}-{name}", labels=labels),
            "spec": {"nodeName": f"node-{i % NODES}", "serviceAccountName": account,
                     "containers": [{"name": "app", "image": "echo",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _slice_doc(service: str, ns: str, endpoints: list[dict[str, Any]],
               rv: str = "1") -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": _meta(f"{service}-slice", ns, resourceVersion=rv,
                              labels={"kubernetes.io/service-name": service}),
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _timed(fn: Callable[[], object]) -> float:
    """CPU seconds of ``fn()``: on a shared machine, wall time mostly measures the neighbours."""
    start = time.process_time()
    fn()
    return time.process_time() - start


# --- the cases ---------------------------------------------------------------------------------


def measure_build(docs: list[dict[str, Any]], repeats: int
                  ) -> tuple[list[Resource], dict[str, float]]:
    objects: list[Resource] = []
    parse = []
    for _ in range(repeats):
        start = time.process_time()
        objects = [parse_object(dict(d)) for d in docs]
        parse.append(time.process_time() - start)
    build = [_timed(lambda: translate(objects)) for _ in range(repeats)]
    return objects, {"parse_ms": _median_ms(parse), "build_ms": _median_ms(build)}


def _change(tr: MeshTranslator, kind: str, obj: Resource, delete: bool = False) -> float:
    """CPU seconds to apply one event and take the next snapshot."""
    start = time.process_time()
    if delete:
        tr.delete(kind, obj)
    else:
        tr.upsert(kind, obj)
    tr.snapshot()
    return time.process_time() - start


def measure_changes(objects: list[Resource], repeats: int) -> dict[str, float]:
    tr = MeshTranslator()
    for obj in objects:
        tr.upsert(obj.kind, obj)
    tr.snapshot()
    base = parse_object(_pod_doc("svc-7-0", "ns-7", _pod_ip(70), 70, {"app": "svc-7"}, "svc-7"))
    added = parse_object(_pod_doc("extra", "ns-7", "10.250.0.1", 1, {"app": "svc-7"}, "svc-7"))
    results: dict[str, list[float]] = {k: [] for k in (
        "pod_added_ms", "pod_removed_ms", "pod_relabelled_ms", "slice_updated_ms",
        "namespace_relabelled_ms")}
    endpoints = [{"addresses": [_pod_ip(70 + p)], "conditions": {"ready": p % 2 == 0},
                  "nodeName": "node-1"} for p in range(PODS_PER_SERVICE)]
    for r in range(repeats):
        rv = str(1000 + r)
        results["pod_added_ms"].append(_change(tr, "Pod", added))
        results["pod_removed_ms"].append(_change(tr, "Pod", added, delete=True))
        relabelled = base.model_copy(deep=True)
        relabelled.metadata.labels["istio.io/dataplane-mode"] = "none" if r % 2 == 0 else "x"
        relabelled.metadata.resource_version = rv
        results["pod_relabelled_ms"].append(_change(tr, "Pod", relabelled))
        sl = parse_object(_slice_doc("svc-7", "ns-7", endpoints[r % 2:], rv))
        results["slice_updated_ms"].append(_change(tr, "EndpointSlice", sl))
        ns = parse_object({"kind": "Namespace", "apiVersion": "v1", "metadata": _meta(
            "ns-12", labels=dict(AMBIENT) if r % 2 else {}, resourceVersion=rv)})
        results["namespace_relabelled_ms"].append(_change(tr, "Namespace", ns))
    return {k: _median_ms(v) for k, v in results.items()}


def _lookup_loops(snap: Snapshot, working_set: int | None, n: int
                  ) -> dict[str, Callable[[], None]]:
    """Loops of ``n`` lookups over ``working_set`` distinct destinations (None: the whole mesh)."""
    rng = random.Random(3)
    ips = [w.ips[0] for w in snap.workloads_by_uid.values() if w.ips and not w.is_waypoint]
    vips = list(snap.services_by_vip)
    if working_set is not None:
        ips = rng.sample(ips, min(working_set, len(ips)))
        vips = rng.sample(vips, min(working_set, len(vips)))
    ip_keys = [rng.choice(ips) for _ in range(n)]
    vip_keys = [rng.choice(vips) for _ in range(n)]
    sources = [snap.workloads_by_ip[ip] for ip in ip_keys]
    # What a connection hands over: the original destination as packed bytes from
    # SO_ORIGINAL_DST, turned into a new str (no cached hash) per connection.
    packed_vips = [socket.inet_aton(vip) for vip in vip_keys]
    by_ip = snap.workloads_by_ip
    by_vip = snap.services_by_vip
    pick = random.Random(1)

    def workload_by_ip() -> None:
        get = by_ip.get
        for key in ip_keys:
            get(key)

    def service_by_vip() -> None:
        get = by_vip.get
        for key in vip_keys:
            get(key)

    def outbound_decision() -> None:
        ntoa = socket.inet_ntoa
        for source, raw in zip(sources, packed_vips, strict=True):
            decide_outbound(snap, source, ntoa(raw), 80, pick)

    return {"workload_by_ip": workload_by_ip, "service_by_vip": service_by_vip,
            "decide_outbound": outbound_decision}


def measure_lookups(small: Snapshot, large: Snapshot, rounds: int, n: int = 10_000
                    ) -> dict[str, dict[str, float]]:
    """ns per lookup, best of ``rounds`` alternating small/large, and the large/small ratio.

    ``hot10``: both meshes serve the same number (10) of distinct destinations, which
    isolates the size of the mesh; ``spread``: destinations drawn from the whole mesh, so
    the large mesh's working set no longer fits the CPU caches (an effect of the machine's
    memory hierarchy that a per-request path amid other work mostly pays anyway).
    """
    loops: dict[tuple[str, str], dict[str, Callable[[], None]]] = {}
    for pattern, working_set in (("hot10", 10), ("spread", None)):
        loops[("small", pattern)] = _lookup_loops(small, working_set, n)
        loops[("large", pattern)] = _lookup_loops(large, working_set, n)
    best: dict[tuple[str, str, str], float] = {}
    for _ in range(rounds):
        for (size, pattern), named in loops.items():
            for name, loop in named.items():
                elapsed = _timed(loop) / n * 1e9
                key = (size, pattern, name)
                best[key] = min(best.get(key, float("inf")), elapsed)
    out: dict[str, dict[str, float]] = {}
    for pattern in ("hot10", "spread"):
        for name in loops[("small", pattern)]:
            small_ns, large_ns = best[("small", pattern, name)], best[("large", pattern, name)]
            out[f"{name}[{pattern}]"] = {"small_ns": round(small_ns, 1),
                                         "large_ns": round(large_ns, 1),
                                         "ratio": round(large_ns / small_ns, 3)}
    return out


def measure_memory(docs: list[dict[str, Any]]) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    objects = [parse_object(dict(d)) for d in docs]
    after_objects = tracemalloc.get_traced_memory()[0]
    tr = MeshTranslator()
    for obj in objects:
        tr.upsert(obj.kind, obj)
    snap = tr.snapshot()
    after_snapshot = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del snap
    mib = 1024 * 1024
    return {"api_objects_mib": round((after_objects - before) / mib, 1),
            "translator_and_snapshot_mib": round((after_snapshot - after_objects) / mib, 1)}


def run(pods: int = 10_000, routes: int = 1_000, repeats: int = 5) -> dict[str, Any]:
    docs = mesh_documents(pods, routes)
    objects, build = measure_build(docs, max(1, repeats // 2))
    large = translate(objects)
    small = translate(parse_object(dict(d)) for d in mesh_documents(10, 10))
    return {
        "mesh": {"pods": len(large.workloads_by_uid), "services": len(large.services_by_key),
                 "routes": len(large.http_routes) + len(large.virtual_services),
                 "waypoints": len(large.waypoints_by_ref), "objects": len(objects)},
        "build": build,
        "change": measure_changes(objects, repeats * 4),
        "lookup": measure_lookups(small, large, repeats * 3),
        "memory": measure_memory(docs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 pods, fewer repeats")
    parser.add_argument("--pods", type=int, default=None)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    pods = args.pods or (2_000 if args.quick else 10_000)
    routes = 200 if args.quick else 1_000
    figures = run(pods, routes, repeats=3 if args.quick else 5)
    mesh = figures["mesh"]
    print(f"mesh: {mesh['pods']} pods, {mesh['services']} services, {mesh['routes']} routes, "
          f"{mesh['waypoints']} waypoints ({mesh['objects']} API objects)")
    print(f"parse JSON -> objects   {figures['build']['parse_ms']:>10.1f} ms")
    print(f"build first snapshot    {figures['build']['build_ms']:>10.1f} ms")
    for name, ms in figures["change"].items():
        print(f"change: {name:<24} {ms:>8.3f} ms")
    for name, row in figures["lookup"].items():
        print(f"lookup: {name:<24} 10 pods {row['small_ns']:>8.1f} ns   {mesh['pods']} pods "
              f"{row['large_ns']:>8.1f} ns   ratio {row['ratio']:.2f}x")
    for name, mib in figures["memory"].items():
        print(f"memory: {name:<28} {mib:>8.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
