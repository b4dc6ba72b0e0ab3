"""The conformance case tables, over the wire, through a real waypoint.

Per table: one echo backend (``deploy/local/echo.py``'s server, named after its
service, its VERSION the DestinationRule subset it stands for) per service and
subset on 127.0.0.1, a waypoint serving the table's route objects (bench mode:
plain HTTP downstream, static endpoints, TCP upstreams) on its own socket, and
an HTTP/1.1 client sending each case's request.  What the client sees and what
the echo backends saw (the echo app's JSON answer; mirrored copies recorded at
the backends by request id) becomes the :class:`Observation` that
:func:`tests.conformance.tables.check` judges, exactly as for the in-process
runner.

Not observable over the wire, so not checked here: ``route_name`` (the rule
identity reported to metrics).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from common.tcp import TcpStream
from deploy.local import echo
from tests.conformance.tables import Case, Observation, Table, check, load_tables
from tests.unit.waypoint_helpers import Client
from waypoint.app import Options, Waypoint, bench_config_from
from waypoint.listener import serve_stream
from waypoint.mirror import Mirrorer
from waypoint.proxy import PeerInfo

TABLES = load_tables()
UNOBSERVABLE = ("route_name",)


@dataclass
class Recorder:
    """Every request the echo backends answered: (backend, subset, host, request id)."""

    seen: list[tuple[str, str | None, str, str]] = field(default_factory=list)

    def wrap(self, respond: Any) -> Any:
        def recording(req: echo.EchoRequest, ident: echo.Identity, *args: Any) -> Any:
            rid = next((v for n, v in req.headers if n.lower() == "x-request-id"), "")
            self.seen.append((ident.pod, ident.version or None, req.host, rid))
            return respond(req, ident, *args)
        return recording


def _subsets(table: Table) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Service name -> its DestinationRule subsets (name, labels)."""
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for obj in table.objects:
        if obj["kind"] == "DestinationRule":
            host = str(obj["spec"]["host"]).split(".")[0]
            for subset in obj["spec"].get("subsets", []):
                out.setdefault(host, []).append((subset["name"], dict(subset.get("labels", {}))))
    return out


async def _start_backends(nursery: trio.Nursery, table: Table) -> list[dict[str, Any]]:
    """Echo servers for every service (and subset); the bench-config service list."""
    subsets = _subsets(table)
    services = []
    for svc in table.services:
        endpoints = []
        for subset, labels in subsets.get(svc["name"], [("", {})]):
            server = echo.Server(echo.Identity(pod=svc["name"], namespace=svc["namespace"],
                                               version=subset))
            ports = await nursery.start(echo.serve, [0], server, "127.0.0.1")
            endpoints.append({"address": f"127.0.0.1:{ports[0]}", "labels": labels})
        services.append({"name": svc["name"], "namespace": svc["namespace"],
                         "ports": svc["ports"], "vips": svc.get("vips", []),
                         "endpoints": endpoints})
    return services


async def _serve(nursery: trio.Nursery, waypoint: Waypoint, peer: PeerInfo) -> int:
    """A listener whose connections all get ``peer``; returns its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)

    async def accept_loop() -> None:
        with listener:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                nursery.start_soon(serve_stream, TcpStream(sock), waypoint.proxy,
                                   PeerInfo(source_ip="127.0.0.1", destination=peer.destination,
                                            port=peer.port, source_labels=peer.source_labels,
                                            source_namespace=peer.source_namespace), None)

    nursery.start_soon(accept_loop)
    port: int = listener.getsockname()[1]
    return port


class WireRunner:
    def __init__(self, nursery: trio.Nursery, table: Table, recorder: Recorder) -> None:
        self.nursery = nursery
        self.table = table
        self.recorder = recorder
        self.waypoint = Waypoint(Options(name="waypoint", namespace=table.home_namespace,
                                         access_log=False))
        self.waypoint.proxy.mirror = Mirrorer(nursery)
        self.clients: dict[tuple[Any, ...], Client] = {}

    async def start(self) -> None:
        services = await _start_backends(self.nursery, self.table)
        config = bench_config_from({"namespace": self.table.home_namespace,
                                    "services": services, "objects": list(self.table.objects)})
        await self.waypoint.apply_bench(config)

    async def client(self, case: Case) -> Client:
        req = case.request
        labels = dict(req.get("source_labels", {}))
        key = (req.get("destination"), tuple(sorted(labels.items())))
        client = self.clients.get(key)
        if client is None:
            peer = PeerInfo(source_ip="127.0.0.1", destination=req.get("destination"),
                            source_labels=labels)
            port = await _serve(self.nursery, self.waypoint, peer)
            client = self.clients[key] = Client(await trio.open_tcp_stream("127.0.0.1", port))
        return client

    async def observe(self, case: Case) -> Observation:
        req = case.request
        rid = str(uuid.uuid4())
        headers = [(str(k), str(v)) for k, v in req.get("headers", {}).items()]
        headers.append(("x-request-id", rid))
        headers += [("x-echo-set-header", f"{n}: {v}")
                    for n, v in case.backend_response_headers.items()]
        client = await self.client(case)
        reply = await client.request(str(req.get("path", "/")),
                                     method=str(req.get("method", "GET")),
                                     host=str(req.get("host", "echo")), headers=headers)
        obs = Observation(status=reply.status, response_headers=reply.headers,
                          location=reply.headers.get("location"), body=reply.body)
        if reply.headers.get("content-type") == "application/json" and reply.body:
            doc = json.loads(reply.body)
            obs.backend = doc.get("pod")
            obs.subset = doc.get("version") or None
            obs.path = doc["path"] + (f"?{doc['query']}" if doc.get("query") else "")
            obs.host = doc.get("host")
            obs.request_headers = dict(doc.get("headers", {}))
            obs.status = reply.status
        if "mirrored_to" in case.expected:
            mirror = self.waypoint.proxy.mirror
            assert mirror is not None
            with trio.fail_after(5):
                while mirror.active:  # noqa: ASYNC110 -- the mirrors run in other tasks
                    await trio.sleep(0.005)
            want = [m["backend"] for m in case.expected["mirrored_to"]]
            got = [(b, s, h) for b, s, h, r in self.recorder.seen
                   if r == rid and h.partition(":")[0].endswith("-shadow")]
            got.sort(key=lambda m: want.index(m[0]) if m[0] in want else len(want))
            obs.mirrors = got
        return obs


@pytest.fixture
async def recorder(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Recorder]:
    rec = Recorder()
    monkeypatch.setattr(echo, "respond", rec.wrap(echo.respond))
    monkeypatch.setattr(echo, "_log", lambda *args: None)
    yield rec


async def run_table(table: Table, start_runner: Callable[[trio.Nursery], Awaitable[Any]],
                    transport: str) -> None:
    """Every case of ``table`` through a runner (``observe(case)``) that
    ``start_runner`` starts in a nursery; fails with every case that did not hold."""
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        runner = await start_runner(nursery)
        for case in table.cases:
            expected = {k: v for k, v in case.expected.items() if k not in UNOBSERVABLE}
            wire_case = Case(case.table, case.index, case.name, case.request, expected,
                             case.backend_response_headers)
            observations = [await runner.observe(wire_case) for _ in range(case.samples)]
            problems = check(wire_case, observations)
            if problems:
                failures.append(f"{case.id}: {'; '.join(problems)}")
        nursery.cancel_scope.cancel()
    print(f"\n{table.name}: {len(table.cases) - len(failures)}/{len(table.cases)} cases pass "
          f"over {transport}")
    assert failures == []


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
async def test_table_over_the_wire(table: Table, recorder: Recorder) -> None:
    async def start(nursery: trio.Nursery) -> WireRunner:
        runner = WireRunner(nursery, table, recorder)
        await runner.start()
        return runner
    await run_table(table, start, "the wire")
