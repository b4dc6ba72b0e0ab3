"""Fixtures of the reliability suite: the bench-mode waypoint of tests/security,
shared by import, not copied."""

from tests.security.conftest import bench

__all__ = ["bench"]
