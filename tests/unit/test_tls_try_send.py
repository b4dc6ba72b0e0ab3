"""TLSStream.try_send: a write that would block leaves the rest to the next send,
which must start with the same bytes (OpenSSL may hold part of a record)."""

from __future__ import annotations

import hashlib
import random
import socket

import pytest
import trio

from common.tls import TLSStream
from tests.unit.test_tls import listener, pki  # noqa: F401  (fixtures)
from tests.unit.test_tls import pair as pair


async def test_try_send_then_send_all_of_the_rest_arrives_intact(
        pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = pair
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = random.Random(9).randbytes(4 * 1024 * 1024)
    taken = client.try_send(payload)
    assert taken < len(payload)  # nobody reads yet: the socket filled up
    received = hashlib.sha256()

    async def receive() -> None:
        count = 0
        while count < len(payload):
            data = await server.receive_some()
            received.update(data)
            count += len(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            rest = memoryview(payload)[taken:]
            rest = rest[client.try_send(rest):]  # a retry with the same bytes: allowed
            await client.send_all(rest)
    assert received.digest() == hashlib.sha256(payload).digest()


async def test_try_send_after_send_eof_is_refused(pair: tuple[TLSStream, TLSStream]) -> None:
    client, _server = pair
    await client.send_eof()
    with pytest.raises(Exception, match="after send_eof"):
        client.try_send(b"x")
