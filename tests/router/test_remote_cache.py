"""The embedding cache and in-flight dedupe for remote providers, over real HTTP fakes.

Every test counts what reached the fake upstream: a hit must cost no upstream call, a miss
exactly one text in one call.
"""

from __future__ import annotations

import asyncio
import os
import struct

import httpx
import numpy as np
import pytest
import redis
from test_router_api import ADMIN, router_settings, serve

from conftest import RouterFactory
from embedplex.cache import EmbeddingCache, RedisTier
from embedplex.cache.keys import PREFIX
from embedplex.config import Settings
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import UnavailableError, UpstreamError, UpstreamTimeoutError
from embedplex.core.types import EmbedRequest, EmbedResult
from embedplex.providers.base import EmbedParams
from embedplex.providers.cached import ENTRY_OVERHEAD, identity
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.health import CircuitState
from embedplex.providers.router import RemoteModel, Router
from embedplex.providers.tei import TEIProvider
from helpers import eventually, parse_metrics, value
from redis_server import needs_redis_server, redis_server
from upstream_fakes import FakeUpstream, Fault, provider, vector_for

MiB = 1 << 20


def req(*texts: str, **kw: object) -> EmbedRequest:
    return EmbedRequest(inputs=list(texts), **kw)  # type: ignore[arg-type]


def texts_sent(upstream: FakeUpstream) -> list[str]:
    return [t for call in upstream.calls for t in call.texts]


def check(vectors: list[np.ndarray], texts: list[str]) -> None:
    for v, t in zip(vectors, texts, strict=True):
        np.testing.assert_array_equal(v, vector_for(t))


async def test_a_hit_costs_no_upstream_call_and_reports_the_same_usage(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    first = await router.embed(req("hello there"), ["p"])
    again = await router.embed(req("hello there"), ["p"])
    assert len(upstream.calls) == 1
    check(again.vectors, ["hello there"])
    assert again.prompt_tokens == first.prompt_tokens > 0  # as if computed
    assert again.provider == "p"
    counts = cache.counts["p"]
    assert (counts.hits_memory, counts.misses) == (1, 1)
    assert router.runtimes["p"].counters["requests"] == 1  # the hit never entered a lane


async def test_partial_hits_are_merged_in_input_order(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    await router.embed(req("b", "d"), ["p"])
    texts = ["a", "b", "c", "d", "e", "a"]
    mixed = await router.embed(req(*texts), ["p"])
    assert upstream.calls[1].texts == ["a", "c", "e"]  # each miss once, in order
    check(mixed.vectors, texts)
    assert cache.counts["p"].hits_memory == 2


async def test_parameters_and_providers_never_share_entries(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(
        provider("p", upstream, "voyage"),
        provider("q", upstream, "voyage", model="other-model"),
        cache=cache,
    )
    await router.embed(req("t"), ["p"])
    await router.embed(req("t", dimensions=4), ["p"])
    await router.embed(req("t", extra={"input_type": "query"}), ["p"])
    await router.embed(req("t"), ["q"])  # same upstream, another model
    assert len(upstream.calls) == 4
    await router.embed(req("t", dimensions=4), ["p"])
    assert len(upstream.calls) == 4


async def test_opting_out_in_the_request_neither_reads_nor_writes(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    await router.embed(req("kept"), ["p"])
    await router.embed(req("kept", cache=False), ["p"])  # not read
    await router.embed(req("private", cache=False), ["p"])
    await router.embed(req("private"), ["p"])  # not written before
    assert texts_sent(upstream) == ["kept", "kept", "private", "private"]
    assert cache.memory is not None and len(cache.memory) == 2


async def test_a_provider_with_cache_false_keeps_nothing(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream, cache=False), cache=cache)
    for _ in range(3):
        await router.embed(req("secret"), ["p"])
    assert len(upstream.calls) == 3
    assert cache.memory is not None and len(cache.memory) == 0
    assert router.runtimes["p"].cache.redis is None


async def test_a_failover_is_never_answered_from_the_first_providers_entries(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(
        provider("a", upstream, max_attempts=1, breaker_failures=2, breaker_cooldown_s=60),
        provider("b", upstream2),
        cache=cache,
    )
    await router.embed(req("x"), ["a", "b"], "any")  # a's entry for x
    upstream.script(Fault(status=503))
    mixed = await router.embed(req("x", "y"), ["a", "b"], "any")  # a: x hit, y fails
    assert mixed.provider == "b"
    assert upstream2.calls[0].texts == ["x", "y"]  # b computes both, x too
    upstream.script(Fault(status=503))
    with pytest.raises(UpstreamError):
        await router.embed(req("z"), ["a"])
    assert router.runtimes["a"].health.state is CircuitState.OPEN
    upstream2.reset()
    skipped = await router.embed(req("x", "w"), ["a", "b"], "any")  # a skipped: circuit open
    assert skipped.provider == "b"
    assert texts_sent(upstream2) == ["w"]  # x: b's own entry, from the failover above
    check(skipped.vectors, ["x", "w"])


async def test_all_fans_out_with_each_providers_own_entries(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(
        provider("a", upstream), provider("b", upstream2, "tei"), cache=cache
    )
    await router.embed(req("x"), ["a"])  # a alone has x
    both = await router.embed(req("x", "y"), ["a", "b"], "all")
    assert texts_sent(upstream) == ["x", "y"]
    assert texts_sent(upstream2) == ["x", "y"]
    again = await router.embed(req("y", "x"), ["a", "b"], "all")
    assert len(upstream.calls) == 2 and len(upstream2.calls) == 1
    assert both.per_provider is not None and again.per_provider is not None
    for name in ("a", "b"):
        check(again.per_provider[name].vectors, ["y", "x"])
        assert again.per_provider[name].prompt_tokens == both.per_provider[name].prompt_tokens
    assert cache.counts["a"].hits_memory == 3 and cache.counts["b"].hits_memory == 2


@pytest.mark.parametrize("cached", [True, False])
async def test_identical_texts_in_flight_share_one_upstream_slot(
    upstream: FakeUpstream, make_router: RouterFactory, cached: bool
) -> None:
    cache = EmbeddingCache(MiB if cached else 0)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    upstream.delay = 0.2
    results = await asyncio.gather(
        *(router.embed(req("same", "same", f"own-{i}"), ["p"]) for i in range(5))
    )
    assert texts_sent(upstream).count("same") == 1
    for i, result in enumerate(results):
        check(result.vectors, ["same", "same", f"own-{i}"])
    assert cache.counts["p"].dedupe_joined == 9  # 1 in the first request, 1 + 1 in the others


async def test_a_caller_that_leaves_does_not_fail_the_others(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    upstream.delay = 0.3
    leader = asyncio.ensure_future(router.embed(req("shared"), ["p"]))
    await eventually(lambda: len(upstream.calls) == 1)  # its call is in flight
    joiner = asyncio.ensure_future(router.embed(req("shared"), ["p"]))
    await asyncio.sleep(0.02)
    leader.cancel()
    check((await joiner).vectors, ["shared"])  # queued again for it
    assert leader.cancelled()
    # A joiner that leaves gives up its own wait only.
    leader = asyncio.ensure_future(router.embed(req("second"), ["p"]))
    joiner = asyncio.ensure_future(router.embed(req("second"), ["p"]))
    await asyncio.sleep(0.05)
    joiner.cancel()
    check((await leader).vectors, ["second"])
    assert texts_sent(upstream).count("second") == 1


async def test_a_joiner_never_waits_on_a_call_bounded_by_an_earlier_deadline(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router: Router = await make_router(provider("p", upstream), cache=EmbeddingCache(MiB))
    upstream.delay = 0.3
    token = REQUEST_DEADLINE.set(Deadline.after(0.2, "test"))
    try:
        hasty = asyncio.ensure_future(router.embed(req("t"), ["p"]))
    finally:
        REQUEST_DEADLINE.reset(token)
    await eventually(lambda: len(upstream.calls) == 1)
    patient = asyncio.ensure_future(router.embed(req("t"), ["p"]))  # no deadline: its own call
    await asyncio.sleep(0.05)
    assert texts_sent(upstream) == ["t", "t"]
    with pytest.raises(UpstreamTimeoutError):  # its call was cut at its deadline...
        await hasty
    check((await patient).vectors, ["t"])  # ...and did not take the patient caller with it


async def test_failed_texts_are_not_cached(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router: Router = await make_router(provider("p", upstream, max_attempts=1), cache=cache)
    upstream.script(Fault(status=500))
    with pytest.raises(UpstreamError):
        await router.embed(req("f"), ["p"])
    assert cache.memory is not None and len(cache.memory) == 0
    check((await router.embed(req("f"), ["p"])).vectors, ["f"])
    await router.embed(req("f"), ["p"])
    assert texts_sent(upstream) == ["f", "f"]


async def test_entries_are_charged_honestly_within_the_byte_bound(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    one = len("text-0") + 49 + 8 * 4 + ENTRY_OVERHEAD  # getsizeof(str) is 49 + its length
    cache = EmbeddingCache(3 * one)
    router: Router = await make_router(provider("p", upstream), cache=cache)
    await router.embed(req("text-0"), ["p"])
    memory = cache.memory
    assert memory is not None and memory.bytes == one
    for i in range(1, 10):
        await router.embed(req(f"text-{i}"), ["p"])
    assert len(memory) == 3 and memory.bytes <= memory.max_bytes
    assert memory.evictions == 7
    await router.embed(req("text-9"), ["p"])  # the newest stayed
    assert len(upstream.calls) == 10
    # A cached vector is read-only (callers share it, nobody may change it) and holds only its
    # own data: its array's, or the decoded bytes it was made over, never a whole answer's.
    hit = (await router.embed(req("text-9"), ["p"])).vectors[0]
    assert not hit.flags.writeable
    assert hit.base is None or (type(hit.base) is bytes and len(hit.base) == hit.nbytes)


async def test_a_base64_row_is_kept_as_it_was_decoded(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """A base64 answer's row is a read-only array over its own bytes: the cache keeps that very
    array (no copy per text), and a hit hands it out again."""
    router: Router = await make_router(provider("p", upstream), cache=EmbeddingCache(MiB))
    miss = (await router.embed(req("t"), ["p"])).vectors[0]
    hit = (await router.embed(req("t"), ["p"])).vectors[0]
    assert hit is miss and not miss.flags.writeable
    assert type(miss.base) is bytes and len(miss.base) == miss.nbytes


async def test_the_probe_never_answers_from_the_cache(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    from embedplex.providers.runtime import PROBE_TEXT

    router: Router = await make_router(provider("p", upstream), cache=EmbeddingCache(MiB))
    await router.embed(req(PROBE_TEXT), ["p"])
    await router.runtimes["p"].probe()
    assert texts_sent(upstream) == [PROBE_TEXT, PROBE_TEXT]


@needs_redis_server
async def test_replicas_share_remote_answers_through_redis_without_texts_or_keys(
    upstream: FakeUpstream, make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RC_TEST_KEY", "sk-do-not-store-me")
    with redis_server() as server:
        tiers = [RedisTier.from_url(server.url, ttl_s=60) for _ in range(2)]
        caches = [EmbeddingCache(MiB, redis=t) for t in tiers]
        check_redis = redis.Redis(port=server.port)
        try:
            config = provider("p", upstream, api_key_env="RC_TEST_KEY")
            a: Router = await make_router(config, cache=caches[0])
            b: Router = await make_router(config, cache=caches[1])
            first = await a.embed(req("shared text"), ["p"])
            # The text's entry, and the vector length the upstream answers (for b to check it).
            await eventually(lambda: len(check_redis.keys(PREFIX + "*")) == 2)
            mixed = await b.embed(req("new in b", "shared text"), ["p"])
            assert upstream.calls[1].texts == ["new in b"]  # one MGET answered the other
            check(mixed.vectors, ["new in b", "shared text"])
            assert mixed.prompt_tokens > first.prompt_tokens
            assert caches[1].counts["p"].hits_redis == 1
            await eventually(lambda: len(check_redis.keys(PREFIX + "*")) == 3)
            await b.embed(req("not kept", cache=False), ["p"])
            await asyncio.sleep(0.05)
            stored = {k: check_redis.get(k) for k in check_redis.keys(PREFIX + "*")}
            assert len(stored) == 3
            secret = os.environ["RC_TEST_KEY"].encode()
            for key, value in stored.items():
                assert value is not None
                for never in (b"shared", b"new in b", secret, b"p-model"):
                    assert never not in key and never not in value
        finally:
            check_redis.close()
            for c in caches:
                await c.aclose()


async def test_the_http_opt_out_metrics_and_status_name_the_provider(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    async with serve(router_settings(upstream, upstream2)) as (_, client):
        body = {"model": "remote-x", "input": ["h", "i"]}
        for headers in ({}, {}, {"Cache-Control": "no-cache"}, {"cache-control": "No-Store"}):
            r = await client.post("/v1/embeddings", json=body, headers=headers)
            assert r.status_code == 200, r.text
        r = await client.post("/v1/embeddings", json={**body, "cache": False})
        assert r.status_code == 200
        assert len(upstream.calls) == 4  # the second was a hit; every opt-out went upstream
        r = await client.post("/v1/embeddings", json=body)
        assert r.json()["usage"]["prompt_tokens"] > 0
        metrics = parse_metrics((await client.get("/metrics")).text)
        status = (await client.get("/api/v1/status", headers=ADMIN)).json()
    assert len(upstream.calls) == 4
    assert value(metrics, "embedplex_cache_hits_total", model="a", tier="memory") == 4
    assert value(metrics, "embedplex_cache_misses_total", model="a") == 2
    assert value(metrics, "embedplex_cache_entries") == 2
    assert status["cache"]["a"]["hits_memory"] == 4
    assert status["cache"]["(all models)"]["entries"] == 2


async def test_the_batch_route_honours_the_no_cache_header(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    """Each sub-request of /v1/embeddings/batch takes Cache-Control as /v1/embeddings does."""
    async with serve(router_settings(upstream, upstream2)) as (_, client):
        body = {"requests": [{"id": "1", "model": "remote-x", "input": ["private"]}]}
        for _ in range(2):
            r = await client.post(
                "/v1/embeddings/batch", json=body, headers={"Cache-Control": "no-store"}
            )
            assert r.status_code == 200, r.text
        r = await client.post("/v1/embeddings", json={"model": "remote-x", "input": ["private"]})
        assert r.status_code == 200
    assert texts_sent(upstream) == ["private"] * 3  # neither read nor kept


async def test_a_caller_never_joins_a_call_that_failed_for_another(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """A call cut at a hasty caller's deadline fails that caller; a caller arriving in the same
    loop turn, before the flight is let go, queues afresh instead of taking that failure."""
    router: Router = await make_router(provider("p", upstream), cache=EmbeddingCache(MiB))
    runtime = router.runtimes["p"]
    real = runtime.provider.embed
    patient: list[asyncio.Future[object]] = []

    async def embed(texts: list[str], params: object, **kw: object) -> object:
        if not patient:  # scheduled now, it runs before the hasty caller's task lets go
            patient.append(asyncio.ensure_future(router.embed(req("t"), ["p"])))
            raise UpstreamTimeoutError("p: no answer within the hasty caller's deadline")
        return await real(texts, params, **kw)  # type: ignore[arg-type]

    runtime.provider.embed = embed  # type: ignore[method-assign]
    with pytest.raises(UpstreamTimeoutError):
        await router.embed(req("t"), ["p"])
    result = await patient[0]
    check(result.vectors, ["t"])  # type: ignore[attr-defined]
    assert texts_sent(upstream) == ["t"]


async def test_a_tei_upstreams_served_model_is_part_of_the_key() -> None:
    """TEI providers rarely name their model: what /info says the upstream serves keys the
    entries, so a redeploy of another model behind the same URL is a miss, not a stale hit."""
    served = {"model_id": "BAAI/bge-small-en-v1.5", "model_sha": "abc123"}

    def info(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/info"
        return httpx.Response(200, json={**served, "max_client_batch_size": 64})

    config = ProviderConfig(name="t", type="tei", endpoint="http://tei.internal:80")
    params = EmbedParams()
    keys = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(info)) as client:
        for model, sha in (("BAAI/bge-small-en-v1.5", "abc123"), ("BAAI/bge-base-en-v1.5", "d")):
            served.update(model_id=model, model_sha=sha)
            tei = TEIProvider(config, client)
            keys.append(identity(config, tei, params))  # /info not read yet
            await tei.start()
            assert tei.served == f"{model}@{sha}"
            keys.append(identity(config, tei, params))
    assert keys[0] == keys[2] and len(set(keys)) == 3  # the same URL, three identities


# -- an upstream outage: an open circuit still answers what its cache holds whole ------------


def outage_settings(upstream: FakeUpstream, upstream2: FakeUpstream) -> Settings:
    """``router_settings`` with provider a's circuit opening at its first failure, for a minute."""
    a = provider("a", upstream, max_attempts=1, breaker_failures=1, breaker_cooldown_s=60)
    settings = router_settings(upstream, upstream2)
    return settings.model_copy(update={"providers": [a, *settings.providers[1:]]})


async def open_circuit(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """Fail route remote-x's provider (a) once, which opens its circuit."""
    upstream.script(Fault(status=500))
    r = await client.post("/v1/embeddings", json={"model": "remote-x", "input": "fails"})
    assert r.status_code == 502, r.text
    status = (await client.get("/api/v1/status", headers=ADMIN)).json()
    assert status["providers"]["a"]["health"]["circuit"] == "open"


async def a_down(
    make_router: RouterFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    cache: EmbeddingCache,
    *kept: str,
) -> tuple[Router, EmbedResult]:
    """A router over providers a and b, and a's answer to ``kept``; then a fails once, which
    opens its circuit for a minute."""
    router: Router = await make_router(
        provider("a", upstream, max_attempts=1, breaker_failures=1, breaker_cooldown_s=60),
        provider("b", upstream2),
        cache=cache,
    )
    answer = await router.embed(req(*kept), ["a"])
    upstream.script(Fault(status=503))
    with pytest.raises(UpstreamError):
        await router.embed(req("fails"), ["a"])
    assert router.runtimes["a"].health.state is CircuitState.OPEN
    return router, answer


async def test_an_open_circuit_answers_a_one_provider_route_from_its_cache(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    async with serve(outage_settings(upstream, upstream2)) as (_, client):
        body = {"model": "remote-x", "input": ["kept", "also kept"]}
        before = await client.post("/v1/embeddings", json=body)
        assert before.status_code == 200, before.text
        await open_circuit(client, upstream)
        calls = len(upstream.calls)
        during = await client.post("/v1/embeddings", json=body)
        assert during.status_code == 200, during.text
        assert during.json() == before.json()  # the same vectors, usage and model
        assert during.headers["x-embedplex-provider"] == "a"
        for refused in (["not kept"], ["kept", "not kept"]):  # a miss, a partial hit: 503
            r = await client.post("/v1/embeddings", json={**body, "input": refused})
            assert r.status_code == 503, r.text
            assert "circuit is open" in r.json()["error"]["message"]
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert len(upstream.calls) == calls  # nothing reached the upstream during the outage
    assert value(metrics, "embedplex_cache_hits_total", model="a", tier="memory") == 2
    assert value(metrics, "embedplex_cache_misses_total", model="a") == 3  # both texts and "fails"


async def test_an_open_circuits_cache_lookup_is_bounded_by_the_request_deadline(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory, monkeypatch
) -> None:
    """The outage's lookup may wait on Redis: a deadline that passes meanwhile is a 504, as any
    wait past it is (the lookup ran before the deadline was armed); a plain miss is a 503
    that counts no failover (the provider was not tried)."""
    router, _ = await a_down(make_router, upstream, upstream2, EmbeddingCache(MiB), "x")
    model = RemoteModel(router, RouteConfig(model="m", providers=["a"]))
    with pytest.raises(UnavailableError, match="circuit is open"):
        await model.embed(req("missed"))
    assert router.runtimes["a"].counters["failovers"] == 1  # the failure that opened it

    async def slow_redis(request: EmbedRequest) -> EmbedResult | None:
        await asyncio.sleep(5)
        return None

    monkeypatch.setattr(router.runtimes["a"], "cached_only", slow_redis)
    token = REQUEST_DEADLINE.set(Deadline.after(0.2, "test"))
    try:
        with pytest.raises(UpstreamTimeoutError):
            await asyncio.wait_for(model.embed(req("x")), 2)
    finally:
        REQUEST_DEADLINE.reset(token)


async def test_an_open_circuit_never_answers_a_request_that_opts_out_of_the_cache(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    async with serve(outage_settings(upstream, upstream2)) as (_, client):
        body = {"model": "remote-x", "input": "kept"}
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200
        await open_circuit(client, upstream)
        r = await client.post("/v1/embeddings", json={**body, "cache": False})
        assert r.status_code == 503, r.text
        for header in ("no-cache", "no-store"):
            r = await client.post("/v1/embeddings", json=body, headers={"Cache-Control": header})
            assert r.status_code == 503, r.text
        r = await client.post("/v1/embeddings", json=body)  # not opted out: from the cache
        assert r.status_code == 200, r.text
    # With another provider to go to, the opted-out request fails over to it.
    router, _ = await a_down(make_router, upstream, upstream2, EmbeddingCache(MiB), "x")
    opted = await router.embed(req("x", cache=False), ["a", "b"], "any")
    assert opted.provider == "b"
    assert texts_sent(upstream2) == ["x"]


async def test_any_answers_from_an_open_providers_cache_only_when_it_holds_every_text(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    cache = EmbeddingCache(MiB)
    router, first = await a_down(make_router, upstream, upstream2, cache, "x", "y")
    model = RemoteModel(router, RouteConfig(model="m", providers=["a", "b"]))
    whole = await router.embed(req("y", "x"), ["a", "b"], "any")
    assert whole.provider == "a"
    check(whole.vectors, ["y", "x"])
    one = await model.embed(req("x"))  # the route's own path to several providers
    assert one.provider == "a"
    check(one.vectors, ["x"])
    again = await router.embed(req("x", "y"), ["a", "b"], "any")
    assert (again.provider, again.prompt_tokens) == ("a", first.prompt_tokens)
    check(again.vectors, ["x", "y"])
    assert upstream2.calls == []
    partial = await router.embed(req("x", "w"), ["a", "b"], "any")  # never a's x with b's w
    assert partial.provider == "b"
    assert texts_sent(upstream2) == ["x", "w"]
    check(partial.vectors, ["x", "w"])
    # Hits only where a answered; the partial lookup counts nothing for a (b counts its own).
    assert (cache.counts["a"].hits_memory, cache.counts["a"].misses) == (5, 3)
    assert (cache.counts["b"].hits_memory, cache.counts["b"].misses) == (0, 2)


async def test_all_takes_an_open_providers_whole_cache_answer_and_fails_otherwise(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router, _ = await a_down(make_router, upstream, upstream2, EmbeddingCache(MiB), "x")
    both = await router.embed(req("x"), ["a", "b"], "all")
    assert both.per_provider is not None and set(both.per_provider) == {"a", "b"}
    check(both.per_provider["a"].vectors, ["x"])
    with pytest.raises(UnavailableError):
        await router.embed(req("x", "w"), ["a", "b"], "all")


@needs_redis_server
async def test_an_open_circuit_answers_from_redis_what_another_replica_computed(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    with redis_server() as server:
        caches = [
            EmbeddingCache(MiB, redis=RedisTier.from_url(server.url, ttl_s=60)) for _ in range(2)
        ]
        check_redis = redis.Redis(port=server.port)
        try:
            config = provider(
                "p", upstream, max_attempts=1, breaker_failures=1, breaker_cooldown_s=60
            )
            a: Router = await make_router(config, cache=caches[0])
            b: Router = await make_router(config, cache=caches[1])
            await a.embed(req("shared", "other"), ["p"])
            await eventually(lambda: len(check_redis.keys(PREFIX + "*")) == 3)  # and the length
            upstream.script(Fault(status=503))
            with pytest.raises(UpstreamError):
                await b.embed(req("fails"), ["p"])
            calls = len(upstream.calls)
            with pytest.raises(UnavailableError):  # one text missing: nothing counted
                await b.embed(req("shared", "nowhere"), ["p"])
            assert caches[1].counts["p"].hits_redis == 0
            during = await b.embed(req("other", "shared"), ["p"])
            check(during.vectors, ["other", "shared"])
            assert len(upstream.calls) == calls
            counts = caches[1].counts["p"]
            # "shared" came into b's process with the partial lookup: a memory hit now.
            assert (counts.hits_memory, counts.hits_redis) == (1, 1)
        finally:
            check_redis.close()
            for c in caches:
                await c.aclose()


def _remote_poisons(dim: int) -> dict[str, bytes]:
    """Values no upstream answered: a wrong length, a NaN vector, token shares out of range."""
    ones = np.ones(dim, "<f4").tobytes()
    return {
        "short": struct.pack("<d", 3.0) + np.ones(5, "<f4").tobytes(),
        "nan vector": struct.pack("<d", 3.0) + np.full(dim, np.nan, "<f4").tobytes(),
        "nan share": struct.pack("<d", float("nan")) + ones,
        "inf share": struct.pack("<d", float("inf")) + ones,
        "negative share": struct.pack("<d", -1e12) + ones,
        "huge share": struct.pack("<d", 1e12) + ones,
    }


@needs_redis_server
@pytest.mark.parametrize("warm", [True, False], ids=["called-here", "fresh-replica"])
async def test_remote_values_in_redis_no_upstream_answered_are_refused_and_computed(
    upstream: FakeUpstream, make_router: RouterFactory, warm: bool
) -> None:
    """A replica that has called the upstream checks values against the length it answered; a
    fresh one against the length another replica put in Redis."""
    with redis_server() as server:
        caches = [
            EmbeddingCache(MiB, redis=RedisTier.from_url(server.url, ttl_s=60)) for _ in range(2)
        ]
        check_redis = redis.Redis(port=server.port)
        try:
            config = provider("p", upstream)
            a: Router = await make_router(config, cache=caches[0])
            b: Router = await make_router(config, cache=caches[1])
            poisons = _remote_poisons(len(vector_for("x")))
            texts = [f"text {name}" for name in poisons]
            for text in [*texts, "good one"]:  # one at a time, to learn each one's key
                before = set(check_redis.keys(PREFIX + "*"))
                await a.embed(req(text), ["p"])

                def entries(before: set[bytes] = before) -> list[bytes]:
                    new = set(check_redis.keys(PREFIX + "*")) - before
                    return [k for k in new if check_redis.strlen(k) > 8]  # not the length's

                await eventually(lambda e=entries: len(e()) == 1)
                if text in texts:
                    check_redis.set(entries()[0], poisons[text[5:]])
            if warm:
                await b.embed(req("warm"), ["p"])
            sent = len(texts_sent(upstream))
            got = await b.embed(req(*texts, "good one"), ["p"])
            computed = texts_sent(upstream)[sent:]
            want = await a.embed(req(*texts, "good one", cache=False), ["p"])
        finally:
            check_redis.close()
            for c in caches:
                await c.aclose()
    check(got.vectors, [*texts, "good one"])  # the poisoned ones computed again
    assert sorted(computed) == sorted(texts)  # "good one" came from Redis
    assert 0 < got.prompt_tokens == want.prompt_tokens
    counts = caches[1].counts["p"]
    assert (counts.redis_refused, counts.hits_redis) == (len(texts), 1)
