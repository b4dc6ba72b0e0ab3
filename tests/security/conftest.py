"""A bench-mode waypoint on loopback for the HTTP attack tests.

The waypoint runs in this process (so memory can be traced) with short downstream
deadlines, in front of one echo backend that records every request it answered; the
recording is how a test proves a smuggled request never reached a backend.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from deploy.local import echo
from waypoint.app import Options, Waypoint, bench_config_from
from waypoint.h1_shell import H1Timeouts

HEADER_TIMEOUT = 0.5
STREAM_IDLE = 1.0
# The shell moves its deadline lazily: a request in progress gets max(stream_idle,
# idle / 2), so idle is 2 x stream_idle to make stream_idle the bound a test sees.


@dataclass
class BenchWaypoint:
    waypoint: Waypoint
    port: int
    seen: list[str] = field(default_factory=list)  # request targets the backend answered
    # The bench document without objects: add "objects" to build another config.
    endpoints: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
async def bench(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
                ) -> AsyncIterator[BenchWaypoint]:
    seen: list[str] = []
    respond = echo.respond

    def recording(req: echo.EchoRequest, ident: echo.Identity, *args: object) -> object:
        seen.append(req.target)
        return respond(req, ident, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(echo, "respond", recording)
    monkeypatch.setattr(echo, "_log", lambda *args: None)
    server = echo.Server(echo.Identity(pod="backend", namespace="bench"))
    ports = await nursery.start(echo.serve, [0], server, "127.0.0.1")
    doc: dict[str, Any] = {
        "namespace": "bench", "destination": "10.96.0.1:80",
        "services": [{"name": "backend", "ports": [80], "vips": ["10.96.0.1"],
                      "endpoints": [{"address": f"127.0.0.1:{ports[0]}"}]}]}
    config = bench_config_from(doc)
    waypoint = Waypoint(Options(name="waypoint", namespace="bench", access_log=False))
    waypoint.timeouts = H1Timeouts(idle=2 * STREAM_IDLE, header=HEADER_TIMEOUT,
                                   stream_idle=STREAM_IDLE)
    await waypoint.apply_bench(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = listener.getsockname()[1]
    await nursery.start(lambda task_status: waypoint.serve_plain(
        listener, destination=config.destination, port=config.port, task_status=task_status))
    yield BenchWaypoint(waypoint, port, seen, doc)
