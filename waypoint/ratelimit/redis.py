"""A minimal Redis client on trio: one connection, one command at a time.

Why not the ``redis`` package: its async client runs on asyncio, not trio.  The
rate limiter needs one script call per request, so a serialized connection with a
short deadline is enough; every failure closes the connection and is raised as
:class:`RateLimitStoreError`.  After a failure the client refuses calls for
``retry_after`` seconds instead of reconnecting per request, so a dead Redis costs
the request path nothing but a clock read (the limiter then applies its fail mode).
"""

from __future__ import annotations

import hashlib

import trio

from common.errors import ProtocolError, RateLimitStoreError
from common.logging import get_logger
from waypoint.ratelimit.resp import RedisReplyError, ReplyParser, encode_command

_log = get_logger("waypoint.ratelimit.redis")

_READ = 4096


class RedisClient:
    def __init__(self, host: str, port: int, *, timeout: float = 0.25,
                 retry_after: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retry_after = retry_after
        self._stream: trio.SocketStream | None = None
        self._parser = ReplyParser()
        self._lock = trio.Lock()
        self._down_until = -1.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def call(self, *parts: bytes | str | int) -> object:
        """Send one command, return its reply (an error reply is returned, not raised)."""
        if trio.current_time() < self._down_until:
            raise RateLimitStoreError(f"Redis at {self.address} failed recently; "
                                      f"retrying after {self.retry_after}s")
        async with self._lock:
            try:
                with trio.fail_after(self.timeout):
                    if self._stream is None:
                        self._stream = await trio.open_tcp_stream(self.host, self.port)
                        self._parser = ReplyParser()
                    await self._stream.send_all(encode_command(*parts))
                    while True:
                        done, reply = self._parser.next_reply()
                        if done:
                            return reply
                        data = await self._stream.receive_some(_READ)
                        if not data:
                            raise RateLimitStoreError(f"Redis at {self.address} closed "
                                                      "the connection")
                        self._parser.feed(data)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError,
                    RateLimitStoreError) as exc:
                await self._fail()
                if isinstance(exc, RateLimitStoreError):
                    raise
                raise RateLimitStoreError(
                    f"Redis at {self.address} did not answer within {self.timeout}s: "
                    f"{exc or type(exc).__name__} (is redis-server running there?)") from exc

    async def eval_script(self, script: str, keys: list[str], args: list[str | int]) -> object:
        """Run a Lua script by its SHA1, loading it on the first ``NOSCRIPT``."""
        sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        reply = await self.call("EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, RedisReplyError) and reply.message.startswith("NOSCRIPT"):
            reply = await self.call("EVAL", script, len(keys), *keys, *args)
        return reply

    async def _fail(self) -> None:
        self._down_until = trio.current_time() + self.retry_after
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
