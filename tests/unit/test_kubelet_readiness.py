"""Where the local kubelet probes a container's readiness (pure part of deploy.local.kubelet)."""

from __future__ import annotations

from typing import Any

from common.kube.objects import Container
from deploy.local.kubelet import readiness_target


def container(**extra: Any) -> Container:
    return Container.model_validate({
        "name": "c", "command": ["python", "-m", "x"],
        "ports": [{"name": "status-port", "containerPort": 15021},
                  {"name": "mesh", "containerPort": 15008}], **extra})


def test_http_get_readiness_probe_is_asked_on_its_port_and_path() -> None:
    c = container(readinessProbe={"httpGet": {"path": "/healthz/ready", "port": 15021}})
    assert readiness_target(c, [15021, 15008]) == ([15021], "/healthz/ready")


def test_named_probe_port_resolves_through_the_container_ports() -> None:
    c = container(readinessProbe={"httpGet": {"path": "/ready", "port": "mesh"}})
    assert readiness_target(c, [15021, 15008]) == ([15008], "/ready")


def test_without_an_http_probe_the_first_port_is_connected_to() -> None:
    assert readiness_target(container(), [15021, 15008]) == ([15021], None)
    unknown = container(readinessProbe={"httpGet": {"path": "/", "port": "nope"}})
    assert readiness_target(unknown, [15021]) == ([15021], None)
