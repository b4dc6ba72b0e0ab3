"""atheris fuzz target for the HBONE server's frame handling (not part of the pytest suite).

    .venv/bin/python tests/fuzz/fuzz_hbone_frames.py -max_total_time=60 -max_len=8192

Drives :class:`common.hbone.protocol.H2Protocol` (server side, the sans-I/O core behind
every HBONE listener) with a client preface followed by fuzzer-built frames: any type,
flags and stream id, lengths that may lie, a valid CONNECT header block now and then
(so DATA, RST_STREAM and WINDOW_UPDATE meet open streams), fed in arbitrary cuts, with
the application collecting output and acknowledging data at arbitrary points.

Checks: only :class:`common.errors.ProtocolError` escapes; after one, nothing else is
accepted silently; data delivered to a stream never exceeds what its window allows
before an acknowledgement; the frame reassembly buffer never holds more than one
maximal frame; output waiting for the writer stays bounded.
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports():
    import h2.events
    import hpack

    from common.errors import ProtocolError
    from common.hbone.protocol import (
        MAX_FRAME_SIZE,
        MAX_OWED_ACKS,
        STREAM_WINDOW,
        DataChunk,
        H2Protocol,
    )

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_CONNECT = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
# Output owed to a peer that is not read: ACKs (bounded by MAX_OWED_ACKS), answers to
# requests and resets; generous, but finite.
_OUTPUT_BOUND = 64 * MAX_OWED_ACKS + 4 * 1024 * 1024


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    length = len(payload)
    return struct.pack(">HBBBL", length >> 8, length & 0xFF, ftype, flags, stream_id) + payload


def build(fdp: atheris.FuzzedDataProvider) -> bytes:
    out = [PREFACE, frame(0x4, 0, 0, b"")]
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        choice = fdp.ConsumeIntInRange(0, 5)
        stream_id = fdp.ConsumeIntInRange(0, 9)
        if choice == 0:  # a valid CONNECT on an odd stream
            out.append(frame(0x1, 0x4, stream_id | 1, _CONNECT))
        elif choice == 1:  # DATA, maybe padded, maybe END_STREAM
            size = fdp.ConsumeIntInRange(0, 2048)
            flags = fdp.ConsumeIntInRange(0, 0xFF) & 0x9
            body = b"x" * size
            if flags & 0x8:
                body = bytes([fdp.ConsumeIntInRange(0, 255)]) + body
            out.append(frame(0x0, flags, stream_id, body))
        elif choice == 2:  # raw bytes: lying lengths, unknown types, truncation
            out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        else:  # any frame type with a small payload
            ftype = fdp.ConsumeIntInRange(0, 12)
            out.append(frame(ftype, fdp.ConsumeIntInRange(0, 0xFF), stream_id,
                             fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))))
    return b"".join(out)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    wire = build(fdp)
    server = H2Protocol(client_side=False)
    delivered: dict[int, int] = {}
    pos = 0
    failed = False
    while pos < len(wire):
        step = fdp.ConsumeIntInRange(1, 4096) if fdp.remaining_bytes() else len(wire)
        piece = wire[pos:pos + step]
        pos += step
        try:
            events = server.receive_data(piece)
        except ProtocolError:
            failed = True
            break
        for event in events:
            if isinstance(event, DataChunk):
                delivered[event.stream_id] = delivered.get(event.stream_id, 0) + len(event.data)
                assert delivered[event.stream_id] <= STREAM_WINDOW, delivered
                if fdp.ConsumeBool():
                    server.acknowledge(event.stream_id, len(event.data))
                    delivered[event.stream_id] -= len(event.data)
            elif isinstance(event, h2.events.RequestReceived) and fdp.ConsumeBool():
                server.send_response(event.stream_id, 200, end_stream=False)
        assert len(server._partial) <= 9 + MAX_FRAME_SIZE
        if fdp.ConsumeBool():
            server.data_to_send()
        else:
            pending = sum(len(p) for p in server._out)
            assert pending <= _OUTPUT_BOUND, pending
    if failed:
        # The GOAWAY is queued for the writer; the connection is over.
        assert server.closed or server.goaway_sent or server.has_output()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
