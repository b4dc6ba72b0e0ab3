"""The pool's connector: errors say what to check (no network: connect_tls is faked)."""

from __future__ import annotations

import ssl

import pytest
import trio

from common import tls
from common.errors import ConnectRefusedError, ConnectTimeoutError
from common.hbone.client import PoolKey, tls_connector
from common.identity import SpiffeId

SOURCE = SpiffeId("cluster.local", "default", "client")


async def _context(source: SpiffeId | None) -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@pytest.mark.parametrize("error", [ConnectRefusedError, ConnectTimeoutError])
async def test_unreachable_hbone_port_names_15008_and_network_policy(
        monkeypatch: pytest.MonkeyPatch, error: type[Exception]) -> None:
    async def refuse(host: str, port: int, ctx: ssl.SSLContext, **kwargs: object) -> None:
        await trio.lowlevel.checkpoint()
        raise error(f"connection to {host}:{port} refused")

    monkeypatch.setattr(tls, "connect_tls", refuse)
    connect = tls_connector(_context)
    with pytest.raises(error, match=r"15008.*NetworkPolicy"):
        await connect(PoolKey(SOURCE, frozenset(), ("10.0.0.7", 15008)))


async def test_other_ports_keep_the_plain_message(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(host: str, port: int, ctx: ssl.SSLContext, **kwargs: object) -> None:
        await trio.lowlevel.checkpoint()
        raise ConnectRefusedError(f"connection to {host}:{port} refused")

    monkeypatch.setattr(tls, "connect_tls", refuse)
    connect = tls_connector(_context)
    with pytest.raises(ConnectRefusedError) as info:
        await connect(PoolKey(SOURCE, frozenset(), ("10.0.0.7", 8080)))
    assert "NetworkPolicy" not in str(info.value)
