"""TLSStream.try_send: a write that would block leaves the rest to the next send,
which must start with the same bytes (OpenSSL may hold part of a record)."""

from __future__ import annotations

import hashlib
import random
import socket

import pytest
import trio

from common import tls
from common.tls import TLSStream
from tests.unit.test_hbone_fastpath import hbone_pair
from tests.unit.test_tls import listener, pki  # noqa: F401  (fixtures)
from tests.unit.test_tls import pair as pair


async def _receive_into(server: TLSStream, size: int, digest: hashlib._Hash) -> None:
    """Read ``size`` bytes from ``server`` into ``digest``."""
    count = 0
    while count < size:
        data = await server.receive_some()
        digest.update(data)
        count += len(data)


def _offer(client: TLSStream, seed: int, mib: int) -> tuple[bytes, int]:
    """``mib`` MiB offered to ``client`` through a 4 KiB send buffer that nobody reads:
    the payload and what ``try_send`` took of it."""
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = random.Random(seed).randbytes(mib * 1024 * 1024)
    return payload, client.try_send(payload)


async def test_try_send_then_send_all_of_the_rest_arrives_intact(
        pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    payload, taken = _offer(client, seed=9, mib=4)
    assert taken < len(payload)  # nobody reads yet: the socket filled up
    received = hashlib.sha256()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive_into, server, len(payload), received)
            rest = memoryview(payload)[taken:]
            rest = rest[client.try_send(rest):]  # a retry with the same bytes: allowed
            await client.send_all(rest)
    assert received.digest() == hashlib.sha256(payload).digest()


async def test_try_send_after_send_eof_is_refused(pair: tuple[TLSStream, TLSStream]) -> None:
    client, _server = pair
    await client.send_eof()
    with pytest.raises(Exception, match="after send_eof"):
        client.try_send(b"x")


needs_batches = pytest.mark.skipif(tls._libssl is None,
                                   reason="records are batched only with the libssl helper")


@needs_batches
async def test_try_send_takes_one_batch_and_keeps_its_ciphertext_until_sent(
        pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    payload, taken = _offer(client, seed=3, mib=3)
    # One batch is encrypted (1 MiB), more than the socket takes: the rest of its
    # ciphertext stays with the stream, and nothing more is taken until it is out.
    assert taken == 1024 * 1024
    assert client.has_unsent()
    assert client.try_send(memoryview(payload)[taken:]) == 0
    received = hashlib.sha256()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive_into, server, len(payload), received)
            await client.send_all(b"")  # sends what the batch left, and nothing else
            assert not client.has_unsent()
            await client.send_all(memoryview(payload)[taken:])
    assert received.digest() == hashlib.sha256(payload).digest()


@needs_batches
async def test_a_mebibyte_leaves_in_a_few_sends_not_one_per_record(
        pair: tuple[TLSStream, TLSStream], monkeypatch: pytest.MonkeyPatch) -> None:
    client, server = pair
    calls: list[int] = []

    def counting_send(sock: socket.socket, data: memoryview) -> int:
        calls.append(len(data))
        return socket.socket.send(sock, data)

    monkeypatch.setattr(tls, "_raw_send", counting_send)
    payload = random.Random(4).randbytes(1024 * 1024)
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(payload):
            got.extend(await server.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await client.send_all(payload)
    assert got == payload
    # 64 records of 16 KiB: with the socket BIO that was 64 writes.
    assert sum(calls) >= len(payload)
    assert len(calls) <= 16
    # A small send stays on OpenSSL's own socket writes: no copy through memory.
    calls.clear()
    await client.send_all(b"x" * 1024)
    assert calls == []
    assert await server.receive_some() == b"x" * 1024


@needs_batches
async def test_hbone_message_whose_ciphertext_waits_arrives_with_nothing_sent_after_it(
        pair: tuple[TLSStream, TLSStream]) -> None:
    """One 1 MB message through HBONE over a small send buffer, then silence: the fast
    path takes it whole, so only the connection's writer can finish its ciphertext."""
    client, server = pair
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    message = random.Random(5).randbytes(1_000_000)
    async with hbone_pair(client, server) as hbone:
        stream, peer = await hbone.open()
        with trio.fail_after(10):
            await stream.send_all(message)
            received = bytearray()
            while len(received) < len(message):
                received += await peer.receive_some()
    assert received == message
