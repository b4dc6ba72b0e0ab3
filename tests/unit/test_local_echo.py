from __future__ import annotations

import json

import httpx
import pytest
import trio

from deploy.local.echo import EchoRequest, Identity, Server, parse_duration, respond, serve

IDENT = Identity(pod="echo-1", namespace="demo", service_account="echo", node="node-0",
                 version="v1")


def _req(target: str = "/", headers: list[tuple[str, str]] | None = None,
         method: str = "GET") -> EchoRequest:
    return EchoRequest(method=method, target=target, host="echo:8080", proto="HTTP/1.1",
                       headers=headers or [], source="10.244.0.5:40000")


@pytest.mark.parametrize(("text", "seconds"), [
    ("200ms", 0.2), ("2s", 2.0), ("1.5s", 1.5), ("3", 3.0), ("1m", 60.0), ("500us", 0.0005)])
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration("soon")


def test_response_reports_identity_request_and_source() -> None:
    resp = respond(_req("/a/b?x=1", [("X-Thing", "1"), ("x-thing", "2")]), IDENT)
    doc = json.loads(resp.body)
    assert resp.status == 200
    assert doc["pod"] == "echo-1" and doc["namespace"] == "demo"
    assert doc["service_account"] == "echo" and doc["node"] == "node-0"
    assert doc["version"] == "v1"
    assert doc["path"] == "/a/b" and doc["query"] == "x=1"
    assert doc["headers"]["x-thing"] == "1,2"
    assert doc["source"] == "10.244.0.5:40000"
    assert ("content-length", str(len(resp.body))) in resp.headers


def test_status_delay_and_set_header_parameters() -> None:
    resp = respond(_req("/?status=418&delay=200ms", [("x-echo-set-header", "X-Out: yes")]), IDENT)
    assert resp.status == 418
    assert resp.delay == pytest.approx(0.2)
    assert ("x-out", "yes") in resp.headers


def test_fail_percent_uses_the_random_draw() -> None:
    assert respond(_req("/?fail=30"), IDENT, rand=lambda: 0.29).status == 503
    assert respond(_req("/?fail=30"), IDENT, rand=lambda: 0.30).status == 200


def test_bad_parameters_answer_400_with_reason() -> None:
    resp = respond(_req("/?status=abc"), IDENT)
    assert resp.status == 400
    assert "error" in json.loads(resp.body)


def test_no_body_for_204_and_head() -> None:
    assert respond(_req("/?status=204"), IDENT).body == b""
    assert respond(_req("/", method="HEAD"), IDENT).body == b""


async def _start(nursery: trio.Nursery, tcp: bool = False) -> int:
    ports: list[int] = await nursery.start(serve, [0], Server(IDENT, tcp_mode=tcp), "127.0.0.1")
    return ports[0]


async def test_http1_keepalive_and_h2c_prior_knowledge_over_loopback() -> None:
    async with trio.open_nursery() as nursery:
        port = await _start(nursery)
        url = f"http://127.0.0.1:{port}/hello?status=201"
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                r = await client.get(url, headers={"x-echo-set-header": "x-a: b"})
                assert r.status_code == 201 and r.headers["x-a"] == "b"
                assert r.json()["proto"] == "HTTP/1.1"
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            # A body past the 65,535-byte windows needs the server's WINDOW_UPDATEs.
            big = await client.post(url, content=b"x" * 100_000)
            assert big.json()["proto"] == "HTTP/2" and big.json()["body_bytes"] == 100_000
            # Concurrent streams keep their bodies inside the connection window together:
            # httpcore 1.0's senders, when several wait for window at once, can each block
            # reading for an update another one already took (a client-side hang, about 3 %
            # of runs), which says nothing about this server.
            replies = []
            async with trio.open_nursery() as inner:
                async def one() -> None:
                    replies.append(await client.post(url, content=b"x" * 12_000))
                for _ in range(4):
                    inner.start_soon(one)
            assert [r.json()["proto"] for r in replies] == ["HTTP/2"] * 4
            assert all(r.json()["body_bytes"] == 12_000 for r in replies)
        nursery.cancel_scope.cancel()


async def test_tcp_mode_echoes_and_half_closes() -> None:
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, tcp=True)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ping")
        await stream.send_eof()
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(1024):
                got += chunk
        assert got == b"ping"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_http1_upgrade_to_h2c_answers_the_upgrading_request_on_stream_1() -> None:
    import h2.connection
    import h2.events

    async with trio.open_nursery() as nursery:
        port = await _start(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = h2.connection.H2Connection()
        settings = client.initiate_upgrade_connection()
        await stream.send_all(
            b"GET /up HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n")
        buf = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        await stream.send_all(client.data_to_send())
        body, status = b"", None
        with trio.fail_after(5):
            events = client.receive_data(rest) if rest else []
            while True:
                for event in events:
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        break
                else:
                    await stream.send_all(client.data_to_send())
                    events = client.receive_data(await stream.receive_some(65536))
                    continue
                break
        assert status == b"200"
        doc = json.loads(body)
        assert doc["proto"] == "HTTP/2" and doc["path"] == "/up"
        await stream.aclose()
        nursery.cancel_scope.cancel()
