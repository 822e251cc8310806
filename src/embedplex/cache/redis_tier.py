"""The cache tier shared by replicas through Redis.

Only inputs that missed in this process are looked up here, all of one request in one ``MGET``.
Writes never hold an answer back: results are buffered and a task sends them in one pipeline
(``SET ... EX ttl``) per event-loop turn. Losing Redis must not slow or fail requests: a failed
call logs one warning, is counted, and the cache works in this process alone until a probe every
``probe_interval_s`` finds Redis back (as the rate limiter does, ``limits/limiter.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # redis is imported only when the tier is configured
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

_MAX_BUFFERED = 4096  # writes waiting for the next pipeline; past it new ones are dropped


class RedisTier:
    """``get_many`` and ``put`` over one Redis client; ``__init__`` does no I/O."""

    def __init__(self, client: Redis, *, ttl_s: int, probe_interval_s: float = 5.0) -> None:
        from redis.exceptions import RedisError

        self.client = client
        # Which Redis, for the log (the limits may use another): host, port and db, no secret.
        pool = getattr(client, "connection_pool", None)
        kw: dict[str, Any] = getattr(pool, "connection_kwargs", None) or {}
        place = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        self.where = f"{place}/{kw.get('db', 0)}"
        self.ttl_s = ttl_s
        self.probe_interval_s = probe_interval_s
        self.up = True
        self.failures = 0
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._writes: list[tuple[str, bytes]] = []
        self._flush: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, ttl_s: int, timeout_s: float = 0.5, probe_interval_s: float = 5.0
    ) -> RedisTier:
        from embedplex.limits.redis_store import redis_client

        return cls(redis_client(url, timeout_s), ttl_s=ttl_s, probe_interval_s=probe_interval_s)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The stored values of ``keys`` (None where absent, or all None while Redis is away)."""
        if not self.up or not keys:
            return [None] * len(keys)
        try:
            values = await self.client.mget(keys)
        except self._errors as exc:
            self._lost(exc)
            return [None] * len(keys)
        return [v if isinstance(v, bytes) else None for v in values]

    def put(self, key: str, value: bytes) -> None:
        """Store in the background (never raises, never waits)."""
        if not self.up or len(self._writes) >= _MAX_BUFFERED:
            return
        self._writes.append((key, value))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._writes:
                writes, self._writes = self._writes, []
                pipe = self.client.pipeline(transaction=False)
                for key, value in writes:
                    pipe.set(key, value, ex=self.ttl_s)
                try:
                    await pipe.execute()
                except self._errors as exc:
                    self._lost(exc)
                    self._writes.clear()
        finally:
            self._flush = None

    def _lost(self, exc: BaseException) -> None:
        self.failures += 1
        if not self.up:
            return
        self.up = False
        logger.warning(
            "embedding cache: Redis %s unreachable (%s); caching in this process only until "
            "it returns",
            self.where,
            type(exc).__name__,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.client.ping()
            except self._errors:
                continue
            self.up = True
            logger.info("embedding cache: Redis is back; the cache is shared again")
            return

    async def aclose(self) -> None:
        """Stop probing, let buffered writes go out (briefly), close the client."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._flush is not None:
            await asyncio.wait({self._flush}, timeout=1.0)
        await self.client.aclose()
