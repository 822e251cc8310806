"""The exact embedding cache: bounded by bytes, partial hits merged in order, per-request
opt-out, counted in metrics and status, and shared across replicas through a real Redis."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import numpy as np
import pytest
import redis

from cache_helpers import cached_model, req, started
from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.cache import EmbeddingCache, MemoryCache, RedisTier
from embedplex.cache.keys import PREFIX
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.gateway import Gateway
from helpers import eventually, parse_metrics, running, value
from redis_server import needs_redis_server, redis_server

MiB = 1024 * 1024


def test_memory_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    cache: MemoryCache[str] = MemoryCache(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now "b" is the least recently used
    cache.put("c", "C", 40)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    assert (cache.bytes, len(cache), cache.evictions) == (80, 2, 1)
    cache.put("huge", "H", 101)  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("huge") is None and cache.evictions == 1
    cache.put("a", "A2", 10)  # replacing an entry recharges it
    assert cache.get("a") == "A2" and cache.bytes == 50


async def test_a_hit_never_reaches_the_backend_and_equals_a_fresh_computation(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend()
    cache = EmbeddingCache(MiB)
    async with started(cached_model(tiny_model_dir, backend, cache)) as model:
        first = await model.embed(req("hello world"))
        hit = await model.embed(req("hello world"))
        fresh = await model.embed(req("hello world", cache=False))
        raw = await model.embed(req("hello world", normalize=False))  # a hit too
    assert len(backend.batches) == 2  # the first and the cache: false one
    np.testing.assert_array_equal(hit.vectors[0], fresh.vectors[0])
    np.testing.assert_array_equal(first.vectors[0], fresh.vectors[0])
    np.testing.assert_array_equal(raw.vectors[0] / np.linalg.norm(raw.vectors[0]), hit.vectors[0])
    assert hit.prompt_tokens == fresh.prompt_tokens > 0  # a hit reports its tokens
    assert hit.timings.queue == 0 and hit.timings.inference == 0
    counts = cache.counts[model.info.name]
    assert (counts.hits_memory, counts.misses) == (2, 1)  # cache: false is neither


async def test_partial_hits_send_only_the_new_inputs_and_merge_in_order(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend()
    async with started(cached_model(tiny_model_dir, backend, EmbeddingCache(MiB))) as model:
        await model.embed(req("b", "d"))
        texts = ["a", "b", "c", "d", "e", "b", "a"]
        mixed = await model.embed(req(*texts))
        fresh = await model.embed(req(*texts, cache=False))
        ids = [[2, 5, 3], [2, 6, 3]]
        await model.embed(EmbedRequest(inputs=[ids[1]]))
        by_ids = await model.embed(EmbedRequest(inputs=ids))
        by_ids_fresh = await model.embed(EmbedRequest(inputs=ids, cache=False))
    assert backend.batches[1][0] == 3  # a, c, e: b and d were cached, repeats shared a slot
    assert len(mixed.vectors) == len(texts)
    for got, want in zip(mixed.vectors, fresh.vectors, strict=True):
        np.testing.assert_array_equal(got, want)
    assert mixed.prompt_tokens == fresh.prompt_tokens
    for got, want in zip(by_ids.vectors, by_ids_fresh.vectors, strict=True):
        np.testing.assert_array_equal(got, want)


async def test_the_cache_is_bounded_by_bytes_across_models(tiny_model_dir: Path) -> None:
    """One bound for every model; entries are charged their text and both vectors."""
    cache = EmbeddingCache(2000)  # two entries of a 16-dim fake with short texts (~700 bytes)
    models = [cached_model(tiny_model_dir, FakeBackend(), cache, name=f"m{k}") for k in range(2)]
    async with started(models[0]), started(models[1]):
        for k in range(4):
            await models[k % 2].embed(req(f"text {k}"))
        memory = cache.memory
        assert memory is not None
        assert 0 < memory.bytes <= 2000
        assert memory.evictions == 4 - len(memory) > 0
        again = await models[1].embed(req("text 3"))  # the newest stays
    assert again.vectors and cache.counts["m1"].hits_memory == 1


async def test_prompts_truncation_and_models_never_share_an_entry(tiny_model_dir: Path) -> None:
    cache = EmbeddingCache(MiB)
    backends = [FakeBackend(), FakeBackend()]
    models = [cached_model(tiny_model_dir, b, cache, name=f"m{k}") for k, b in enumerate(backends)]
    text = "a " * 300 + "b " * 300
    async with started(models[0]), started(models[1]):
        m = models[0]
        await m.embed(req(text, truncate=True))
        await m.embed(req(text, truncate=True, truncation_direction=TruncationDirection.LEFT))
        await m.embed(req(text, truncate=True, prompt="query: "))
        await models[1].embed(req(text, truncate=True))
    assert cache.counts["m0"].hits_memory == cache.counts["m1"].hits_memory == 0
    assert [len(b.batches) for b in backends] == [3, 1]


def _app(tiny_model_dir: Path, backend: FakeBackend, cache: EmbeddingCache) -> object:
    settings = Settings(model_id=str(tiny_model_dir), admin_secret="test-admin-secret")  # type: ignore[arg-type]
    model = cached_model(tiny_model_dir, backend, cache)
    return create_app(settings, gateway_factory=lambda s: Gateway([model], cache=cache))


async def test_the_opt_out_field_and_header_bypass_reading_and_writing(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend()
    cache = EmbeddingCache(MiB)
    app = _app(tiny_model_dir, backend, cache)
    async with running(app) as client:  # type: ignore[arg-type]
        routes = [
            ("/v1/embeddings", {"input": "t1"}),
            ("/embed", {"inputs": "t2"}),
            ("/api/v1/embed", {"inputs": "t3"}),
            ("/api/embed", {"input": "t4"}),
        ]
        for path, body in routes:
            for _ in range(2):  # never written, never read: computed both times
                r = await client.post(path, json={**body, "cache": False})
                assert r.status_code == 200, r.text
        assert len(backend.batches) == 8 and cache.memory is not None and not len(cache.memory)
        for directive in ("no-cache", "no-store", "private, No-Store"):
            r = await client.post(
                "/v1/embeddings", json={"input": "t1"}, headers={"Cache-Control": directive}
            )
            assert r.status_code == 200
        assert len(backend.batches) == 11 and not len(cache.memory)
        for _ in range(2):
            r = await client.post("/v1/embeddings", json={"input": "t1"})
        assert len(backend.batches) == 12  # the default caches
        bad = await client.post("/embed", json={"inputs": "x", "cache": "no"})
        assert bad.status_code == 422
        metrics = parse_metrics((await client.get("/metrics")).text)
        admin = {"authorization": "Bearer test-admin-secret"}
        status = (await client.get("/api/v1/status", headers=admin)).json()
    name = app.state.gateway.models[0].name  # type: ignore[attr-defined]
    assert value(metrics, "embedplex_cache_hits_total", model=name, tier="memory") == 1
    assert value(metrics, "embedplex_cache_misses_total", model=name) == 1
    assert value(metrics, "embedplex_cache_entries") == 1
    assert value(metrics, "embedplex_cache_bytes") > 0
    assert status["cache"]["(all models)"]["entries"] == 1
    assert status["cache"][name]["hits_memory"] == 1


@needs_redis_server
async def test_replicas_share_results_through_redis_and_survive_losing_it(
    tiny_model_dir: Path,
) -> None:
    with redis_server() as server:
        tiers = [RedisTier.from_url(server.url, ttl_s=60, probe_interval_s=0.1) for _ in range(2)]
        caches = [EmbeddingCache(MiB, redis=t) for t in tiers]
        backends = [FakeBackend(), FakeBackend()]
        a, b = (cached_model(tiny_model_dir, bk, c) for bk, c in zip(backends, caches, strict=True))
        check = redis.Redis(port=server.port)
        try:
            async with started(a), started(b):
                first = await a.embed(req("shared text", "only a"))
                await eventually(lambda: len(check.keys(PREFIX + "*")) == 2)
                assert all(0 < check.ttl(k) <= 60 for k in check.keys(PREFIX + "*"))
                mixed = await b.embed(req("new in b", "shared text"))
                assert len(backends[1].batches) == 1 and backends[1].batches[0][0] == 1
                np.testing.assert_array_equal(mixed.vectors[1], first.vectors[0])
                assert caches[1].counts[b.info.name].hits_redis == 1
                private = await b.embed(req("private", cache=False))
                assert private.vectors and len(check.keys(PREFIX + "*")) == 3

                server.stop()  # Redis goes away: answers go on, in-process only
                lost = await b.embed(req("while redis is away"))
                again = await b.embed(req("while redis is away"))
                assert lost.vectors and again.vectors and not tiers[1].up
                assert tiers[1].failures >= 1 and caches[1].counts[b.info.name].hits_memory == 1
                server.start()
                await eventually(lambda: tiers[1].up)
                await b.embed(req("after redis came back"))
                await eventually(lambda: len(check.keys(PREFIX + "*")) == 1)
        finally:
            check.close()
            for c in caches:
                await c.aclose()


@needs_redis_server
async def test_a_stalled_redis_costs_the_cache_one_timeout_not_two() -> None:
    """A lookup when Redis stalls waits ``redis_timeout_s`` once (the client retried it)."""
    with redis_server() as server:
        tier = RedisTier.from_url(server.url, ttl_s=60, timeout_s=1.0, probe_interval_s=60)
        assert server.proc is not None
        try:
            assert await tier.get_many(["a"]) == [None] and tier.up
            server.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = asyncio.get_running_loop().time()
                assert await tier.get_many(["a"]) == [None]
                waited = asyncio.get_running_loop().time() - t0
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert not tier.up and 0.9 < waited < 1.6, waited
        finally:
            await tier.aclose()


def test_cache_redis_needs_a_redis_url() -> None:
    with pytest.raises(ValueError, match="cache_redis needs cache_redis_url or redis_url"):
        Settings(cache_redis=True)
    with pytest.raises(ValueError, match="cache_redis_url is read only with cache_redis"):
        Settings(cache_redis_url="redis://127.0.0.1:6379/0")  # never silently unused
    assert Settings().cache_max_bytes > 0  # on by default (docs/cache.md says why)


@needs_redis_server
async def test_the_cache_tier_uses_its_own_redis_when_given_one() -> None:
    """``cache_redis_url``: entries go to the cache's Redis (one an operator runs with
    allkeys-lru), never to the rate limits' ``redis_url``, whose state it must not evict."""
    with redis_server() as limits, redis_server() as own:
        settings = Settings(cache_redis=True, redis_url=limits.url, cache_redis_url=own.url)
        cache = EmbeddingCache.from_settings(settings)
        assert cache.redis is not None
        assert cache.redis.where == f"127.0.0.1:{own.port}/0"  # named in its warnings
        check_limits, check_own = redis.Redis.from_url(limits.url), redis.Redis.from_url(own.url)
        try:
            cache.redis.put("k1", b"value")
            await eventually(lambda: check_own.get("k1") == b"value")
            assert check_limits.dbsize() == 0
            assert "***" in str(settings.redacted()["cache_redis_url"])  # a secret, as redis_url
        finally:
            check_limits.close()
            check_own.close()
            await cache.aclose()


async def test_a_hit_is_served_while_identical_work_is_still_queued(tiny_model_dir: Path) -> None:
    """Hits never queue: a cached input is answered even behind a busy backend."""
    backend = FakeBackend(delay=0.3)
    async with started(
        cached_model(tiny_model_dir, backend, EmbeddingCache(MiB), inference_streams=1)
    ) as model:
        await model.embed(req("cached"))
        busy = asyncio.create_task(model.embed(req("slow one")))
        await eventually(lambda: model.batcher.in_flight == 1)
        hit = await asyncio.wait_for(model.embed(req("cached")), 0.25)
        assert not busy.done()
        await busy
    assert hit.vectors


@pytest.mark.model
async def test_the_real_model_answers_hits_and_partial_hits_as_if_computed(
    model_cache: Path,
) -> None:
    """The default build (create_app, 64 MiB) on all-MiniLM-L6-v2: a request with cached and
    new inputs equals a fresh computation, usage included (vectors to float32 rounding: a pass
    over other batch-mates pads differently), and its hits are exactly what was computed."""
    settings = Settings(backend="torch", cache_dir=model_cache)
    texts = ["a cat sat on the mat", "embeddings are vectors", "東京は日本の首都です", "ok"]
    async with running(create_app(settings)) as client:
        warm = await client.post("/v1/embeddings", json={"input": texts[1:3], "dimensions": 64})
        mixed = await client.post("/v1/embeddings", json={"input": texts, "dimensions": 64})
        fresh = await client.post(
            "/v1/embeddings", json={"input": texts, "dimensions": 64, "cache": False}
        )
        tei = await client.post("/embed", json={"inputs": texts, "normalize": False})
        tei_fresh = await client.post(
            "/embed",
            json={"inputs": texts, "normalize": False},
            headers={"Cache-Control": "no-store"},
        )
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert warm.status_code == mixed.status_code == fresh.status_code == 200
    assert mixed.json()["usage"] == fresh.json()["usage"]
    got = [d["embedding"] for d in mixed.json()["data"]]
    assert got[1:3] == [d["embedding"] for d in warm.json()["data"]]  # the hits, exactly
    want = [d["embedding"] for d in fresh.json()["data"]]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    np.testing.assert_allclose(np.array(tei.json()), np.array(tei_fresh.json()), atol=1e-5)
    name = mixed.json()["model"]
    assert value(metrics, "embedplex_cache_hits_total", model=name, tier="memory") == 2 + 4
