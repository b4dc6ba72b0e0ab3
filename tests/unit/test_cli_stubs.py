from __future__ import annotations

import pytest

from deploy import ambientctl
from waypoint.__main__ import main as waypoint_main
from ztunnel.__main__ import main as ztunnel_main


@pytest.mark.parametrize("main", [ztunnel_main, waypoint_main, ambientctl.main])
def test_entry_points_reject_unknown_arguments(main: object) -> None:
    assert callable(main)
    assert main(["--no-such-flag"]) == 2
    assert main(["--help"]) == 0
