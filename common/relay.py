"""Bidirectional copy between two byte streams, the way ztunnel moves every connection.

* Each direction ends on its own: EOF from one side becomes ``send_eof`` on the
  other, and the opposite direction keeps copying (half-close survives).
* A reset from a peer that is already gone ends the relay quietly (debug log): it is
  how connections end in the real world, not an incident.  Both directions stop then.
* Read size starts at 1 KiB and grows to 16 KiB and then 256 KiB only as a
  direction proves busy, so ten thousand idle connections cost little memory
  (ztunnel's copy buffers do the same).  A direction that keeps filling 256 KiB
  reads for 4 MiB is bulk and moves to 1 MiB reads: in Python the cost is per read,
  not per byte, and this cut the CPU per GiB of an HBONE pair by about 30 %
  (bench/hbone_pair.py).  The buffer is transient (one read in flight), never pinned.
"""

from __future__ import annotations

import trio

from common.errors import MeshError
from common.logging import get_logger

_log = get_logger("relay")

# (read size, bytes that must have flowed through the direction before growing to it)
_SIZES = ((1024, 0), (16 * 1024, 4 * 1024), (256 * 1024, 256 * 1024),
          (1024 * 1024, 4 * 1024 * 1024))

# What a stream raises when its peer went away; from trio streams, TLS or HBONE streams.
_GONE: tuple[type[BaseException], ...] = (
    MeshError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _send_eof(stream: trio.abc.Stream) -> None:
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    else:
        # A stream that cannot half-close: closing is the only way to signal EOF.
        await stream.aclose()


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, counter: list[int],
                index: int) -> None:
    level = 0
    size = _SIZES[0][0]
    total = 0
    receive = source.receive_some
    send = sink.send_all
    while True:
        data = await receive(size)
        if not data:
            break
        await send(data)
        total += len(data)
        counter[index] = total
        if level + 1 < len(_SIZES) and total >= _SIZES[level + 1][1] and len(data) == size:
            level += 1
            size = _SIZES[level][0]
    await _send_eof(sink)


async def relay(a: trio.abc.Stream, b: trio.abc.Stream, *, label: str = "") -> tuple[int, int]:
    """Copy a→b and b→a until both directions ended; return (bytes a→b, bytes b→a).

    Errors from either side (a reset, a broken pipe) stop both directions and are
    logged at debug level; the byte counts so far are still returned.  The caller
    owns and closes both streams.
    """
    counts = [0, 0]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, a, b, counts, 0)
            nursery.start_soon(_copy, b, a, counts, 1)
    except* _GONE as group:
        _log.debug("relay ended by a peer that went away", label=label,
                   reason="; ".join(str(exc) for exc in group.exceptions),
                   sent=counts[0], received=counts[1])
    return counts[0], counts[1]
