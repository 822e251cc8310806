"""The process's embedding cache: one byte bound shared by every local model, an optional
Redis tier, and each model's counts (hits by tier, misses, inputs that joined one in flight).

What is cached is a model's per-input pooled result before normalization and dimensions are
applied (``models/local.py``), so requests that differ only in those share entries.
``docs/cache.md`` says what is keyed and why the default size is what it is.
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


@dataclass(slots=True)
class CacheCounts:
    """One model's counts, as plain ints (read by the metrics at scrape time)."""

    hits_memory: int = 0
    hits_redis: int = 0
    misses: int = 0
    dedupe_joined: int = 0


class EmbeddingCache:
    """``memory`` is None when the cache is off (``max_bytes`` 0); dedupe counts still count."""

    def __init__(self, max_bytes: int = 0, *, redis: RedisTier | None = None) -> None:
        self.memory: MemoryCache[Any] | None = MemoryCache(max_bytes) if max_bytes > 0 else None
        self.redis = redis if self.memory is not None else None
        self.counts: dict[str, CacheCounts] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingCache:
        """The configured cache (no I/O: the Redis client connects on first use)."""
        redis = None
        if settings.cache_redis and settings.cache_max_bytes > 0 and settings.redis_url:
            redis = RedisTier.from_url(
                settings.redis_url.get_secret_value(),
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
