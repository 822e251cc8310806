"""Per-key rate limits: requests and tokens per minute, requests at once (``docs/limits.md``).

``RateLimiter`` is what the pipeline's ``RateLimit`` stage (``api/ratelimit.py``) asks; it
counts in this process (``gcra.LocalLimits``) or in Redis (``redis_store.RedisLimits``), and
falls back from the second to the first while Redis is away. ``FailureThrottle`` paces wrong
admin secrets per client address (``failures.py``).
"""

from embedplex.limits.failures import FailureThrottle
from embedplex.limits.gcra import WINDOW_S, Budget, LocalLimits, Verdict
from embedplex.limits.limiter import Lease, LimitObserver, RateLimiter
from embedplex.limits.redis_store import RedisLimits

__all__ = [
    "WINDOW_S",
    "Budget",
    "FailureThrottle",
    "Lease",
    "LimitObserver",
    "LocalLimits",
    "RateLimiter",
    "RedisLimits",
    "Verdict",
]
