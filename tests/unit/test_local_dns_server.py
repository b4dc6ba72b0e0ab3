"""The DNS server's UDP and TCP shells over loopback, fed from informer caches."""

from __future__ import annotations

import socket
import struct

import trio

from common.kube import EndpointSlice, Resync, Service
from deploy.local.dns import DnsServer
from deploy.local.informer import Cache, Signal


def _query(name: str, qid: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


async def _server() -> DnsServer:
    signal = Signal()
    services, slices = Cache(Service, signal), Cache(EndpointSlice, signal)
    services.apply(Resync([Service.model_validate({
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}})], "5"))
    slices.apply(Resync([], "5"))
    server = DnsServer(services, slices)
    await server.reconcile()
    return server


async def test_udp_and_tcp_answers_from_the_caches() -> None:
    server = await _server()
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_udp, udp)
        nursery.start_soon(server.serve_tcp, listener)
        with trio.fail_after(5):
            client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await client.sendto(_query("echo.demo.svc.cluster.local", 7), udp.getsockname())
            reply = await client.recv(512)
            assert reply[:2] == b"\x00\x07" and reply[-4:] == bytes([10, 96, 0, 7])
            client.close()

            stream = await trio.open_tcp_stream(*listener.socket.getsockname())
            for qid in (1, 2):  # two queries on one connection
                message = _query("echo.demo.svc.cluster.local", qid)
                await stream.send_all(struct.pack("!H", len(message)) + message)
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
                    data += await stream.receive_some(4096)
                assert data[2:4] == struct.pack("!H", qid) and data[-4:] == bytes([10, 96, 0, 7])
            await stream.aclose()
        nursery.cancel_scope.cancel()
