"""The conformance case tables again, with the client speaking h2c to the waypoint.

Same runner as ``tests/conformance/test_waypoint_wire.py`` (echo backends, bench-mode
waypoint, the tables' route objects); only the downstream protocol differs, so the
HTTP/2 shell feeds the same pipeline and its HTTP/2 upstream reaches the echo
backends over h2c.  Routing, splitting, header rules, redirects, rewrites, mirrors
and retries must judge the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import trio

from tests.conformance.tables import Case, Table, load_tables
from tests.conformance.test_waypoint_wire import (
    Recorder,
    WireRunner,
    _serve,
    recorder,  # noqa: F401 -- fixture
    run_table,
)
from tests.integration.h2_support import H2Client
from tests.unit.waypoint_helpers import Reply
from waypoint.proxy import PeerInfo

TABLES = load_tables()


class H2Adapter:
    """The HTTP/1.1 test client's ``request`` interface over an h2c connection."""

    def __init__(self, client: H2Client) -> None:
        self.client = client

    async def request(self, path: str = "/", *, method: str = "GET", host: str = "echo",
                      headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Reply:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        h2_headers = [(n.lower().encode(), v.encode()) for n, v in pairs
                      if n.lower() not in ("host", "connection")]
        reply = await self.client.request(method, path, h2_headers, body, authority=host)
        got: dict[str, str] = {}
        for n, v in reply.headers:
            name = n.decode()
            if name.startswith(":"):
                continue
            got[name] = f"{got[name]},{v.decode()}" if name in got else v.decode()
        return Reply(reply.status, got, bytes(reply.body))


class H2WireRunner(WireRunner):
    async def client(self, case: Case) -> H2Adapter:  # type: ignore[override]
        req = case.request
        labels = dict(req.get("source_labels", {}))
        key = (req.get("destination"), tuple(sorted(labels.items())))
        client = self.clients.get(key)
        if client is None:
            peer = PeerInfo(source_ip="127.0.0.1", destination=req.get("destination"),
                            source_labels=labels)
            port = await _serve(self.nursery, self.waypoint, peer)
            h2 = H2Client(await trio.open_tcp_stream("127.0.0.1", port))
            await h2.start(self.nursery)
            client = self.clients[key] = H2Adapter(h2)  # type: ignore[assignment]
        return client  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
async def test_table_over_h2(table: Table, recorder: Recorder) -> None:  # noqa: F811
    async def start(nursery: trio.Nursery) -> H2WireRunner:
        runner = H2WireRunner(nursery, table, recorder)
        await runner.start()
        return runner
    await run_table(table, start, "h2c")
