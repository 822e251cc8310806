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
    assert r.status_code == 400  # OpenAI's status for it
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
    assert r.json() == {"error": "documents cannot be empty", "error_type": "Empty"}


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


async def test_tei_rerank_ignores_fields_tei_does_not_know(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    """LiteLLM's ``huggingface/`` rerank posts ``top_n`` in TEI's body (a 422 here before); TEI
    ignores it, and so does this route: every text is scored and returned."""
    body = {
        "query": QUERY,
        "texts": DOCS,
        "raw_scores": False,
        "truncation_direction": "Right",
        "return_text": True,
        "top_n": 2,
        "model": "reranker",
    }
    r = await client.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    assert [(row["index"], row["score"]) for row in r.json()] == ranked(QUERY, DOCS)
    assert "top_n" not in upstream.calls[0].body or upstream.calls[0].body["top_n"] == len(DOCS)


OBJECTS = [
    {"title": "Dogs", "body": "dogs bark", "id": "d1"},
    {"title": "Cats", "body": "a cat is a small feline", "id": "d2"},
    {"body": "stock prices", "id": "d3"},  # no title: its line is left out
]


async def test_cohere_v1_object_documents_are_ranked_on_their_rank_fields(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    """Cohere v1: the fields named in rank_fields, in that order, as ``name: value`` lines (a
    name given twice counts once); the whole object comes back with its result."""
    body = {
        "model": "reranker",
        "query": QUERY,
        "documents": OBJECTS,
        "rank_fields": ["title", "body", "title"],
        "return_documents": True,
    }
    r = await client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    texts = ["title: Dogs\nbody: dogs bark", "title: Cats\nbody: a cat is a small feline"]
    texts.append("body: stock prices")
    assert upstream.calls[0].texts == texts
    results = r.json()["results"]
    assert [(row["index"], row["relevance_score"]) for row in results] == ranked(QUERY, texts)
    assert [row["document"] for row in results] == [OBJECTS[row["index"]] for row in results]


async def test_cohere_v1_object_documents_without_rank_fields_use_text(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    docs: list[Any] = [{"text": DOCS[0], "url": "u0"}, DOCS[1], {"text": DOCS[2]}]
    r = await client.post(
        "/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": docs}
    )
    assert r.status_code == 200, r.text
    assert upstream.calls[0].texts == DOCS[:3]
    results = r.json()["results"]
    echoed = {row["index"]: row["document"] for row in results}  # v1: returned by default
    assert echoed == {0: docs[0], 1: {"text": DOCS[1]}, 2: docs[2]}


@pytest.mark.parametrize(
    ("documents", "extra", "fragment"),
    [
        ([{"title": "no text"}], {}, 'documents.0: an object document needs a "text" field'),
        ([{"text": "a"}, {"x": "b"}], {"rank_fields": ["text"]}, "documents.1 has none of"),
        ([{"text": "a", "year": 2020}], {}, "valid string"),
        ([{f"f{i}": "v" for i in range(65)}], {}, "at most 64 items"),
        (["a"], {"rank_fields": [f"f{i}" for i in range(65)]}, "at most 64 items"),
    ],
    ids=["no-text", "no-rank-field", "not-a-string", "too-many-fields", "too-many-rank-fields"],
)
async def test_cohere_object_documents_are_bounded_and_checked(
    client: httpx.AsyncClient,
    upstream: FakeUpstream,
    documents: list[Any],
    extra: dict[str, Any],
    fragment: str,
) -> None:
    body = {"model": "reranker", "query": QUERY, "documents": documents, **extra}
    r = await client.post("/v1/rerank", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]
    assert r.json()["error_type"] == "Validation"
    assert upstream.calls == []
