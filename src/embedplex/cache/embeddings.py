"""The process's embedding cache: one byte bound shared by every local model and remote
provider, an optional Redis tier, and each model's or provider's counts (hits by tier, misses,
inputs that joined one in flight).

What is cached for a local model is its per-input pooled result before normalization and
dimensions are applied (``models/embedding.py``), so requests that differ only in those share
entries; for a remote provider, the upstream's vector and the text's share of the call's tokens
(``providers/cached.py``). ``docs/cache.md`` says what is keyed and why the default size is
what it is.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from embedplex.cache.memory import MemoryCache
from embedplex.cache.redis_tier import RedisTier

if TYPE_CHECKING:
    from embedplex.config import Settings

_tags = itertools.count(1)
# Remote identities (``tag_of``) kept before the table starts again: callers choose some of the
# parameters in them, so it must be bounded; an identity seen again later gets a new tag, and
# its old entries age out of the LRU.
_IDENTITIES_MAX = 4096


@dataclass(slots=True)
class CacheCounts:
    """One model's counts, as plain ints (read by the metrics at scrape time)."""

    hits_memory: int = 0
    hits_redis: int = 0
    misses: int = 0
    dedupe_joined: int = 0
    # Values read from Redis and refused (of another shape, or out of range: ``cache/keys.py``);
    # each is also a miss, and computed.
    redis_refused: int = 0


class EmbeddingCache:
    """``memory`` is None when the cache is off (``max_bytes`` 0); dedupe counts still count."""

    def __init__(self, max_bytes: int = 0, *, redis: RedisTier | None = None) -> None:
        self.memory: MemoryCache[Any] | None = MemoryCache(max_bytes) if max_bytes > 0 else None
        self.redis = redis if self.memory is not None else None
        self.counts: dict[str, CacheCounts] = {}
        self._identities: dict[bytes, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingCache:
        """The configured cache (no I/O: the Redis client connects on first use)."""
        redis = None
        url = settings.cache_redis_url or settings.redis_url
        if settings.cache_redis and settings.cache_max_bytes > 0 and url:
            redis = RedisTier.from_url(
                url.get_secret_value(),
                ttl_s=settings.cache_ttl_s,
                timeout_s=settings.redis_timeout_s,
                probe_interval_s=settings.redis_probe_interval_s,
            )
        return cls(settings.cache_max_bytes, redis=redis)

    @property
    def enabled(self) -> bool:
        return self.memory is not None

    def counts_of(self, model: str) -> CacheCounts:
        counts = self.counts.get(model)
        if counts is None:
            counts = self.counts[model] = CacheCounts()
        return counts

    @staticmethod
    def new_tag() -> int:
        """A number naming one model instance in in-process keys (never reused)."""
        return next(_tags)

    def tag_of(self, identity: bytes) -> int:
        """The tag of a remote provider identity (with its request parameters): one per identity
        in this process, so providers that would send the very same call share entries."""
        tag = self._identities.get(identity)
        if tag is None:
            if len(self._identities) >= _IDENTITIES_MAX:
                self._identities.clear()
            tag = self._identities[identity] = next(_tags)
        return tag

    def stats(self) -> dict[str, Any]:
        """For ``/api/v1/status`` and the metrics: the shared state, then each model's counts."""
        memory = self.memory
        redis = self.redis
        out: dict[str, Any] = {
            "enabled": memory is not None,
            "max_bytes": memory.max_bytes if memory is not None else 0,
            "bytes": memory.bytes if memory is not None else 0,
            "entries": len(memory) if memory is not None else 0,
            "evictions": memory.evictions if memory is not None else 0,
            "redis": "off" if redis is None else ("up" if redis.up else "down"),
            "redis_failures": redis.failures if redis is not None else 0,
            "models": {name: asdict(c) for name, c in self.counts.items()},
        }
        return out

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
