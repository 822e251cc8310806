"""Rerank adapters against the real HTTP fake: each vendor's request shape, scores in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.errors import InvalidRequestError, UpstreamError
from embedplex.providers import PROVIDER_TYPES, HttpProvider
from embedplex.providers.adapter import rerank_url
from embedplex.providers.base import RerankParams
from embedplex.providers.http import Attempt, Outcome
from upstream_fakes import FakeUpstream, Fault, logit_for, provider, rerank_path, score_for

QUERY = "what is a cat"
DOCS = ["cats purr", "dogs bark", "a cat is a small feline", "stock prices", "kittens"]
KINDS = ["openai", "voyage", "cohere", "tei"]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def adapter(
    upstream: FakeUpstream, client: httpx.AsyncClient, kind: str, **kw: Any
) -> tuple[HttpProvider, list[Attempt]]:
    p = PROVIDER_TYPES[kind](provider("p", upstream, kind, **kw), client)
    attempts: list[Attempt] = []
    p.bind(attempts.append, lambda: None)
    await p.start()
    return p, attempts


@pytest.mark.parametrize("kind", KINDS)
async def test_each_adapter_returns_scores_in_document_order(
    upstream: FakeUpstream, client: httpx.AsyncClient, kind: str
) -> None:
    p, attempts = await adapter(upstream, client, kind)
    out = await p.rerank(QUERY, DOCS, RerankParams())
    # The fake answers best first; the adapter must put each score back at its document.
    assert out.scores == [score_for(QUERY, d) for d in DOCS]
    assert out.scores != sorted(out.scores, reverse=True)  # so the order test means something
    assert [a.outcome for a in attempts] == [Outcome.OK]
    call = upstream.calls[0]
    assert call.path == rerank_path(kind)
    assert call.texts == DOCS
    assert call.body["query"] == QUERY


async def test_request_shapes_follow_each_vendor(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    n = len(DOCS)
    bodies = {}
    for kind in KINDS:
        upstream.reset()
        p, _ = await adapter(upstream, client, kind, rerank_model=f"{kind}-reranker")
        await p.rerank(QUERY, DOCS, RerankParams())
        bodies[kind] = upstream.calls[0].body
    # Every score is asked for (top_n = all): callers with one query share a call, and each
    # caller's own top_n is applied when the answer is shaped.
    assert bodies["openai"] == {
        "model": "openai-reranker",
        "query": QUERY,
        "documents": DOCS,
        "top_n": n,
        "return_documents": False,
    }
    assert bodies["cohere"] == {
        "model": "cohere-reranker",
        "query": QUERY,
        "documents": DOCS,
        "top_n": n,
    }
    assert bodies["voyage"] == {
        "query": QUERY,
        "documents": DOCS,
        "model": "voyage-reranker",
        "top_k": n,
    }
    assert bodies["tei"] == {"query": QUERY, "texts": DOCS, "raw_scores": False}


async def test_model_defaults_rerank_model_then_model_then_vendor(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "cohere", model=None)
    await p.rerank(QUERY, DOCS[:1], RerankParams())
    assert upstream.calls[-1].body["model"] == "rerank-v3.5"
    p, _ = await adapter(upstream, client, "voyage", model=None)
    await p.rerank(QUERY, DOCS[:1], RerankParams())
    assert upstream.calls[-1].body["model"] == "rerank-2.5"
    p, _ = await adapter(upstream, client, "voyage", model="rerank-2.5-lite")
    await p.rerank(QUERY, DOCS[:1], RerankParams())
    assert upstream.calls[-1].body["model"] == "rerank-2.5-lite"


async def test_tei_passes_raw_scores_truncation_and_reads_tokens(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "tei")
    params = RerankParams(
        truncate=True, truncation_direction=TruncationDirection.LEFT, raw_scores=True
    )
    p.check_rerank(params)
    out = await p.rerank(QUERY, DOCS, params)
    assert out.scores == pytest.approx([logit_for(QUERY, d) for d in DOCS])
    assert upstream.calls[0].body == {
        "query": QUERY,
        "texts": DOCS,
        "raw_scores": True,
        "truncate": True,
        "truncation_direction": "Left",
    }
    assert out.tokens == 4 * len(DOCS)  # x-compute-tokens


async def test_voyage_truncation_and_usage(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "voyage")
    out = await p.rerank(QUERY, DOCS, RerankParams(truncate=False))
    assert upstream.calls[0].body["truncation"] is False
    assert out.tokens == 6 * len(DOCS)


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("cohere", RerankParams(raw_scores=True), "raw_scores"),
        ("cohere", RerankParams(truncate=False), "truncate"),
        ("voyage", RerankParams(raw_scores=True), "raw_scores"),
        ("voyage", RerankParams(truncation_direction=TruncationDirection.LEFT), None),
        ("openai", RerankParams(truncate=True), "truncate"),
    ],
)
async def test_parameters_a_vendor_cannot_honour_are_refused(
    upstream: FakeUpstream,
    client: httpx.AsyncClient,
    kind: str,
    params: RerankParams,
    field: str | None,
) -> None:
    p, _ = await adapter(upstream, client, kind)
    with pytest.raises(InvalidRequestError) as info:
        p.check_rerank(params)
    assert info.value.param == (field or "truncation_direction")
    p.check_rerank(RerankParams(truncate=True) if kind == "cohere" else RerankParams())


async def test_a_partial_or_repeated_ranking_is_a_malformed_answer(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, attempts = await adapter(upstream, client, "openai")
    # A server that ignores top_n and answers fewer documents: never guess missing scores.
    original = p.rerank_body

    def short(query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        return {**original(query, documents, params), "top_n": 2}

    p.rerank_body = short  # type: ignore[method-assign]
    with pytest.raises(UpstreamError, match="no score for 3 of 5 documents"):
        await p.rerank(QUERY, DOCS, RerankParams())
    assert attempts[-1].outcome is Outcome.MALFORMED
    assert len(upstream.calls) == 1  # malformed answers are not retried


async def test_upstream_errors_map_as_for_embeddings(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, attempts = await adapter(upstream, client, "cohere", max_attempts=3)
    upstream.script(Fault(status=503), Fault(status=500))
    out = await p.rerank(QUERY, DOCS, RerankParams())  # 5xx retried within the budget
    assert out.scores == [score_for(QUERY, d) for d in DOCS]
    assert [a.status for a in attempts] == [503, 500, 200]
    upstream.script(Fault(status=400))
    with pytest.raises(UpstreamError):
        await p.rerank(QUERY, DOCS, RerankParams())
    assert len(upstream.calls) == 4  # a 400 is not retried


def test_rerank_url_sits_beside_the_embeddings_url() -> None:
    assert rerank_url(None, "http://h:1/embed") == "http://h:1/rerank"
    assert rerank_url(None, "https://api.voyageai.com/v1/embeddings") == (
        "https://api.voyageai.com/v1/rerank"
    )
    assert rerank_url(None, "https://api.cohere.com/v2/embed") == (
        "https://api.cohere.com/v2/rerank"
    )
    assert rerank_url(None, "http://h/custom/vectors") is None  # not guessed
    assert rerank_url("http://r/score", "http://h/custom/vectors") == "http://r/score"


async def test_no_rerank_url_is_a_clear_error(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "openai", endpoint=upstream.url + "/custom/vectors")
    with pytest.raises(InvalidRequestError, match="rerank_endpoint"):
        p.check_rerank(RerankParams())
    with pytest.raises(InvalidRequestError, match="rerank_endpoint"):
        await p.rerank(QUERY, DOCS, RerankParams())
    assert upstream.calls == []
