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
  (bench/hbone_pair.py).  Below 256 KiB the buffer is transient (one read in
  flight), never pinned.  From 256 KiB on, a source with ``receive_into`` is read
  into one buffer of the direction's own, reused: a fresh 1 MiB ``bytes`` per read
  cost an allocation and page faults each time.  That buffer lives as long as the
  direction (an idle connection that once moved bulk keeps it, as ztunnel's grown
  buffers do).
* Tunnel to socket: when the source is an HBONE stream and the sink can write
  synchronously (``try_send``: :class:`common.tcp.TcpStream`), the sink is handed
  to the stream (``set_direct_sink``), so the HBONE reader task writes what arrives
  straight into the socket and this task only wakes for what the socket could
  not take at once.  Use :class:`common.tcp.TcpStream` for plain TCP ends to get it.
* Socket to tunnel: when the source is a :class:`common.tcp.TcpStream` and the sink
  an HBONE stream (``pump_from``), the HBONE connection's poller task reads the socket
  and sends what arrives itself; this task only wakes when the poller hands something
  back (would block, EOF, error) and takes over with its own reads once the source
  proves bulk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from common.errors import MeshError
from common.logging import get_logger
from common.tcp import TcpStream

_log = get_logger("relay")

# (read size, bytes that must have flowed through the direction before growing to it)
_SIZES = ((1024, 0), (16 * 1024, 4 * 1024), (256 * 1024, 256 * 1024),
          (1024 * 1024, 4 * 1024 * 1024))

# From this read size on, a direction reads into a buffer of its own (see above).
_REUSE_FROM = 256 * 1024

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
    # Duck-typed (an HBONE stream into a socket that can write synchronously), so that
    # this module need not import the HBONE package, which uses it.
    direct = getattr(source, "set_direct_sink", None)
    if not callable(getattr(sink, "try_send", None)):
        direct = None
    if direct is not None:
        direct(sink)
    try:
        polled = getattr(sink, "pump_from", None)
        if polled is not None and isinstance(source, TcpStream):
            # Socket to tunnel: the HBONE connection's poller reads for us.
            counter[index], ended = await polled(source)
            if ended:
                await _send_eof(sink)
                return
            level = 2  # handed back because it is busy: bulk-sized reads
        else:
            # An HBONE stream's bytes are already in memory (bounded by its window): small
            # reads would only cut them into pieces.
            level = len(_SIZES) - 1 if hasattr(source, "set_direct_sink") else 0
        await _pump(source, sink, counter, index, level=level, total=counter[index])
    finally:
        if direct is not None:
            direct(None)
            counter[index] += getattr(source, "direct_bytes", 0)
    await _send_eof(sink)


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, counter: list[int],
                index: int, *, level: int, total: int = 0) -> None:
    size = _SIZES[level][0]
    receive = source.receive_some
    receive_into: Callable[[memoryview], Awaitable[int]] | None = getattr(
        source, "receive_into", None)
    buffer: memoryview | None = None
    send = sink.send_all
    while True:
        data: bytes | bytearray | memoryview
        if buffer is not None and receive_into is not None:
            # send_all returns once the bytes are out, so the buffer is free again.
            data = buffer[:await receive_into(buffer)]
        else:
            data = await receive(size)
        if not data:
            return
        await send(data)
        total += len(data)
        counter[index] = total
        if level + 1 < len(_SIZES) and total >= _SIZES[level + 1][1] and len(data) == size:
            level += 1
            size = _SIZES[level][0]
            if receive_into is not None and size >= _REUSE_FROM:
                buffer = memoryview(bytearray(size))


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
