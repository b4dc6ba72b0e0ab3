"""atheris fuzz target for the HTTP/1.1 parser (not part of the pytest suite).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_h1.py -max_total_time=300 -max_len=4096

Checks, for any bytes split at any step: only Http1Error escapes; held bytes stay
within the limits; every request that parses re-serializes and parses back to
the same head (the writer never emits what the parser would read differently).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from common.errors import Http1Error
    from waypoint.http import (
        NEED_DATA,
        PAUSED,
        Data,
        EndOfMessage,
        H1Limits,
        RequestHead,
        RequestParser,
        RequestWriter,
        ResponseParser,
    )

LIMITS = H1Limits(max_line=256, max_head_bytes=1024, max_headers=16, max_chunk_line=64,
                  max_trailer_bytes=256, max_body=1 << 20)
BOUND = max(LIMITS.max_head_bytes, LIMITS.max_trailer_bytes, LIMITS.max_chunk_line)


def _reparse(head: RequestHead) -> None:
    headers = [(n, v) for n, v in head.headers
               if n not in (b"content-length", b"transfer-encoding")]
    wire = RequestWriter().head(RequestHead(method=head.method, target=head.target,
                                            headers=headers, version=head.version))
    parser = RequestParser(LIMITS)
    parser.feed(wire)
    again = parser.next_event()
    assert isinstance(again, RequestHead), again
    assert (again.method, again.target, again.headers) == (head.method, head.target, headers)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    responses = fdp.ConsumeBool()
    eof = fdp.ConsumeBool()
    step = fdp.ConsumeIntInRange(1, 97)
    wire = fdp.ConsumeBytes(fdp.remaining_bytes())
    parser: RequestParser | ResponseParser
    if responses:
        parser = ResponseParser(LIMITS)
        for method in (b"GET", b"HEAD", b"GET", b"CONNECT", b"GET"):
            parser.expect_response(method)
    else:
        parser = RequestParser(LIMITS)
    try:
        for at in range(0, len(wire), step):
            parser.feed(wire[at:at + step])
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    assert parser.buffered <= BOUND, parser.buffered
                    break
                if ev is PAUSED:
                    return
                if isinstance(ev, RequestHead):
                    _reparse(ev)
                assert not isinstance(ev, Data) or len(ev.data) > 0
                assert not isinstance(ev, EndOfMessage) or isinstance(ev.trailers, list | tuple)
        if eof:
            parser.feed_eof()
            while parser.events():
                pass
    except Http1Error:
        assert parser.must_close


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
