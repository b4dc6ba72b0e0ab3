"""Sans-I/O token bucket for local (per-replica) rate limits.

Envoy's local rate limit semantics: a bucket holds at most ``max_tokens``; every
``fill_interval`` seconds ``tokens_per_fill`` are added (in whole fills, not
continuously, so a limit of 10 per minute lets exactly 10 through in any one
fill period and the reset time is exact).  The caller passes the clock reading,
so tests drive time directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Take:
    """The outcome of one request against a limit (also used for global limits)."""

    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the limit refills / the window ends


class TokenBucket:
    """One bucket; not thread-safe (one trio thread owns it)."""

    __slots__ = ("_last_fill", "_tokens", "fill_interval", "max_tokens", "tokens_per_fill")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float,
                 now: float) -> None:
        if max_tokens < 1 or tokens_per_fill < 1 or fill_interval <= 0:
            raise ValueError("a token bucket needs max_tokens >= 1, tokens_per_fill >= 1 "
                             "and fill_interval > 0")
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval = fill_interval
        self._tokens = max_tokens
        self._last_fill = now

    def _refill(self, now: float) -> None:
        fills = int((now - self._last_fill) // self.fill_interval)
        if fills > 0:
            self._tokens = min(self.max_tokens, self._tokens + fills * self.tokens_per_fill)
            self._last_fill += fills * self.fill_interval

    def take(self, now: float) -> Take:
        """Spend one token if there is one."""
        self._refill(now)
        reset = max(0.0, self._last_fill + self.fill_interval - now)
        if self._tokens > 0:
            self._tokens -= 1
            return Take(True, self.max_tokens, self._tokens, reset)
        return Take(False, self.max_tokens, 0, reset)

    def idle_since(self, now: float) -> bool:
        """Full again: the bucket can be dropped without changing any answer."""
        self._refill(now)
        return self._tokens >= self.max_tokens
