"""A local embedding model: pooled vectors, shared in flight and cached.

``LocalEmbeddingModel`` runs on ``LocalModel``'s engine (``local.py``). Identical inputs queued
or running at once share one slot (``dedupe.py``), and results are kept in the process's
``EmbeddingCache`` (and its Redis tier, when configured) under keys that name the model's
weights and tokenizer, so that a changed model is never answered from another's entries.
"""

from __future__ import annotations

import asyncio
import sys
import time
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from embedplex.backends.base import Backend, TokenBatch
from embedplex.backends.model_files import ModelSpec
from embedplex.backends.pooling import normalize_rows
from embedplex.backends.tokenizer import Encoded, TextTokenizer, Token, TruncationDirection
from embedplex.backends.weights import model_hash, tokenizer_hash
from embedplex.batching import BatchObserver
from embedplex.cache import EmbeddingCache
from embedplex.cache.keys import MemoryKey, ids_key, model_identity, pack, redis_key, unpack
from embedplex.config import Settings
from embedplex.core.errors import EmbedplexError, EmptyInputError, FatalBackendError
from embedplex.core.types import EmbedRequest, EmbedResult, Timings, TokenEmbedResult, Vector
from embedplex.models.checks import check_dimensions, named_prompt
from embedplex.models.local import LocalModel
from embedplex.models.options import LocalModelOptions
from embedplex.models.payloads import deferred

if TYPE_CHECKING:
    from embedplex.models.token_level import LocalTokenModel


@dataclass(frozen=True, slots=True)
class Pooled:
    """One input's pooled vector, the same scaled to unit length, and its token count (all made
    per batch in the inference thread, so the event loop only picks)."""

    raw: Vector
    unit: Vector
    tokens: int


# Per request on the event loop: C getters, not a comprehension's function and frame each.
_UNIT = attrgetter("unit")
_RAW = attrgetter("raw")
_TOKENS = attrgetter("tokens")

# What one cache entry costs besides its key's text and its two vectors: the key tuple, the
# Pooled, two array headers, the LRU's slot (measured with tracemalloc: docs/cache.md).
_ENTRY_OVERHEAD = 512


def _owned(raw: Vector, unit: Vector, tokens: int) -> Pooled:
    raw = raw.copy()
    unit = unit.copy()
    raw.flags.writeable = False
    unit.flags.writeable = False
    return Pooled(raw, unit, tokens)


def _revision(spec: ModelSpec) -> str:
    """What names the weights and the tokenizer: the hub's commit, else (a local directory, the
    bundled model) the SHA-256 of the config and weight files, which the ONNX backend has
    computed already for its export's key (``model_hash`` keeps it), and of ``tokenizer.json``:
    new weights, or a new tokenizer, put at the same path must not be answered from the old
    files' entries in Redis (entries are keyed by text)."""
    if spec.sha is not None:
        return spec.sha
    return f"files:{model_hash(spec.path)}:{tokenizer_hash(spec.path)}"


def _size(key: MemoryKey, pooled: Pooled) -> int:
    """The bytes one entry holds: its text (or ids), both vectors, and the rest."""
    return sys.getsizeof(key[0]) + pooled.raw.nbytes + pooled.unit.nbytes + _ENTRY_OVERHEAD


class LocalEmbeddingModel(LocalModel[Pooled]):
    """Pools vectors; identical inputs in flight share one slot, and results are cached
    (``cache``: the process's ``EmbeddingCache``, shared by every local model)."""

    _tokens: LocalTokenModel | None = None  # made on the first embed_all (token_level.py)

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: TextTokenizer,
        backend: Backend,
        options: LocalModelOptions,
        *,
        observers: list[BatchObserver] | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        super().__init__(spec, tokenizer, backend, options, observers=observers)
        self.cache = cache if cache is not None else EmbeddingCache()
        self._counts = self.cache.counts_of(options.name)
        self._tag = EmbeddingCache.new_tag()
        # Names this instance across replicas: what the same name may be served from. Only
        # Redis keys need it, so only a cache with Redis pays for ``_revision``.
        self._identity = b""
        if self.cache.redis is not None:
            self._identity = model_identity(
                spec.model_id,
                _revision(spec),
                spec.pooling.value,
                backend.name,
                backend.dtype,
                spec.max_input_length,
                # Entries written before do_lower_case was honoured hold unlowered vectors.
                *(("lowercase",) if tokenizer.lowered else ()),
            )

    def _joined(self, n: int) -> None:
        self._counts.dedupe_joined += n

    @classmethod
    def load(
        cls, settings: Settings, *, observers: list[BatchObserver] | None = None
    ) -> LocalEmbeddingModel:
        """Resolve, read and load the configured embedding model (blocking; use a thread)."""
        # loading.py builds this class, so it is imported when called (a cycle otherwise).
        from embedplex.models.loading import load_local_model

        model = load_local_model(settings, observers=observers)
        if not isinstance(model, LocalEmbeddingModel):
            raise FatalBackendError(f"{settings.model_id} is not an embedding model")
        return model

    def _forward(self, batch: TokenBatch) -> list[Pooled]:
        raw = self.backend.embed(batch)
        lengths = batch.attention_mask.sum(axis=1).tolist()
        units = normalize_rows(raw)
        if self.cache.memory is None:
            return [Pooled(r, u, n) for r, u, n in zip(raw, units, lengths, strict=True)]
        # Cached rows own their memory (a row of the batch's matrix would keep all of it
        # alive) and are read-only: every caller that gets them shares them.
        return [_owned(r, u, n) for r, u, n in zip(raw, units, lengths, strict=True)]

    def _lookup(self, keys: list[MemoryKey]) -> tuple[list[Pooled | None], list[int]]:
        """Each input's result in this process's cache (or None), and the positions missed."""
        memory = self.cache.memory
        assert memory is not None
        get = memory.get
        found: list[Pooled | None] = [get(key) for key in keys]
        missed = [k for k, p in enumerate(found) if p is None]
        self._counts.hits_memory += len(keys) - len(missed)
        return found, missed

    async def _lookup_shared(
        self, keys: list[MemoryKey], found: list[Pooled | None], missed: list[int]
    ) -> list[int]:
        """Fill ``found`` from the Redis tier (one round trip) for what missed here and nobody
        here computes now; the positions still missed."""
        redis = self.cache.redis
        memory = self.cache.memory
        assert redis is not None
        assert memory is not None
        asked = [k for k in missed if keys[k] not in self._flights]
        values = await redis.get_many([redis_key(self._identity, keys[k]) for k in asked])
        dim = self.backend.dim
        cap = self.spec.max_input_length
        counts = self._counts
        for k, value in zip(asked, values, strict=True):
            if value is None:
                continue
            got = unpack(value, dim, cap)
            if got is None:
                counts.redis_refused += 1
                continue
            raw, tokens = got
            pooled = _owned(raw, normalize_rows(raw), tokens)
            found[k] = pooled
            memory.put(keys[k], pooled, _size(keys[k], pooled))
            counts.hits_redis += 1
        return [k for k in missed if found[k] is None]

    def _remember(self, key: Hashable, pooled: Pooled) -> None:
        """A result just made: into this process's cache, and Redis's in the background."""
        memory = self.cache.memory
        if memory is None:
            return
        mkey: MemoryKey = key  # type: ignore[assignment]  # no cast call per result
        memory.put(mkey, pooled, _size(mkey, pooled))
        redis = self.cache.redis
        if redis is not None:
            redis.put(redis_key(self._identity, mkey), pack(pooled.raw, pooled.tokens))

    async def _checked_ids(
        self, ids: list[list[int]], truncate: bool, direction: TruncationDirection
    ) -> list[Encoded]:
        """Token ids checked against the vocabulary and the input cap, and truncated: the same
        refusals with the cache on or off, and keys that hold only what is embedded. Long
        lists are checked in the tokenizer pool (up to ``max_request_tokens`` ids are not
        free to scan on the event loop)."""

        def check() -> list[Encoded]:
            return self.tokenizer.encode_ids(ids, truncate=truncate, direction=direction)

        if sum(len(seq) for seq in ids) <= self.options.tokenize_inline_chars:
            return check()
        return await asyncio.get_running_loop().run_in_executor(self._token_pool, check)

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            return named_prompt(prompt_name, self.spec.prompts)
        return self.options.default_prompt

    def _texts(self, request: EmbedRequest) -> list[str]:
        texts: list[str] = request.inputs  # type: ignore[assignment]  # texts (no cast call)
        prompt = self._prompt(request.prompt, request.prompt_name)
        return [prompt + text for text in texts] if prompt else texts

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_size(len(request.inputs), "input")
        dims = request.dimensions
        if dims is not None:
            check_dimensions(dims, self.backend.dim)
        start = time.perf_counter()
        truncate = self._truncate(request.truncate)
        direction = request.truncation_direction
        left = direction == TruncationDirection.LEFT  # the enum, or its value as a str
        tag = self._tag
        texts: list[str] = []
        checked: list[Encoded] = []  # token ids: checked and truncated, before any key
        keys: list[MemoryKey]
        is_tokens = request.is_tokens
        if is_tokens:
            ids = typing.cast(list[list[int]], request.inputs)
            checked = await self._checked_ids(ids, truncate, direction)
            # The key is the ids embedded (truncation applied, so its flags add nothing).
            keys = [(ids_key(e.ids), False, False, tag) for e in checked]
        else:
            texts = self._texts(request)
            keys = [(text, truncate, left, tag) for text in texts]
        use_cache = request.cache and self.cache.memory is not None
        cached: list[Pooled | None] | None = None
        rest: list[int] | None = None  # the inputs to compute (None: all of them)
        if use_cache:
            cached, rest = self._lookup(keys)
            redis = self.cache.redis
            if rest and redis is not None and redis.up:
                rest = await self._lookup_shared(keys, cached, rest)
            self._counts.misses += len(rest)

        def chosen(picked: list[int]) -> list[int]:  # positions in ``rest`` -> in the request
            return picked if rest is None else [rest[j] for j in picked]

        def encode(picked: list[int]) -> list[Encoded]:
            ks = chosen(picked)
            if is_tokens:
                return [checked[k] for k in ks]
            try:
                return self.tokenizer.encode(
                    [texts[k] for k in ks], truncate=truncate, direction=direction
                )
            except EmbedplexError:
                if len(ks) < len(keys):  # name the input by its place in the whole request
                    self.tokenizer.encode(texts, truncate=truncate, direction=direction)
                raise

        results: list[Pooled]
        timings: Timings
        if rest is not None and not rest:  # every input was cached: the queue never sees it
            results = cached  # type: ignore[assignment]  # all found (no cast call)
            took = (time.perf_counter() - start) * 1000
            timings = Timings(total=took)
        else:
            if is_tokens:  # checked already: picking them is all that is left
                chars: Callable[[list[int]], int] = lambda picked: 0  # noqa: E731
                defer = None
            else:

                def chars(picked: list[int]) -> int:
                    if len(picked) == len(texts):  # all of them (most requests)
                        return sum(map(len, texts))
                    return sum(map(len, map(texts.__getitem__, chosen(picked))))

                cap = self.spec.max_input_length
                defer = lambda picked: deferred(  # noqa: E731
                    texts, truncate, direction, cap, chosen(picked)
                )
            done = await self._process_shared(
                keys if rest is None else [keys[k] for k in rest],
                encode,
                chars,
                defer,
                request.tenant,
                self._remember if use_cache else None,
            )
            if rest is None:
                results = done.results
            else:  # merge: cached inputs where they were, computed ones in order between
                merged: list[Pooled] = cached  # type: ignore[assignment]  # filled below
                for k, pooled in zip(rest, done.results, strict=True):
                    merged[k] = pooled
                results = merged
            timings = done.timings()
        if dims is None:
            vectors = list(map(_UNIT if request.normalize else _RAW, results))
        else:  # Matryoshka: cut first, then normalize what is left
            matrix = np.stack([p.raw[:dims] for p in results])
            vectors = list(normalize_rows(matrix) if request.normalize else matrix)
        return EmbedResult(
            vectors=vectors,
            prompt_tokens=sum(map(_TOKENS, results)),  # hits too: the same answer
            model=self.options.name,
            timings=timings,
        )

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        """Every token's vector, unpooled (TEI ``/embed_all``), through a token-level twin."""
        if self._tokens is None:
            from embedplex.models.token_level import LocalTokenModel

            tokens = LocalTokenModel(self)
            await tokens.start()  # never suspends: two first callers cannot both make one
            self._tokens = tokens
        return await self._tokens.embed_all(request)

    async def close(self, *, drain: bool = True) -> None:
        if self._tokens is not None:
            await self._tokens.close(drain=drain)
        await super().close(drain=drain)

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        if not texts:
            raise EmptyInputError("inputs cannot be empty", param="inputs")
        prompt = self._prompt(None, prompt_name)
        if prompt:
            texts = [prompt + t for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._token_pool,
            lambda: self.tokenizer.tokens(
                texts,
                add_special_tokens=add_special_tokens,
                max_tokens=self.options.max_request_tokens,
            ),
        )
