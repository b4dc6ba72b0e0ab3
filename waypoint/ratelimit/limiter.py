"""The rate-limit stage of the waypoint pipeline (after authorization, before faults).

Theory of operation.  :meth:`RateLimiter.update` compiles the policies of the
route objects (annotation ``ratelimit.pyambient.io/policy``) into a dict keyed by
the object, so a request costs a dict miss when its route has no limit.  For a
limited route the descriptor key is extracted; the local limit (a token bucket
per key, in this process) is checked first, then the global limit (a fixed-window
counter per key in Redis: ``INCR`` and, on the first request of the window,
``PEXPIRE``, in one Lua script so replicas never race).  Over either limit the
request is answered 429 with ``x-ratelimit-limit``, ``-remaining`` and ``-reset``
(seconds).  When Redis cannot answer, ``failMode: open`` lets the request through
and ``closed`` answers 500 (Envoy's default status for a rate-limit service
error, flag ``RLSE``); both are logged and counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from common.errors import ConfigError, RateLimitStoreError
from common.logging import get_logger
from waypoint.ratelimit.bucket import Take, TokenBucket
from waypoint.ratelimit.policy import (
    ANNOTATION,
    FailMode,
    RateLimitPolicy,
    descriptor_key,
    parse_policy,
)
from waypoint.ratelimit.redis import RedisClient

_log = get_logger("waypoint.ratelimit")

LIMITED_BODY = b"local_rate_limited"
GLOBAL_LIMITED_BODY = b"rate limited"
STORE_ERROR_BODY = b"rate limit service unavailable"

#: Returns the counter after the increment and the window's remaining milliseconds.
FIXED_WINDOW_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""

#: Local buckets kept at most; full (idle) buckets are dropped first when over it.
MAX_BUCKETS = 100_000

ObjectKey = tuple[str, str, str]  # kind, namespace, name
Annotated = tuple[str, str, str, Mapping[str, str] | None]  # kind, namespace, name, annotations


@dataclass(frozen=True, slots=True)
class Limited:
    """A local answer in place of forwarding."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    flag: str


def _headers(take: Take) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"x-ratelimit-limit", b"%d" % take.limit),
            (b"x-ratelimit-remaining", b"%d" % take.remaining),
            (b"x-ratelimit-reset", b"%d" % math.ceil(take.reset)))


def policies_from(objects: Iterable[Annotated]
                  ) -> tuple[dict[ObjectKey, RateLimitPolicy], list[str]]:
    """``(kind, namespace, name, annotations)`` -> policies by object, and the problems."""
    out: dict[ObjectKey, RateLimitPolicy] = {}
    issues: list[str] = []
    for kind, namespace, name, notes in objects:
        text = (notes or {}).get(ANNOTATION)
        if text is None:
            continue
        try:
            out[(kind, namespace, name)] = parse_policy(text)
        except ConfigError as exc:
            issues.append(f"{kind} {namespace}/{name}: {exc}")
    return out, issues


def kube_objects(objects: Iterable[Any]) -> Iterator[Annotated]:
    """Adapt :class:`common.kube.objects.KubeObject` values for :func:`policies_from`."""
    for obj in objects:
        meta = obj.metadata
        yield obj.kind, meta.namespace or "", meta.name, meta.annotations


def dict_objects(objects: Iterable[Mapping[str, Any]], namespace: str
                 ) -> Iterator[Annotated]:
    """Adapt plain YAML documents (bench config) for :func:`policies_from`."""
    for obj in objects:
        meta = obj.get("metadata") or {}
        yield (str(obj.get("kind", "")), str(meta.get("namespace", namespace)),
               str(meta.get("name", "")), meta.get("annotations"))


class RateLimiter:
    """Owns the local buckets and the Redis client; one per waypoint process."""

    def __init__(self, redis: RedisClient | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.redis = redis
        self.clock = clock
        self.policies: dict[ObjectKey, RateLimitPolicy] = {}
        self._buckets: dict[tuple[ObjectKey, tuple[str, ...]], TokenBucket] = {}
        #: (route object "kind ns/name", decision) -> count; decision is one of
        #: ok, local_limited, global_limited, store_error_open, store_error_closed.
        self.counts: Counter[tuple[str, str]] = Counter()

    def update(self, policies: dict[ObjectKey, RateLimitPolicy]) -> None:
        """Swap in new policies; a changed policy starts with fresh buckets."""
        old = self.policies
        self.policies = policies
        self._buckets = {k: b for k, b in self._buckets.items()
                         if k[0] in policies and policies[k[0]] == old.get(k[0])}

    async def check(self, kind: str, namespace: str, name: str, headers: Mapping[str, str],
                    path: str, principal: str | None, remote: str) -> Limited | None:
        """None to forward the request, else the answer to give instead."""
        obj = (kind, namespace, name)
        policy = self.policies.get(obj)
        if policy is None:
            return None
        key = descriptor_key(policy, headers, path, principal, remote)
        if key is None:
            return None
        label = f"{kind} {namespace}/{name}"
        if policy.local is not None:
            take = self._bucket(obj, key, policy).take(self.clock())
            if not take.allowed:
                self.counts[(label, "local_limited")] += 1
                return Limited(429, LIMITED_BODY, _headers(take), "RL")
        if policy.global_ is not None:
            limit = policy.global_
            try:
                take = await self._global(obj, key, limit.requests, limit.window)
            except RateLimitStoreError as exc:
                closed = limit.fail_mode is FailMode.CLOSED
                self.counts[(label, "store_error_closed" if closed else "store_error_open")] += 1
                _log.warning("global rate limit store unavailable", route=label,
                             fail_mode=limit.fail_mode.value, reason=str(exc))
                if closed:
                    return Limited(500, STORE_ERROR_BODY, (), "RLSE")
                return None
            if not take.allowed:
                self.counts[(label, "global_limited")] += 1
                return Limited(429, GLOBAL_LIMITED_BODY, _headers(take), "RL")
        self.counts[(label, "ok")] += 1
        return None

    def _bucket(self, obj: ObjectKey, key: tuple[str, ...], policy: RateLimitPolicy
                ) -> TokenBucket:
        bucket = self._buckets.get((obj, key))
        if bucket is None:
            local = policy.local
            assert local is not None
            now = self.clock()
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.idle_since(now)}
            bucket = self._buckets[(obj, key)] = TokenBucket(
                local.max_tokens, local.per_fill, local.fill_interval, now)
        return bucket

    async def _global(self, obj: ObjectKey, key: tuple[str, ...], requests: int,
                      window: float) -> Take:
        if self.redis is None:
            raise RateLimitStoreError("a global rate limit is configured but this waypoint "
                                      "has no Redis (start it with --ratelimit-redis HOST:PORT)")
        redis_key = "pyambient:rl:" + "/".join(obj) + ":" + "\x1f".join(key)
        reply = await self.redis.eval_script(FIXED_WINDOW_SCRIPT, [redis_key],
                                             [max(1, round(window * 1000))])
        if (not isinstance(reply, list) or len(reply) != 2
                or not all(isinstance(v, int) for v in reply)):
            raise RateLimitStoreError(f"Redis at {self.redis.address} answered {reply!r} to "
                                      "the rate-limit script")
        count, ttl_ms = reply
        return Take(count <= requests, requests, max(0, requests - count), ttl_ms / 1000.0)


class RateLimitCollector(Collector):
    """``pyambient_ratelimit_decisions_total{route, decision}`` at scrape time."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("pyambient_ratelimit_decisions",
                                     "Rate-limit decisions by route object and outcome",
                                     labels=("route", "decision"))
        for (route, decision), count in sorted(self.limiter.counts.items()):
            family.add_metric((route, decision), count)
        yield family
