"""Remote rerank routes served by the app: /rerank and /v1/rerank answered by fake providers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_router_api import serve

from embedplex.config import Settings
from embedplex.providers.config import ProviderConfig, RouteConfig
from upstream_fakes import FakeUpstream, Fault, provider, score_for

QUERY = "what is a cat"
DOCS = ["dogs bark", "a cat is a small feline", "stock prices", "kittens purr"]


def settings(upstream: FakeUpstream, upstream2: FakeUpstream, **kw: Any) -> Settings:
    """An embedding route and three rerank routes (one provider, fail-over, fan-out)."""
    return Settings(
        local_model=False,
        providers=[
            provider("jina", upstream, "openai", max_attempts=1, rerank_model="jina-reranker"),
            provider("tei", upstream2, "tei", max_attempts=1),
        ],
        routes=[
            RouteConfig(model="embedder", providers=["jina"]),
            RouteConfig(model="reranker", providers=["jina"], kind="rerank"),
            RouteConfig(model="safe-reranker", providers=["jina", "tei"], kind="rerank"),
            RouteConfig(model="both", providers=["jina", "tei"], policy="all", kind="rerank"),
        ],
        **kw,
    )


@pytest.fixture
async def client(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings(upstream, upstream2)) as (_, c):
        yield c


def ranked(query: str, docs: list[str]) -> list[tuple[int, float]]:
    scored = [(i, score_for(query, d)) for i, d in enumerate(docs)]
    return sorted(scored, key=lambda pair: pair[1], reverse=True)


async def test_v1_rerank_returns_remote_scores_and_respects_top_n(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    body = {"model": "reranker", "query": QUERY, "documents": DOCS, "top_n": 2}
    r = await client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "reranker"
    want = ranked(QUERY, DOCS)[:2]
    assert [(row["index"], row["relevance_score"]) for row in out["results"]] == want
    assert out["results"][0]["document"] == {"text": DOCS[want[0][0]]}
    assert r.headers["x-embedplex-provider"] == "jina"
    assert "providers" not in out
    (call,) = upstream.calls
    assert call.path == "/v1/rerank"
    assert call.body["model"] == "jina-reranker"
    assert call.body["top_n"] == len(DOCS)  # every score upstream; top_n applied here


async def test_tei_rerank_route_answers_from_the_remote_reranker(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/rerank", json={"model": "reranker", "query": QUERY, "texts": DOCS, "return_text": True}
    )
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [(row["index"], row["score"]) for row in rows] == ranked(QUERY, DOCS)
    assert rows[0]["text"] == DOCS[rows[0]["index"]]
    assert r.headers["x-embedplex-provider"] == "jina"


async def test_embedding_and_rerank_routes_side_by_side(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "embedder", "input": "hi"})
    assert r.status_code == 200
    r = await client.post(
        "/v1/rerank", json={"model": "embedder", "query": QUERY, "documents": DOCS}
    )
    assert r.status_code == 422
    assert "embedding" in r.json()["error"]
    r = await client.post("/v1/embeddings", json={"model": "reranker", "input": "hi"})
    assert r.status_code == 422
    r = await client.post("/v1/rerank", json={"model": "nope", "query": QUERY, "documents": DOCS})
    assert r.status_code == 404
    assert "both, reranker, safe-reranker" in r.json()["error"]  # the served rerankers


async def test_any_fails_over_when_the_first_provider_returns_5xx(
    client: httpx.AsyncClient, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    upstream.script(Fault(status=502))
    body = {"model": "safe-reranker", "query": QUERY, "documents": DOCS}
    r = await client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-embedplex-provider"] == "tei"
    assert [row["index"] for row in r.json()["results"]] == [i for i, _ in ranked(QUERY, DOCS)]
    assert len(upstream.calls) == len(upstream2.calls) == 1
    assert upstream2.calls[0].path == "/rerank"


async def test_upstream_429_passes_through_with_retry_after(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.script(Fault(status=429, retry_after="2"))
    r = await client.post("/rerank", json={"model": "reranker", "query": QUERY, "texts": DOCS})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    upstream.script(Fault(status=503))
    r = await client.post("/rerank", json={"model": "reranker", "query": QUERY, "texts": DOCS})
    assert r.status_code == 502


async def test_all_carries_every_providers_ranking(client: httpx.AsyncClient) -> None:
    body = {"model": "both", "query": QUERY, "documents": DOCS, "top_n": 3}
    r = await client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    want = [i for i, _ in ranked(QUERY, DOCS)[:3]]
    assert [row["index"] for row in out["results"]] == want  # the first provider's
    assert list(out["providers"]) == ["jina", "tei"]
    for sub in out["providers"].values():
        assert [row["index"] for row in sub["results"]] == want


async def test_unsupported_parameter_is_a_4xx(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/rerank", json={"model": "reranker", "query": QUERY, "texts": DOCS, "raw_scores": True}
    )
    assert r.status_code == 422  # refused before any upstream call, in TEI's error shape
    assert "raw_scores" in r.json()["error"]
    r = await client.post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": []})
    assert r.status_code == 400
    assert r.json() == {"error": "texts cannot be empty", "error_type": "Empty"}


def test_kind_is_read_from_toml_and_a_name_clash_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "embedplex.toml"
    path.write_text(
        "local_model = false\n"
        '[[providers]]\nname = "c"\ntype = "cohere"\nrerank_model = "rerank-v3.5"\n'
        '[[routes]]\nmodel = "rr"\nproviders = ["c"]\nkind = "rerank"\n'
    )
    loaded = Settings.load(path)
    assert loaded.routes[0].kind == "rerank"
    assert loaded.providers[0].rerank_model == "rerank-v3.5"
    c = ProviderConfig(name="c", type="cohere")
    with pytest.raises(ValueError, match="unique"):
        Settings(
            local_model=False,
            providers=[c],
            routes=[
                RouteConfig(model="m", providers=["c"]),
                RouteConfig(model="m", providers=["c"], kind="rerank"),
            ],
        )
    with pytest.raises(ValueError, match="kind"):
        RouteConfig(model="m", providers=["c"], kind="classify")  # type: ignore[arg-type]
