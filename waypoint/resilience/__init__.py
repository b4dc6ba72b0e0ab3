"""The waypoint's resilience decision cores (sans-I/O).

Pure decision logic and state machines for timeouts, retries, circuit breaking,
outlier detection, fault injection and load balancing; the waypoint's trio shell
executes the decisions.  Time (``now``, monotonic seconds) and randomness (a
``random.Random``) are inputs, so every decision is reproducible in tests.
Settings types live in :mod:`waypoint.resilience.config`.
"""
