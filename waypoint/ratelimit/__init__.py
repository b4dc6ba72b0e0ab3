"""Rate limiting for the waypoint: local token buckets and global limits in Redis.

:class:`RateLimiter` is the pipeline stage; :mod:`.policy` the annotation schema;
:mod:`.bucket` and :mod:`.resp` the sans-I/O cores; :mod:`.redis` the trio client.
"""

from waypoint.ratelimit.limiter import Limited, RateLimitCollector, RateLimiter, policies_from
from waypoint.ratelimit.policy import ANNOTATION, RateLimitPolicy, parse_policy
from waypoint.ratelimit.redis import RedisClient

__all__ = ["ANNOTATION", "Limited", "RateLimitCollector", "RateLimitPolicy", "RateLimiter",
           "RedisClient", "parse_policy", "policies_from"]
