"""Micro-benchmark: the waypoint's HTTP/1.1 codec against h11, on the same bytes, one core.

One proxy cycle is what the waypoint does per keep-alive request: parse the
client's request, serialize it upstream, parse the upstream's response,
serialize it to the client (hop-by-hop headers stripped both ways, by the same
function for both libraries).  Each library runs that cycle on a wrk-style request
and an nginx-style response (6 headers, 2-byte body); the phases are timed
separately, so the figures read as "request heads parsed + serialized per second"
and "responses parsed + serialized per second".  The body figure is a 4 MiB
Content-Length upload read 256 KiB at a time and re-framed chunked upstream.

    .venv/bin/python bench/h1_micro.py [--seconds 2] [--repeat 3]

Runs alternate between the libraries and the best of ``--repeat`` is reported
(the machine is shared and noisy); throughput is per CPU second of this process.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import h11

from waypoint.http import (
    NEED_DATA,
    Data,
    EndOfMessage,
    RequestHead,
    RequestParser,
    RequestWriter,
    ResponseHead,
    ResponseParser,
    ResponseWriter,
    strip_hop_by_hop,
)

REQUEST = (b"GET / HTTP/1.1\r\n"
           b"Host: 127.0.0.1:8080\r\n"
           b"\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\n"
            b"Server: nginx/1.22.1\r\n"
            b"Date: Wed, 25 Nov 2026 18:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: keep-alive\r\n"
            b"X-Backend: v1\r\n"
            b"\r\n"
            b"ok")

Phases = list[int]  # ns spent: [request parse+serialize, response parse+serialize]


def ours_cycle_factory() -> Callable[[Phases], None]:
    down_parser = RequestParser()
    down_writer = ResponseWriter()
    up_writer = RequestWriter()
    up_parser = ResponseParser()
    clock = time.perf_counter_ns

    def cycle(phases: Phases) -> None:
        t0 = clock()
        down_parser.feed(REQUEST)
        req = down_parser.next_event()
        assert isinstance(req, RequestHead)
        end = down_parser.next_event()
        assert isinstance(end, EndOfMessage)
        up = up_writer.head(req, strip_hop_by_hop(req.headers))
        up_writer.end()
        up_parser.expect_response(req.method)
        t1 = clock()
        up_parser.feed(RESPONSE)
        resp = up_parser.next_event()
        assert isinstance(resp, ResponseHead)
        out = [down_writer.head(resp, req.method, strip_hop_by_hop(resp.headers))]
        while True:
            ev = up_parser.next_event()
            if isinstance(ev, Data):
                out.extend(down_writer.data(ev.data))
            elif isinstance(ev, EndOfMessage):
                out.append(down_writer.end())
                break
            else:
                raise AssertionError(ev)
        assert up_parser.next_event() is NEED_DATA
        t2 = clock()
        phases[0] += t1 - t0
        phases[1] += t2 - t1
        assert up and out

    return cycle


def h11_cycle_factory() -> Callable[[Phases], None]:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    clock = time.perf_counter_ns

    def cycle(phases: Phases) -> None:
        t0 = clock()
        server.receive_data(REQUEST)
        req = server.next_event()
        assert isinstance(req, h11.Request)
        end = server.next_event()
        assert isinstance(end, h11.EndOfMessage)
        up = client.send(h11.Request(method=req.method, target=req.target,
                                     headers=strip_hop_by_hop(list(req.headers))))
        client.send(h11.EndOfMessage())
        t1 = clock()
        client.receive_data(RESPONSE)
        resp = client.next_event()
        assert isinstance(resp, h11.Response)
        out = [server.send(h11.Response(status_code=resp.status_code, reason=resp.reason,
                                        headers=strip_hop_by_hop(list(resp.headers))))]
        while True:
            ev = client.next_event()
            if isinstance(ev, h11.Data):
                out.append(server.send(ev))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(server.send(ev))
                break
            else:
                raise AssertionError(ev)
        server.start_next_cycle()
        client.start_next_cycle()
        t2 = clock()
        phases[0] += t1 - t0
        phases[1] += t2 - t1
        assert up and out

    return cycle


def measure(cycle: Callable[[Phases], None], seconds: float) -> tuple[float, float, float]:
    """Cycles per CPU second, and request / response phases per second."""
    phases = [0, 0]
    for _ in range(200):
        cycle(phases)
    phases = [0, 0]
    count = 0
    gc.collect()
    # CPU time, not wall time: other processes share the two cores.
    start = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(500):
            cycle(phases)
        count += 500
        if time.process_time() >= deadline:
            break
    elapsed = time.process_time() - start
    # The phase timers are wall clocks, which other processes stretch: use them
    # only to split this process's CPU time between the two phases.
    request_share = phases[0] / (phases[0] + phases[1])
    return (count / elapsed, count / (elapsed * request_share),
            count / (elapsed * (1 - request_share)))


BODY_SIZE = 4 * 1024 * 1024
READ_SIZE = 256 * 1024
BODY_HEAD = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BODY_SIZE
BODY_READS = [BODY_HEAD] + [b"x" * READ_SIZE for _ in range(BODY_SIZE // READ_SIZE)]


def ours_body() -> int:
    """Parse a 4 MiB Content-Length body read 256 KiB at a time; re-frame it chunked."""
    parser = RequestParser()
    writer = RequestWriter()
    sent = 0
    for read in BODY_READS:
        parser.feed(read)
        while True:
            ev = parser.next_event()
            if isinstance(ev, RequestHead):
                writer.head(ev, [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
            elif isinstance(ev, Data):
                sent += sum(len(b) for b in writer.data(ev.data))
            elif isinstance(ev, EndOfMessage):
                sent += len(writer.end())
            else:
                break
    return sent


def h11_body() -> int:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    sent = 0
    for read in BODY_READS:
        server.receive_data(read)
        while True:
            ev = server.next_event()
            if isinstance(ev, h11.Request):
                client.send(h11.Request(method=ev.method, target=ev.target, headers=[
                    (b"host", b"a"), (b"transfer-encoding", b"chunked")]))
            elif isinstance(ev, h11.Data | h11.EndOfMessage):
                sent += len(client.send(ev) or b"")
            else:
                break
    return sent


def body_rate(run: Callable[[], int], seconds: float) -> float:
    """MB/s of body parsed and re-framed, per CPU second."""
    count = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        assert run() > BODY_SIZE
        count += 1
    return count * BODY_SIZE / (time.process_time() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cycles = {"h11": h11_cycle_factory(), "pyambient": ours_cycle_factory()}
    bodies = {"h11": h11_body, "pyambient": ours_body}
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cycles}
    body_runs: dict[str, list[float]] = {name: [] for name in cycles}
    # Interleaved, so that both libraries see the same background load.
    for _ in range(args.repeat):
        for name, cycle in cycles.items():
            runs[name].append(measure(cycle, args.seconds))
            body_runs[name].append(body_rate(bodies[name], args.seconds / 2))
    results = {name: tuple(max(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}
    body = {name: max(rs) for name, rs in body_runs.items()}
    print(f"h11 {h11.__version__}, best of {args.repeat} x {args.seconds:g} s, one core")
    print(f"{'':12}{'cycles/s':>12}{'request/s':>12}{'response/s':>12}{'body MB/s':>12}")
    for name, (total, req, resp) in results.items():
        print(f"{name:12}{total:12,.0f}{req:12,.0f}{resp:12,.0f}{body[name]:12,.0f}")
    ours, theirs = results["pyambient"], results["h11"]
    print(f"{'ratio':12}{ours[0] / theirs[0]:11.1f}x{ours[1] / theirs[1]:11.1f}x"
          f"{ours[2] / theirs[2]:11.1f}x{body['pyambient'] / body['h11']:11.1f}x")


if __name__ == "__main__":
    main()
