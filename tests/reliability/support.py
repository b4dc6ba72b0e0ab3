"""Small clients of the reliability suite (loopback only)."""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_get(port: int, path: str, host: str = "backend", within: float = 10.0) -> Reply:
    """One ``Connection: close`` GET to 127.0.0.1:``port``, read to EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = bytearray()
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                              f"Connection: close\r\n\r\n".encode())
        with trio.fail_after(within):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split(" ", 2)[1]), headers, body)
