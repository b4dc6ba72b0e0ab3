"""The one writer of an HTTP/2 connection, shared by the h2c server and client sides.

Many stream tasks queue frames on one ``h2`` connection object; their bytes must reach
the socket whole (never interleaved mid-write) and, for speed, in as few writes as
possible.
"""

from __future__ import annotations

import h2.connection
import trio


class FrameWriter:
    """Sends what ``conn`` has queued, under one lock, coalescing concurrent callers."""

    def __init__(self, conn: h2.connection.H2Connection, stream: trio.abc.SendStream) -> None:
        self.conn = conn
        self.stream = stream
        #: Held by anyone writing to ``stream`` (also hand-written frames such as GOAWAY).
        self.lock = trio.Lock()
        self._queued = False

    async def flush(self) -> None:
        # The first caller yields once so that other ready tasks queue their frames too,
        # then sends them all in one write; callers meanwhile leave it to that one.
        if self._queued:
            await trio.lowlevel.checkpoint()
            return
        self._queued = True
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._queued = False
        async with self.lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)
