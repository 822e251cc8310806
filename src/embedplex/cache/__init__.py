"""The exact embedding cache: in-process (``memory.py``), optionally shared through Redis
(``redis_tier.py``), keyed as ``keys.py`` says; ``embeddings.py`` puts them together."""

from embedplex.cache.embeddings import CacheCounts, EmbeddingCache
from embedplex.cache.memory import MemoryCache
from embedplex.cache.redis_tier import RedisTier

__all__ = ["CacheCounts", "EmbeddingCache", "MemoryCache", "RedisTier"]
