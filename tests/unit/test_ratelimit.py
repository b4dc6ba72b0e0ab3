"""Rate limiting cores: token bucket, annotation schema, descriptors, RESP, the limiter stage."""

from __future__ import annotations

import pytest

from common.errors import ConfigError, ProtocolError, RateLimitStoreError
from waypoint.ratelimit.bucket import TokenBucket
from waypoint.ratelimit.limiter import RateLimiter, dict_objects, policies_from
from waypoint.ratelimit.policy import ANNOTATION, FailMode, descriptor_key, parse_policy
from waypoint.ratelimit.redis import RedisClient
from waypoint.ratelimit.resp import RedisReplyError, ReplyParser, encode_command


def test_bucket_allows_max_tokens_then_refills_whole_fills() -> None:
    bucket = TokenBucket(3, 2, 10.0, now=100.0)
    assert [bucket.take(100.0).allowed for _ in range(4)] == [True, True, True, False]
    refused = bucket.take(105.0)
    assert not refused.allowed and refused.remaining == 0 and refused.reset == pytest.approx(5.0)
    assert [bucket.take(110.0).allowed for _ in range(3)] == [True, True, False]
    # Fills never exceed max_tokens.
    assert bucket.take(1000.0).remaining == 2


def test_bucket_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 1.0, now=0.0)


def test_policy_parses_the_documented_example() -> None:
    policy = parse_policy("""
descriptors: [{header: x-user}, {sourceIdentity: true}, {path: true}, {remoteAddress: true}]
local: {maxTokens: 10, fillInterval: 1m}
global: {requests: 100, window: 60s, failMode: closed}
""")
    assert policy.local is not None and policy.local.per_fill == 10
    assert policy.local.fill_interval == 60.0
    assert policy.global_ is not None and policy.global_.fail_mode is FailMode.CLOSED
    assert len(policy.descriptors) == 4


@pytest.mark.parametrize("text, words", [
    ("descriptors: []", "needs a 'local' or a 'global'"),
    ("global: {requests: 0}", "global.requests"),
    ("local: {maxTokens: 1, fillInterval: 0s}", "positive duration"),
    ("global: {requests: 1}\ndescriptors: [{path: true, header: a}]", "exactly one"),
    ("global: {requests: 1, burst: 3}", "global.burst"),
    ("[1, 2]", "must be a mapping"),
])
def test_policy_errors_name_the_field(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_policy(text)


def test_descriptor_key_in_order_and_missing_header_is_not_limited() -> None:
    policy = parse_policy("descriptors: [{header: X-User}, {path: true}, {remoteAddress: true},"
                          " {sourceIdentity: true}]\nlocal: {maxTokens: 1, fillInterval: 1s}")
    key = descriptor_key(policy, {"x-user": "ann"}, "/a?b=1", "spiffe://td/ns/a/sa/b",
                         "10.0.0.1")
    assert key == ("ann", "/a", "10.0.0.1", "spiffe://td/ns/a/sa/b")
    assert descriptor_key(policy, {}, "/a", "id", "10.0.0.1") is None
    assert descriptor_key(policy, {"x-user": "ann"}, "/a", None, "10.0.0.1") is None


def test_resp_encodes_bulk_arrays_and_parses_split_replies() -> None:
    assert encode_command("INCR", b"k", 5) == b"*3\r\n$4\r\nINCR\r\n$1\r\nk\r\n$1\r\n5\r\n"
    parser = ReplyParser()
    wire = b"*2\r\n:7\r\n:59000\r\n+OK\r\n-NOSCRIPT no\r\n$3\r\nabc\r\n$-1\r\n"
    replies: list[object] = []
    for i in range(len(wire)):  # one byte at a time: every split point
        parser.feed(wire[i:i + 1])
        while True:
            done, reply = parser.next_reply()
            if not done:
                break
            replies.append(reply)
    assert replies == [[7, 59000], b"OK", RedisReplyError("NOSCRIPT no"), b"abc", None]


def test_resp_rejects_a_non_redis_peer() -> None:
    parser = ReplyParser()
    parser.feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ProtocolError, match="Redis server"):
        parser.next_reply()


class FakeRedis(RedisClient):
    """Counts like the Lua script; fails when told to."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 1)
        self.counters: dict[str, int] = {}
        self.down = False

    async def eval_script(self, script: str, keys: list[str], args: list[str | int]) -> object:
        if self.down:
            raise RateLimitStoreError("fake redis down")
        self.counters[keys[0]] = self.counters.get(keys[0], 0) + 1
        return [self.counters[keys[0]], 60000]


def _limiter(annotation: str, redis: RedisClient | None = None) -> RateLimiter:
    objects = [{"kind": "HTTPRoute", "metadata": {"name": "r", "annotations": {
        ANNOTATION: annotation}}}, {"kind": "HTTPRoute", "metadata": {"name": "plain"}}]
    policies, issues = policies_from(dict_objects(objects, "ns"))
    assert not issues
    now = [0.0]
    limiter = RateLimiter(redis, clock=lambda: now[0])
    limiter.update(policies)
    return limiter


async def _statuses(limiter: RateLimiter, n: int, user: str = "a", name: str = "r") -> list[int]:
    out = []
    for _ in range(n):
        limited = await limiter.check("HTTPRoute", "ns", name, {"x-user": user}, "/", None,
                                      "10.0.0.1")
        out.append(200 if limited is None else limited.status)
    return out


async def test_local_limit_per_descriptor_value_with_headers() -> None:
    limiter = _limiter("descriptors: [{header: x-user}]\nlocal: {maxTokens: 2, fillInterval: 60s}")
    assert await _statuses(limiter, 3, "a") == [200, 200, 429]
    assert await _statuses(limiter, 2, "b") == [200, 200]
    assert await _statuses(limiter, 5, name="plain") == [200] * 5
    limited = await limiter.check("HTTPRoute", "ns", "r", {"x-user": "a"}, "/", None, "x")
    assert limited is not None and limited.flag == "RL"
    assert dict(limited.headers) == {b"x-ratelimit-limit": b"2", b"x-ratelimit-remaining": b"0",
                                     b"x-ratelimit-reset": b"60"}
    assert limiter.counts[("HTTPRoute ns/r", "local_limited")] == 2


async def test_global_limit_counts_in_the_store() -> None:
    redis = FakeRedis()
    limiter = _limiter("global: {requests: 3}", redis)
    assert await _statuses(limiter, 5) == [200, 200, 200, 429, 429]
    assert list(redis.counters.values()) == [5]


@pytest.mark.parametrize("mode, expected", [("open", 200), ("closed", 500)])
async def test_store_failure_applies_the_fail_mode_and_counts(mode: str, expected: int) -> None:
    redis = FakeRedis()
    redis.down = True
    limiter = _limiter(f"global: {{requests: 3, failMode: {mode}}}", redis)
    assert await _statuses(limiter, 2) == [expected, expected]
    assert limiter.counts[("HTTPRoute ns/r", f"store_error_{mode}")] == 2


async def test_global_limit_without_redis_is_a_store_failure() -> None:
    limiter = _limiter("global: {requests: 3, failMode: closed}")
    assert await _statuses(limiter, 1) == [500]


def test_bad_annotation_is_reported_not_applied() -> None:
    objects = [{"kind": "VirtualService", "metadata": {"name": "v", "annotations": {
        ANNOTATION: "local: {maxTokens: -1, fillInterval: 1s}"}}}]
    policies, issues = policies_from(dict_objects(objects, "ns"))
    assert policies == {} and "VirtualService ns/v" in issues[0]


async def test_redis_client_fails_fast_after_a_failure() -> None:
    client = RedisClient("127.0.0.1", 9, timeout=0.5, retry_after=30.0)  # discard: refused
    with pytest.raises(RateLimitStoreError, match="redis-server running"):
        await client.call("PING")
    with pytest.raises(RateLimitStoreError, match="failed recently"):
        await client.call("PING")
