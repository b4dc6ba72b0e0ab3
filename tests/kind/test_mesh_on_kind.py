"""The local-cluster scenarios on a real Kubernetes cluster (kind): mTLS between nodes,
enrolment by label, the waypoint's own Gateway status, waypoint 90/10, retries, fault
injection, L4 and L7 policy.

deploy/kind/e2e.sh sets the cluster up (mesh, test apps from manifests/apps.yaml, the
namespace's waypoint) and runs these; each test applies its own routes or policies and
removes them again.  Skipped, with the reason, where kind or Docker is missing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from common.kube import Gateway, KubeClient, Namespace, Service
from tests.kind.support import (
    LATE_NAMESPACE,
    NAMESPACE,
    WAYPOINT,
    apply,
    counter,
    delete,
    enrolled_pods,
    eventually,
    gateway_status_problems,
    pod_of,
    probe,
    ztunnel_get,
)

pytestmark = pytest.mark.kind

ECHO = f"http://echo.{NAMESPACE}.svc.cluster.local"  # through the waypoint
ECHO_L4 = f"http://echo-l4.{NAMESPACE}.svc.cluster.local"  # ztunnel to ztunnel only


@asynccontextmanager
async def applied(name: str) -> AsyncIterator[None]:
    """Apply one of tests/kind/manifests; delete it again afterwards."""
    await apply(name)
    try:
        yield
    finally:
        await delete(name)


def _ok(answers: list[dict[str, Any]]) -> int:
    return sum(1 for a in answers if a["status"] == 200)


def _versions(answers: list[dict[str, Any]]) -> list[str]:
    """The echo version of each successful answer."""
    return [str(a["body"]["version"]) for a in answers if a["status"] == 200]


async def test_cross_node_traffic_is_mutual_tls_and_keeps_the_source_ip(
        kube: KubeClient) -> None:
    client = await pod_of(kube, NAMESPACE, "client")
    echo = await pod_of(kube, NAMESPACE, "echo")
    assert client.spec.node_name != echo.spec.node_name
    server_node = str(echo.spec.node_name)
    before = counter(await ztunnel_get(kube, server_node, 15020, "/metrics"),
                     "istio_tcp_connections_opened", reporter="destination",
                     security_policy="mutual_tls")
    answers = await probe(f"http://{echo.status.pod_ip}:8080/direct", 5)
    assert _ok(answers) == 5, answers
    assert {str(a["body"]["source"]).rsplit(":", 1)[0] for a in answers} == \
        {client.status.pod_ip}
    after = counter(await ztunnel_get(kube, server_node, 15020, "/metrics"),
                    "istio_tcp_connections_opened", reporter="destination",
                    security_policy="mutual_tls")
    assert after - before >= 5, "the server's ztunnel saw fewer mTLS connections than sent"


async def test_enrolment_by_namespace_label(kube: KubeClient) -> None:
    late = await pod_of(kube, LATE_NAMESPACE, "late")
    node = str(late.spec.node_name)
    assert late.metadata.name not in await enrolled_pods(kube, node)
    ns = await kube.get(Namespace, LATE_NAMESPACE)
    await kube.patch(Namespace, LATE_NAMESPACE, {"metadata": {"labels": {
        "istio.io/dataplane-mode": "ambient"}, "resourceVersion": ns.metadata.resource_version}})
    try:
        async def enrolled() -> bool | None:
            return True if late.metadata.name in await enrolled_pods(kube, node) else None
        await eventually(enrolled, f"ztunnel on {node} to enrol {late.metadata.name}")
        assert _ok(await probe(f"http://late.{LATE_NAMESPACE}.svc.cluster.local/", 3)) == 3
    finally:
        await kube.patch(Namespace, LATE_NAMESPACE, {"metadata": {"labels": {
            "istio.io/dataplane-mode": None}}})

    async def released() -> bool | None:
        return True if late.metadata.name not in await enrolled_pods(kube, node) else None
    await eventually(released, f"ztunnel on {node} to release {late.metadata.name}")
    assert _ok(await probe(f"http://late.{LATE_NAMESPACE}.svc.cluster.local/", 3)) == 3


async def test_waypoint_writes_its_gateway_status(kube: KubeClient) -> None:
    # e2e.sh applied the waypoint with --wait, so the status is there before any test runs.
    gateway = await kube.get(Gateway, WAYPOINT, NAMESPACE)
    service = await kube.get(Service, WAYPOINT, NAMESPACE)
    ips = service.spec.cluster_ips or [str(service.spec.cluster_ip)]
    raw = gateway.model_dump(by_alias=True, mode="json")
    assert gateway_status_problems(raw, ips) == [], raw.get("status")


async def test_waypoint_splits_90_10() -> None:
    async with applied("route-split.yaml"):
        async def programmed() -> bool | None:
            answers = await probe(ECHO + "/warm", 10, headers={"x-route-probe": "1"})
            return True if _versions(answers) == ["v2"] * 10 else None
        await eventually(programmed, "the HTTPRoute to reach the waypoint")
        answers = await probe(ECHO + "/split", 200)
        assert _ok(answers) == 200
        counts = Counter(_versions(answers))
        # Binomial(200, 0.1): mean 20, sd 4.2; 6..40 fails about once in 10^5 runs.
        assert 6 <= counts["v2"] <= 40, counts


async def test_waypoint_retries_5xx() -> None:
    async with applied("retries.yaml"):
        async def routed() -> bool | None:
            # Without the VirtualService the Service balances over v1 and v2.
            answers = await probe(ECHO + "/warm", 10)
            return True if _versions(answers) == ["v1"] * 10 else None
        await eventually(routed, "the VirtualService to reach the waypoint")
        answers = await probe(ECHO + "/flaky?fail=50", 100)
        # 4 tries at 50 %: about 6 of 100 fail; without retries about 50 would.
        assert _ok(answers) >= 80, Counter(a["status"] for a in answers)


async def test_waypoint_injects_an_abort() -> None:
    async with applied("fault.yaml"):
        async def faulting() -> bool | None:
            answers = await probe(ECHO + "/fault", 1, headers={"x-fault": "abort"})
            return True if answers[0]["status"] == 418 else None
        await eventually(faulting, "the fault to be injected")
        assert {a["status"] for a in await probe(ECHO + "/fault", 10,
                                                 headers={"x-fault": "abort"})} == {418}
        assert _ok(await probe(ECHO + "/plain", 5)) == 5


async def test_l4_policy_admits_only_the_named_identity() -> None:
    async with applied("policy-l4.yaml"):
        async def denying() -> bool | None:
            answers = await probe(ECHO_L4 + "/", 1, source="deploy/other")
            return True if answers[0]["status"] == 0 else None
        await eventually(denying, "ztunnel to enforce the L4 policy")
        assert _ok(await probe(ECHO_L4 + "/", 5, source="deploy/other")) == 0
        assert _ok(await probe(ECHO_L4 + "/", 5)) == 5


async def test_l7_policy_allows_get_and_denies_post() -> None:
    async with applied("policy-l7.yaml"):
        async def denying() -> bool | None:
            answers = await probe(ECHO + "/", 1, method="POST")
            return True if answers[0]["status"] == 403 else None
        await eventually(denying, "the waypoint to enforce the L7 policy")
        assert _ok(await probe(ECHO + "/", 5)) == 5
        assert {a["status"] for a in await probe(ECHO + "/", 5, method="POST")} == {403}
