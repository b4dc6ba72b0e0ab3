"""Skip the kind tests, with the reason, unless a kind cluster made by deploy/kind/e2e.sh
is there; otherwise give them a client for it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest

from common.kube import KubeClient, load_config
from tests.kind.support import CLUSTER


def unavailable() -> str | None:
    """Why the kind tests cannot run here, or None."""
    for tool in ("kind", "docker", "kubectl"):
        if shutil.which(tool) is None:
            return (f"{tool} is not on PATH: the kind tests need kind, docker and kubectl "
                    "(deploy/kind/e2e.sh runs them where Docker is)")
    try:
        docker = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s: is the Docker engine running?"
    if docker.returncode != 0:
        return "no Docker engine answers `docker info`: start Docker first"
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True,
                              timeout=30).stdout.split()
    if CLUSTER not in clusters:
        return (f"no kind cluster {CLUSTER!r}: deploy/kind/e2e.sh creates it, installs the "
                "mesh and the test apps, then runs these tests")
    return None


@pytest.fixture(scope="session", autouse=True)
def kind_cluster() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with KubeClient(load_config()) as client:
        yield client
