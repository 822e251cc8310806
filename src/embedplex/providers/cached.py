"""A provider's share of the process's embedding cache (``cache/``): its keys, lookups and stores.

An upstream's answer depends on the provider it comes from and on the call's parameters, so the
key of one text is the text and a ``Scope``: the provider's identity (type, URL, upstream model,
encoding) and its ``EmbedParams`` (the parameters the adapters send: input_type, dimensions,
truncation, prompt_name, normalize). Scopes are made once per parameter set (the runtime keeps
them with its checked parameters), so a lookup costs a tuple and a dict probe per text. Two
providers that would send the very same call share a scope; any other provider (a failover's
second one among them) never sees the first one's entries. Names, API keys and other secrets
are no part of a key: the Redis key is a BLAKE2b digest of the identity and the text.

What is kept is the upstream's vector, read-only and holding only its own data (a decoded base64
row as it is; a row of an answer's matrix is copied: it would keep the whole answer alive), and
the text's share of the call's billed tokens, so a hit reports the tokens that computing it
reported. Results are stored by the batch function, once per upstream call
(``ProviderRuntime._call``): a text is stored once however many callers shared it, and a failed
text never.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, NamedTuple

from embedplex.cache import CacheCounts, EmbeddingCache
from embedplex.cache.keys import (
    model_identity,
    pack_remote,
    remote_base,
    remote_dim_key,
    remote_key,
    unpack_dim,
)
from embedplex.cache.keys import unpack_remote as unpack
from embedplex.providers.base import EmbedParams

if TYPE_CHECKING:
    from embedplex.cache import MemoryCache, RedisTier
    from embedplex.core.types import Vector
    from embedplex.models.dedupe import Flights
    from embedplex.providers.config import ProviderConfig

# What one entry holds besides its text and its vector's data: the key tuple and its int, the
# entry tuple and its float, the array's header (and the bytes object a decoded base64 row lies
# in), the LRU's slot (tracemalloc: docs/cache.md).
ENTRY_OVERHEAD = 424


class Embedded(NamedTuple):
    """One text's share of an upstream answer (a tuple: one is made per text of every call)."""

    vector: Vector
    tokens: float


# A cache entry: (vector, token share), as ``Embedded`` is read, but a plain tuple: cheaper to
# make, and the collector stops tracking it (a tuple subclass it would walk on every full pass).
Entry = tuple["Vector", float]


@dataclass(slots=True, eq=False)
class Scope:
    """One provider identity with one parameter set: ``tag`` names it in this process's keys,
    ``base`` is the digest state of its Redis keys, ``params`` the lane its texts go to.

    ``dim`` is the length of the vectors its upstream answers, learned from the first answer
    kept (0 until then): a value read from Redis must have it. Not taken from
    ``params.dimensions``: an upstream may answer another length than asked (one that ignores
    the field), and only what it answered says what a right value is. Until it has answered
    here, the length a replica that called it put in Redis (``remote_dim_key``, refreshed every
    half TTL: ``dim_sent``) stands in, read in the same MGET as the texts."""

    tag: int
    base: blake2b
    params: EmbedParams
    dim: int = 0
    dim_sent: float = float("-inf")  # when this process last wrote ``dim`` to Redis
    # What the upstream said it served when the scope was made (TEI's /info; None: unknown or
    # not said): an answer that came after it said otherwise is not kept under this scope.
    served: str | None = None


def served(provider: Any) -> str | None:
    """What ``provider``'s upstream says it serves, where it says (TEI's /info)."""
    return getattr(provider, "served", None)


def identity(config: ProviderConfig, provider: Any, params: EmbedParams) -> bytes:
    """What makes the upstream answer what it is, besides the text (never a name or a key)."""
    url = getattr(provider, "url", None)
    return model_identity(
        provider.type,
        url if url is not None else f"unnamed:{config.name}",  # a fake adapter: its own
        provider.model,
        served(provider),  # what the upstream said it serves (TEI's /info)
        config.encoding_format,
        config.input_type,
        params.normalize,
        params.truncate,
        params.truncation_direction.value,
        params.dimensions,
        params.input_type,
        params.prompt_name,
    )


class ProviderCache:
    """``memory`` is None where nothing is kept (no cache, or the provider's ``cache = false``);
    ``counts`` counts anyway (dedupe joins are counted with the cache off too)."""

    def __init__(self, cache: EmbeddingCache | None, config: ProviderConfig, provider: Any):
        keep = cache is not None and config.cache
        self._cache = cache
        self._config = config
        self._provider = provider
        self.memory: MemoryCache[Entry] | None = cache.memory if keep and cache else None
        self.redis: RedisTier | None = cache.redis if keep and cache else None
        self.counts = cache.counts_of(config.name) if cache is not None else CacheCounts()

    def scope(self, params: EmbedParams) -> Scope:
        """The scope of ``params`` (the runtime keeps it with the checked parameters)."""
        ident = identity(self._config, self._provider, params)
        cache = self._cache
        tag = cache.tag_of(ident) if cache is not None else EmbeddingCache.new_tag()
        return Scope(tag, remote_base(ident), params, served=served(self._provider))

    def lookup(self, texts: list[str], tag: int) -> tuple[list[Entry | None], list[int]]:
        """Each text's entry in this process (or None), and the positions missed; counted."""
        found, missed = self._find(texts, tag)
        self.counts.hits_memory += len(texts) - len(missed)
        return found, missed

    def _find(self, texts: list[str], tag: int) -> tuple[list[Entry | None], list[int]]:
        memory = self.memory
        assert memory is not None
        get = memory.get
        found: list[Entry | None] = [get((text, tag)) for text in texts]
        return found, [k for k, e in enumerate(found) if e is None]

    async def lookup_shared(
        self,
        texts: list[str],
        scope: Scope,
        found: list[Entry | None],
        missed: list[int],
        flights: Flights,
    ) -> list[int]:
        """Fill ``found`` from Redis (one MGET) for what missed here and nobody here is
        computing now; the positions still missed (the caller counts the hits: those found)."""
        redis = self.redis
        memory = self.memory
        assert redis is not None
        assert memory is not None
        tag, dim = scope.tag, scope.dim
        asked = [k for k in missed if (texts[k], tag) not in flights]
        keys = [remote_key(scope.base, texts[k]) for k in asked]
        if not dim:  # not called here yet: the length another replica's upstream answered
            keys.append(remote_dim_key(scope.base))
        values = await redis.get_many(keys)
        if not dim:
            dim = unpack_dim(values.pop())
            if not dim:  # nothing says what a right value is: none can be checked
                return missed
        for k, value in zip(asked, values, strict=True):
            if value is None:
                continue
            got = unpack(value, dim, texts[k])
            if got is None:
                self.counts.redis_refused += 1
                continue
            found[k] = got
            _keep(memory, texts[k], tag, got)
        return [k for k in missed if found[k] is None]

    async def lookup_whole(self, texts: list[str], scope: Scope) -> list[Entry] | None:
        """Every text's entry (this process, then Redis), or None if one is missing.

        For a provider whose circuit is open (``ProviderRuntime.cached_only``). Counted only
        when whole: a request this lookup does not answer goes to another provider, or fails,
        and is counted there, not here as hits it was never answered with.
        """
        found, missed = self._find(texts, scope.tag)
        redis = self.redis
        if missed:
            if redis is None or not redis.up:
                return None
            # No flights: nothing here is joined while the circuit is open, so Redis is asked
            # for every text that missed.
            if await self.lookup_shared(texts, scope, found, missed, {}):
                return None
        self.counts.hits_memory += len(texts) - len(missed)
        self.counts.hits_redis += len(missed)
        return found  # type: ignore[return-value]  # every position filled

    def store(self, text: str, scope: Scope, vector: Vector, tokens: float) -> None:
        """One text's result, just answered by the upstream: kept here, and in Redis in the
        background (called by the batch function, only for texts whose callers cache)."""
        memory = self.memory
        if memory is None:
            return
        owned = _owned(vector)
        _keep(memory, text, scope.tag, (owned, tokens))
        redis = self.redis
        if redis is not None:
            redis.put(remote_key(scope.base, text), pack_remote(owned, tokens))
            if scope.dim != len(owned) or time.monotonic() - scope.dim_sent > redis.ttl_s / 2:
                _send_dim(redis, scope, len(owned))


def _send_dim(redis: RedisTier, scope: Scope, dim: int) -> None:
    """Learn ``dim`` from the upstream's answer and tell the replicas (``Scope``)."""
    scope.dim = dim
    scope.dim_sent = time.monotonic()
    redis.put(remote_dim_key(scope.base), str(dim).encode())


def _owned(vector: Vector) -> Vector:
    """``vector`` itself when nobody may change it and it holds only its own data (a decoded
    base64 row: a read-only array over its own bytes), else a read-only copy: a row of an
    answer's matrix would keep the whole answer alive, and a caller could change it."""
    base: object = vector.base
    if not vector.flags.writeable and (
        base is None or (type(base) is bytes and len(base) == vector.nbytes)
    ):
        return vector
    owned = vector.copy()
    owned.flags.writeable = False
    return owned


def _keep(memory: MemoryCache[Entry], text: str, tag: int, entry: Entry) -> None:
    """Put ``entry`` in the process cache, charged its text, its vector and the rest."""
    memory.put((text, tag), entry, sys.getsizeof(text) + entry[0].nbytes + ENTRY_OVERHEAD)
