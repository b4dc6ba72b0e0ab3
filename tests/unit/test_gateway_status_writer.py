"""The status writer's shell against the local API server, in process on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from common.errors import KubeApiError
from common.kube import Gateway, KubeClient, KubeConfig, Namespace, Service
from deploy.local.apiserver.server import serve
from tests.integration.conftest import wait_for
from waypoint.gateway_status import GatewayStatusWriter

T = TypeVar("T")
WAYPOINT = {"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[KubeClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, tmp_path / "db.sqlite")
        async with KubeClient(KubeConfig.for_server(f"http://127.0.0.1:{port}")) as kube:
            await kube.create(Namespace.model_validate({"metadata": {"name": "shop"}}))
            await kube.create(Gateway.model_validate(
                {"metadata": {"name": "waypoint", "namespace": "shop"}, "spec": WAYPOINT}))
            yield kube
        nursery.cancel_scope.cancel()


def condition(gw: Gateway, kind: str) -> dict[str, Any]:
    return next(c for c in gw.status.get("conditions") or [] if c["type"] == kind)


async def test_writes_once_ready_then_follows_generation_and_service(
        client: KubeClient) -> None:
    ready = False
    writer = GatewayStatusWriter(client, "shop", "waypoint", ready=lambda: ready)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        # Not ready: nothing written, whatever else is known.
        await client.create(Service.model_validate({
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 15008}]}}))
        await trio.testing.wait_all_tasks_blocked(0.05)  # every event seen and handled
        assert (await client.get(Gateway, "waypoint", "shop")).status.get("addresses") is None
        assert writer.writes == 0

        ready = True

        async def programmed() -> Gateway | None:
            gw = await client.get(Gateway, "waypoint", "shop")
            return gw if gw.status.get("conditions") and \
                condition(gw, "Programmed")["status"] == "True" else None

        gw = await wait_for(programmed, 10, interval=0.02, what="Programmed=True")
        assert gw.status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.9"}]
        assert condition(gw, "Accepted")["observedGeneration"] == gw.metadata.generation == 1
        assert writer.writes == 1

        # A spec change (new generation) is observed.
        await client.patch(Gateway, "waypoint", {"spec": {"listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE"},
            {"name": "extra", "port": 15009, "protocol": "HBONE"}]}}, "shop")

        async def observed() -> Gateway | None:
            gw = await client.get(Gateway, "waypoint", "shop")
            return gw if condition(gw, "Accepted")["observedGeneration"] == 2 else None

        gw = await wait_for(observed, 10, interval=0.02, what="observedGeneration 2")
        assert condition(gw, "Accepted")["reason"] == "ListenersNotValid"
        assert [x["name"] for x in gw.status["listeners"]] == ["mesh", "extra"]

        # The Service going away takes the address and Programmed along.
        await client.delete(Service, "waypoint", "shop")

        async def unaddressed() -> Gateway | None:
            gw = await client.get(Gateway, "waypoint", "shop")
            return gw if condition(gw, "Programmed")["status"] == "False" else None

        gw = await wait_for(unaddressed, 10, interval=0.02, what="Programmed=False")
        assert condition(gw, "Programmed")["reason"] == "AddressNotAssigned"
        assert "addresses" not in gw.status
        # Its own writes come back through the watch and are not written again.
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert writer.writes == 3
        rv = (await client.get(Gateway, "waypoint", "shop")).metadata.resource_version
        assert rv == gw.metadata.resource_version
        nursery.cancel_scope.cancel()


async def test_a_stale_copy_is_refused_and_the_newer_one_written(client: KubeClient) -> None:
    """Two writers (two replicas) racing: both settle on one status, nobody loops."""
    await client.create(Service.model_validate({
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 15008}]}}))
    times = iter(f"2026-11-25T10:00:{s:02d}Z" for s in range(60))
    writers = [GatewayStatusWriter(client, "shop", "waypoint", ready=lambda: True,
                                   clock=lambda: next(times)) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for writer in writers:
            nursery.start_soon(writer.run)

        async def settled() -> Gateway | None:
            gw = await client.get(Gateway, "waypoint", "shop")
            return gw if gw.status.get("conditions") else None

        gw = await wait_for(settled, 10, interval=0.02, what="a status")
        # Both writers now see the stored status as theirs: one more change, one write.
        await client.patch(Gateway, "waypoint", {"metadata": {"labels": {"a": "b"}}}, "shop")
        await trio.testing.wait_all_tasks_blocked(0.05)  # every event seen and handled
        again = await client.get(Gateway, "waypoint", "shop")
        assert again.status == gw.status
        nursery.cancel_scope.cancel()
    # Both patched from the same resourceVersion: one won, the other got 409 and then
    # found the stored status equal to its own.
    assert sum(w.writes for w in writers) == 1


async def test_a_forbidden_write_is_retried_with_backoff_until_granted(
        client: KubeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """RBAC missing (403): the writer keeps trying, boundedly, and succeeds once granted."""
    await client.create(Service.model_validate({
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 15008}]}}))
    refused: list[float] = []
    real_patch = client.patch

    async def patch(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("status") and len(refused) < 3:
            refused.append(trio.current_time())
            raise KubeApiError(403, "Forbidden", "gateways.gateway.networking.k8s.io "
                               "\"waypoint\" is forbidden: cannot patch resource "
                               "\"gateways/status\"")
        return await real_patch(*args, **kwargs)

    monkeypatch.setattr(client, "patch", patch)
    writer = GatewayStatusWriter(client, "shop", "waypoint", ready=lambda: True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)

        async def written() -> Gateway | None:
            gw = await client.get(Gateway, "waypoint", "shop")
            return gw if gw.status.get("conditions") else None

        gw = await wait_for(written, 10, interval=0.02, what="a status after three refusals")
        nursery.cancel_scope.cancel()
    assert len(refused) == 3 and writer.writes == 1
    assert condition(gw, "Programmed")["status"] == "True"
    # Retries wait (backoff, floor 0.05 s), never spin; the first two attempts may be
    # woken by the start-up events instead.
    assert refused[2] - refused[1] >= 0.04, refused
