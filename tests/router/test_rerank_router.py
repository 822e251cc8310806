"""Remote rerank through the provider lanes: merging, splitting, policies, the shared breaker."""

from __future__ import annotations

import asyncio
import math

import pytest

from conftest import RouterFactory
from embedplex.core.errors import (
    EmptyInputError,
    InvalidRequestError,
    RateLimitedError,
    UnavailableError,
    UpstreamError,
    UpstreamRefusedError,
)
from embedplex.core.types import EmbedRequest, RerankRequest
from embedplex.providers.base import budget_tokens
from embedplex.providers.config import RouteConfig
from embedplex.providers.health import CircuitState
from embedplex.providers.router import RemoteModel, RemoteRerankModel, remote_model
from embedplex.providers.runtime import PROBE_TEXT
from upstream_fakes import FakeUpstream, Fault, provider, score_for


def rr(query: str, *texts: str, **kw: object) -> RerankRequest:
    return RerankRequest(query=query, texts=list(texts), **kw)  # type: ignore[arg-type]


def scores(query: str, texts: list[str]) -> list[float]:
    return [score_for(query, t) for t in texts]


async def test_callers_with_one_query_share_a_call_other_queries_do_not(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("c", upstream, "cohere", max_wait_ms=50))
    jobs = [router.rerank(rr("q1", f"a{i}", f"b{i}"), ["c"]) for i in range(3)]
    jobs += [router.rerank(rr("q2", f"z{i}"), ["c"]) for i in range(2)]
    results = await asyncio.gather(*jobs)
    assert sorted(len(c.texts) for c in upstream.calls) == [2, 6]  # one call per query
    for call in upstream.calls:
        q = call.body["query"]
        assert all(t.startswith("z" if q == "q2" else ("a", "b")) for t in call.texts)
    for i in range(3):
        assert results[i].scores == scores("q1", [f"a{i}", f"b{i}"])
        assert results[i].provider == "c"
    assert results[4].scores == scores("q2", ["z1"])
    stats = router.runtimes["c"].stats()
    assert stats["counters"]["upstream_rerank_calls"] == 2
    assert stats["rerank"]["batches"] == 1
    assert stats["rerank"]["lanes"][0]["key"]["raw_scores"] is False


async def test_more_documents_than_one_call_takes_are_split_and_merged_in_order(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_texts = 3  # the fake TEI's /info says 3 per call, and it answers 413 above
    router = await make_router(provider("t", upstream, "tei"))
    docs = [f"doc {i}" for i in range(8)]
    result = await router.rerank(rr("query", *docs), ["t"])
    assert result.scores == scores("query", docs)
    assert [len(c.texts) for c in upstream.calls] == [3, 3, 2]
    assert [t for c in upstream.calls for t in c.texts] == docs
    assert result.prompt_tokens == 4 * len(docs)  # x-compute-tokens, shared back out


async def test_a_413_splits_the_call(upstream: FakeUpstream, make_router: RouterFactory) -> None:
    router = await make_router(provider("v", upstream, "voyage"))
    upstream.max_texts = 2  # the fake refuses more than 2; Voyage's own limit says 1,000
    docs = ["a", "b", "c", "d"]
    result = await router.rerank(rr("q", *docs), ["v"])
    assert result.scores == scores("q", docs)
    assert router.runtimes["v"].counters["splits"] == 1


async def test_rerank_calls_are_cut_by_the_rerank_token_cap(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """With a cap on a rerank call's tokens (Voyage's "query tokens x documents + document
    tokens"), each call holds what fits it, the query counted with every document."""
    config = provider(
        "v", upstream, "voyage", max_rerank_tokens=300, max_wait_ms=1000, max_quiet_ms=100
    )
    router = await make_router(config)
    query = "q" * 30
    docs = [f"{i:02d}" + "d" * 88 for i in range(20)]  # 90 bytes each
    pair = budget_tokens(query) + budget_tokens(docs[0])
    result = await router.rerank(rr(query, *docs), ["v"])
    assert result.scores == scores(query, docs)
    assert [t for c in upstream.calls for t in c.texts] == docs
    assert all(pair * len(c.texts) <= 300 for c in upstream.calls)
    assert len(upstream.calls) == math.ceil(len(docs) / (300 // pair))
    assert router.runtimes["v"].stats()["rerank"]["max_tokens_per_call"] == 300


async def test_a_rerank_call_refused_for_its_tokens_teaches_the_cap(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """A refusal that names the upstream's cap (here in Voyage's words) cuts the refused call
    and becomes the rerank lanes' budget: the next request is cut before any refusal."""
    upstream.max_batch_tokens = 200  # the fake counts the documents, two bytes a token
    # No cap told (Voyage's 600,000 set aside): what the refusal says is all there is (a told
    # cap bounds what a refusal may teach, docs/router.md).
    config = provider("v", upstream, "voyage", max_quiet_ms=0, max_rerank_tokens=0)
    router = await make_router(config)
    rt = router.runtimes["v"]
    docs = [f"{i:02d}" + "d" * 58 for i in range(40)]  # 30 of the fake's tokens each
    result = await router.rerank(rr("query", *docs), ["v"])
    assert result.scores == scores("query", docs)
    assert rt.counters["size_refusals"] == 1
    upstream.calls.clear()
    more = [f"{i:02d}" + "e" * 58 for i in range(40)]
    assert (await router.rerank(rr("query", *more), ["v"])).scores == scores("query", more)
    assert rt.counters["size_refusals"] == 1  # cut to fit before the call
    assert all(len(c.texts) * 30 <= 200 for c in upstream.calls)
    learned = rt.stats()["rerank"]["max_tokens_per_call"]
    assert learned is not None and learned < 40 * (budget_tokens("query") + budget_tokens(docs[0]))


async def test_a_failed_query_fails_only_its_own_callers(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("o", upstream, max_attempts=1, max_wait_ms=50))
    upstream.script(Fault(status=400))  # the batch's first call fails, the second succeeds
    outcomes = await asyncio.gather(
        router.rerank(rr("q1", "x"), ["o"]),
        router.rerank(rr("q2", "y"), ["o"]),
        return_exceptions=True,
    )
    assert len(upstream.calls) == 2
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1
    # A one-document call's 400 is that input's refusal: its caller's 422 (guard.py).
    assert isinstance(failed[0], UpstreamRefusedError)
    assert isinstance(failed[0].__cause__, UpstreamError)


async def test_any_fails_over_on_5xx(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(
        provider("a", upstream, "tei", max_attempts=1), provider("b", upstream2, "voyage")
    )
    upstream.script(Fault(status=503))
    result = await router.rerank(rr("q", "x", "y"), ["a", "b"], "any")
    assert result.provider == "b"
    assert result.scores == scores("q", ["x", "y"])
    assert len(upstream.calls) == len(upstream2.calls) == 1
    assert router.runtimes["a"].counters["failovers"] == 1


async def test_429_with_retry_after_reaches_the_caller(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("c", upstream, "cohere", max_attempts=2))
    upstream.script(*[Fault(status=429, retry_after="0.2")] * 2)
    with pytest.raises(RateLimitedError) as info:
        await router.rerank(rr("q", "x"), ["c"])
    assert info.value.retry_after == 0.2
    assert len(upstream.calls) == 2


async def test_all_returns_every_providers_scores(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("a", upstream, "tei"), provider("b", upstream2, "cohere"))
    result = await router.rerank(rr("q", "x", "y"), ["a", "b"], "all")
    assert result.per_provider is not None
    assert list(result.per_provider) == ["a", "b"]
    for sub in result.per_provider.values():
        assert sub.scores == scores("q", ["x", "y"])
    assert result.scores == result.per_provider["a"].scores  # the first provider's


async def test_rerank_and_embed_share_one_breaker_and_probe_by_kind(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    config = provider("p", upstream, max_attempts=1, breaker_failures=2, breaker_cooldown_s=0.3)
    router = await make_router(config)
    rt = router.runtimes["p"]
    upstream.script(Fault(status=500), Fault(status=502))
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await router.rerank(rr("q", "x"), ["p"])
    assert rt.health.state is CircuitState.OPEN
    with pytest.raises(UnavailableError):  # the embedding side sees the same circuit
        await router.embed(EmbedRequest(inputs=["x"]), ["p"])
    assert len(upstream.calls) == 2
    await asyncio.sleep(0.3)
    await router.probe()  # the provider last served rerank: the probe reranks
    assert upstream.calls[-1].path == "/v1/rerank"
    assert upstream.calls[-1].body["query"] == PROBE_TEXT
    assert rt.health.state is CircuitState.CLOSED


async def test_validation(upstream: FakeUpstream, make_router: RouterFactory) -> None:
    router = await make_router(provider("c", upstream, "cohere"), max_client_batch_size=4)
    with pytest.raises(EmptyInputError):
        await router.rerank(rr("q"), ["c"])
    with pytest.raises(InvalidRequestError):
        await router.rerank(rr("q", "x", raw_scores=True), ["c"])
    assert upstream.calls == []


async def test_remote_model_picks_the_class_by_kind(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, "tei"))
    embed = remote_model(router, RouteConfig(model="e", providers=["p"]))
    rerank = remote_model(router, RouteConfig(model="r", providers=["p"], kind="rerank"))
    assert isinstance(embed, RemoteModel)
    assert embed.info.kind == "embedding"
    assert isinstance(rerank, RemoteRerankModel)
    assert rerank.info.kind == "reranker"
    await rerank.start()
    result = await rerank.rerank(rr("q", "x"))
    assert result.model == "r"
    assert result.scores == scores("q", ["x"])
    assert rerank.stats()["batches"] == 1


async def test_a_rerank_route_to_a_provider_without_rerank_url_fails_at_start(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, endpoint=upstream.url + "/x/vectors"))
    model = remote_model(router, RouteConfig(model="r", providers=["p"], kind="rerank"))
    with pytest.raises(ValueError, match="rerank_endpoint"):
        await model.start()
