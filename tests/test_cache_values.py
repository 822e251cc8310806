"""What the local cache trusts and holds: a model's identity in Redis follows its weights, values
read from Redis are checked, token-id keys hold only the ids embedded (and cost what they are
charged), and bad ids get the same 422 with the cache on."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from cache_helpers import cached_model, req, started
from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.cache import EmbeddingCache, RedisTier
from embedplex.cache.keys import PREFIX, redis_key
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.loading import load_local_model
from helpers import eventually, running
from redis_server import needs_redis_server, redis_server
from tiny_models import make_tiny_bert

MiB = 1 << 20


def _keys(check: redis.Redis) -> set[bytes]:
    return set(check.keys(PREFIX + "*"))


async def _embed_once(path: Path, url: str, text: str) -> tuple[np.ndarray, int, int]:
    """A fresh process's model at ``path`` (torch, a Redis tier): ``text``'s vector, its
    hits from Redis, and the vector computed with the cache off."""
    cache = EmbeddingCache(MiB, redis=RedisTier.from_url(url, ttl_s=60))
    settings = Settings(model_id=str(path), backend="torch")  # type: ignore[arg-type]
    model = load_local_model(settings, cache=cache)
    assert isinstance(model, LocalEmbeddingModel)
    try:
        async with started(model):
            got = await model.embed(req(text))
            fresh = await model.embed(req(text, cache=False))
        np.testing.assert_allclose(got.vectors[0], fresh.vectors[0], atol=1e-6)
        return got.vectors[0], cache.counts[model.info.name].hits_redis, len(got.vectors[0])
    finally:
        await cache.aclose()


@needs_redis_server
async def test_new_weights_at_the_same_path_never_answer_from_the_old_ones_entries(
    tmp_path: Path,
) -> None:
    """A rolling upgrade puts other weights in the same directory (no hub revision names
    them): the new model must compute, not read the old one's vectors from Redis."""
    path = tmp_path / "model"
    with redis_server() as server:
        check = redis.Redis(port=server.port)
        try:
            make_tiny_bert(path, seed=1)
            old, hits, _ = await _embed_once(path, server.url, "hello world")
            assert hits == 0
            await eventually(lambda: len(_keys(check)) == 1)
            again, hits, _ = await _embed_once(path, server.url, "hello world")
            assert hits == 1  # the same files: the same identity, shared
            np.testing.assert_array_equal(again, old)

            shutil.rmtree(path)
            make_tiny_bert(path, seed=2)  # same path, same config, other weights
            new, hits, _ = await _embed_once(path, server.url, "hello world")
            assert hits == 0
            assert not np.allclose(new, old, atol=1e-3)
            await eventually(lambda: len(_keys(check)) == 2)  # its own entry
        finally:
            check.close()


@needs_redis_server
async def test_a_new_tokenizer_at_the_same_path_never_answers_from_the_old_ones_entries(
    tmp_path: Path,
) -> None:
    """The same weights with another tokenizer.json (a fixed vocabulary, say): entries are
    keyed by text, and the text now reaches the weights as other ids."""
    path = tmp_path / "model"
    with redis_server() as server:
        make_tiny_bert(path, seed=1)
        old, hits, _ = await _embed_once(path, server.url, "hello world")
        assert hits == 0
        _, hits, _ = await _embed_once(path, server.url, "hello world")
        assert hits == 1  # the same files: shared

        file = path / "tokenizer.json"
        tokenizer = json.loads(file.read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
        file.write_text(json.dumps(tokenizer))
        new, hits, _ = await _embed_once(path, server.url, "hello world")
        assert hits == 0
        assert not np.allclose(new, old, atol=1e-3)


def _poisons(dim: int) -> dict[str, bytes]:
    """Values of the right length that no model could have written."""
    ones = np.ones(dim, "<f4").tobytes()
    return {
        "tokens past the cap": struct.pack("<I", 0xFFFFFFFF) + ones,
        "NaN": struct.pack("<I", 3) + np.full(dim, np.nan, "<f4").tobytes(),
        "infinity": struct.pack("<I", 3) + np.full(dim, np.inf, "<f4").tobytes(),
        "too short": struct.pack("<I", 3) + np.ones(dim - 1, "<f4").tobytes(),
    }


@needs_redis_server
async def test_values_in_redis_no_model_wrote_are_refused_counted_and_computed(
    tiny_model_dir: Path,
) -> None:
    with redis_server() as server:
        tiers = [RedisTier.from_url(server.url, ttl_s=60) for _ in range(2)]
        caches = [EmbeddingCache(MiB, redis=t) for t in tiers]
        a, b = (cached_model(tiny_model_dir, FakeBackend(), c) for c in caches)
        check = redis.Redis(port=server.port)
        try:
            async with started(a), started(b):
                poisons = _poisons(a.backend.dim)
                texts = [f"text {name}" for name in poisons]
                want = await a.embed(req(*texts, "good one"))
                await eventually(lambda: len(_keys(check)) == len(texts) + 1)
                for text, value in zip(texts, poisons.values(), strict=True):
                    key = (text, a._truncate(None), False, a._tag)
                    check.set(redis_key(a._identity, key), value)
                got = await b.embed(req(*texts, "good one"))
        finally:
            check.close()
            for c in caches:
                await c.aclose()
    for v, w in zip(got.vectors, want.vectors, strict=True):
        np.testing.assert_array_equal(v, w)  # computed again, finite
    assert got.prompt_tokens == want.prompt_tokens  # never 0xFFFFFFFF
    counts = caches[1].counts[b.info.name]
    assert (counts.redis_refused, counts.hits_redis, counts.misses) == (4, 1, 4)


async def test_token_id_keys_hold_the_truncated_ids_and_are_charged_what_they_hold(
    tiny_model_dir: Path,
) -> None:
    cache = EmbeddingCache(MiB)
    backend = FakeBackend()
    async with started(cached_model(tiny_model_dir, backend, cache)) as model:
        cap = model.spec.max_input_length
        head = [5 + k % 20 for k in range(cap)]
        long = [*head, *range(5, 25)] * 400  # 8,000 ids past the cap, cut on the right
        first = await model.embed(EmbedRequest(inputs=[long], truncate=True))
        memory = cache.memory
        assert memory is not None and len(memory) == 1
        ((key, (_, charged)),) = memory._entries.items()
        assert sys.getsizeof(key[0]) <= 64 + 4 * cap  # the ids embedded, 4 bytes each
        # The charge covers what the entry holds: the key's ids and both vectors.
        assert charged >= sys.getsizeof(key[0]) + 2 * 4 * model.backend.dim
        assert charged < 2048

        # Other ids past the cap embed the same tokens: the same entry.
        hit = await model.embed(EmbedRequest(inputs=[[*head, 7, 7, 7]], truncate=True))
        exact = await model.embed(EmbedRequest(inputs=[head]))
        assert len(backend.batches) == 1
        np.testing.assert_array_equal(hit.vectors[0], first.vectors[0])
        np.testing.assert_array_equal(exact.vectors[0], first.vectors[0])
        assert hit.prompt_tokens == cap
        # Cut on the left, the same ids embed other tokens: another entry.
        await model.embed(EmbedRequest(inputs=[[*head, 7, 7, 7]], truncate=True, **_left()))
        assert len(backend.batches) == 2
        # A text never meets ids, whatever its characters.
        await model.embed(req(key[0].decode("latin-1")))
        assert len(backend.batches) == 3


def _left() -> dict[str, object]:
    from embedplex.backends.tokenizer import TruncationDirection

    return {"truncation_direction": TruncationDirection.LEFT}


@needs_redis_server
@pytest.mark.parametrize("bad", [2**63, 2**64 + 5, -1, 10**6])
async def test_ids_outside_the_vocabulary_get_the_same_422_with_the_redis_tier(
    tiny_model_dir: Path, bad: int
) -> None:
    answers = []
    with redis_server() as server:
        for tier in (None, RedisTier.from_url(server.url, ttl_s=60)):
            cache = EmbeddingCache(MiB, redis=tier)
            model = cached_model(tiny_model_dir, FakeBackend(), cache)
            settings = Settings(model_id=str(tiny_model_dir))  # type: ignore[arg-type]
            app = create_app(
                settings, gateway_factory=lambda s, m=model, c=cache: Gateway([m], cache=c)
            )
            async with running(app) as client:
                r = await client.post("/embed", json={"inputs": [[2, bad, 3]]})
                answers.append((r.status_code, r.json()))
            await cache.aclose()
    assert answers[0] == answers[1]
    assert answers[0][0] == 422 and "outside the vocabulary" in str(answers[0][1])


async def test_similarity_takes_the_opt_out_field(tiny_model_dir: Path) -> None:
    backend = FakeBackend()
    cache = EmbeddingCache(MiB)
    model = cached_model(tiny_model_dir, backend, cache)
    settings = Settings(model_id=str(tiny_model_dir))  # type: ignore[arg-type]
    app = create_app(settings, gateway_factory=lambda s: Gateway([model], cache=cache))
    body = {"inputs": {"source_sentence": "hello", "sentences": ["world", "cat"]}}
    async with running(app) as client:
        for path in ("/similarity", "/"):  # the root route takes a similarity body too
            for _ in range(2):  # never written, never read: computed both times
                r = await client.post(path, json={**body, "cache": False})
                assert r.status_code == 200, r.text
                assert len(r.json()) == 2
        assert len(backend.batches) == 4 and cache.memory is not None and not len(cache.memory)
        for _ in range(2):
            r = await client.post("/similarity", json=body)
        assert len(backend.batches) == 5 and len(cache.memory) == 3  # the default caches
        bad = await client.post("/similarity", json={**body, "cache": "no"})
        assert bad.status_code == 422


async def test_lowercasing_names_its_own_redis_entries(tiny_model_dir: Path) -> None:
    """A model with do_lower_case (sentence_bert_config.json) is not answered from entries
    written without lowercasing (before it was honoured): its inputs embed otherwise."""
    cache = EmbeddingCache(MiB, redis=RedisTier.from_url("redis://127.0.0.1:9", ttl_s=60))
    try:
        plain = cached_model(tiny_model_dir, FakeBackend(), cache)
        lowering = copy.copy(plain.tokenizer)
        lowering.lowered = True  # do_lower_case on a cased tokenizer (tokenizer_for)
        spec = dataclasses.replace(plain.spec, lowercase=True)
        lower = LocalEmbeddingModel(spec, lowering, plain.backend, plain.options, cache=cache)
        assert lower._identity != plain._identity
        # do_lower_case where the tokenizer lowercases already changes no vector, nor the name
        same = LocalEmbeddingModel(spec, plain.tokenizer, plain.backend, plain.options, cache=cache)
        assert same._identity == plain._identity
    finally:
        await cache.aclose()
