"""Fixtures of the reliability suite: the local cluster (tests/integration) and the
bench-mode waypoint (tests/security), shared by import, not copied."""

from tests.integration.conftest import cluster, kube, namespace
from tests.security.conftest import bench

__all__ = ["bench", "cluster", "kube", "namespace"]
