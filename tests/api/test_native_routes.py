"""The FastEmbed-style /api/* routes: shapes, errors, limits; a fake embedder, a tiny reranker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from helpers import fake_app, running
from tiny_models import make_tiny_reranker


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(dim=16)


async def test_api_embed_shapes_match_embed(tiny_model_dir: Path, backend: FakeBackend) -> None:
    texts = ["hello world", "semantic search"]
    async with running(fake_app(tiny_model_dir, backend)) as client:
        listed = await client.post("/api/embed", json={"input": texts, "model": "anything"})
        one = await client.post("/api/embed", json={"text": texts[0], "model": "x"})
        batch = await client.post("/api/embed/batch", json={"texts": texts, "model": "x"})
        plain = await client.post("/api/embed", json={"input": texts[1]})
        tei = await client.post("/embed", json={"inputs": texts})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["model"] == str(tiny_model_dir)
    assert body["count"] == 2 and body["dimensions"] == 16
    assert np.allclose(body["embeddings"], tei.json(), atol=1e-7)
    assert np.allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-5)
    assert one.json()["count"] == 1 and np.allclose(one.json()["embeddings"][0], tei.json()[0])
    assert batch.json() == body
    assert np.allclose(plain.json()["embeddings"][0], tei.json()[1], atol=1e-7)
    assert float(listed.headers["x-inference-time"]) >= 0


async def test_api_embed_errors_and_limits(tiny_model_dir: Path, backend: FakeBackend) -> None:
    long_text = " ".join(["cat"] * 40)  # 42 tokens, max is 32
    app = fake_app(tiny_model_dir, backend, max_client_batch_size=2, max_queue_size=8)
    async with running(app) as client:
        empty = await client.post("/api/embed/batch", json={"texts": [], "model": "m"})
        many = await client.post("/api/embed/batch", json={"texts": ["a", "b", "c"]})
        neither = await client.post("/api/embed", json={"model": "m"})
        both = await client.post("/api/embed", json={"text": "a", "texts": ["b"]})
        typo = await client.post("/api/embed", json={"input": "a", "modle": "m"})
        wrong_type = await client.post("/api/embed", json={"input": [1, 2]})
        long = await client.post("/api/embed", json={"input": long_text})
        refused = await client.post("/api/embed", json={"input": long_text, "truncate": False})
    # an empty batch is an empty answer, as in the FastEmbed API
    assert empty.status_code == 200
    assert empty.json() == {
        "embeddings": [],
        "model": str(tiny_model_dir),
        "count": 0,
        "dimensions": 0,
    }
    assert many.status_code == 422 and "batch size 3" in many.json()["error"]
    assert neither.status_code == both.status_code == 422
    assert "exactly one of input, text or texts" in neither.json()["error"]
    assert typo.status_code == 422 and "modle" in typo.json()["error"]
    assert wrong_type.status_code == 422
    assert long.status_code == 200  # auto-truncate is on by default
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"


async def test_listings_on_an_embedding_server(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        embedders = await client.get("/api/embedders")
        rerankers = await client.get("/api/rerankers")
        rerank = await client.post("/api/rerank", json={"query": "q", "documents": ["d"]})
    assert embedders.json() == [
        {
            "id": str(tiny_model_dir),
            "name": str(tiny_model_dir),
            "description": f"{tiny_model_dir} (fake, float32)",
            "model_type": "embedding",
            "dimensions": 16,
        }
    ]
    assert rerankers.json() == []
    assert rerank.status_code == 404 and "no reranker" in rerank.json()["error"]


async def test_listings_while_loading_are_503(tiny_model_dir: Path) -> None:
    import httpx

    app = fake_app(tiny_model_dir, FakeBackend())  # lifespan not run: nothing loaded
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/api/embedders")
        models = await client.get("/v1/models")
    assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
    # Not an empty list, which a client reading it once at its start would take as the truth.
    assert models.status_code == 503, models.text
    assert models.json()["error"]["message"] == "no model is loaded yet"


QUERY = "quick brown fox"
DOCS = ["the quick brown fox jumps", "a lazy dog", "hello world", "fox fox fox", "search"]


@pytest.mark.slow
async def test_api_rerank_matches_tei_rerank(tmp_path: Path) -> None:
    reranker = make_tiny_reranker(tmp_path / "tiny-ce", seed=11)
    settings = Settings(model_id=str(reranker), cache_dir=tmp_path, max_client_batch_size=5)
    async with running(create_app(settings)) as client:
        tei = await client.post("/rerank", json={"query": QUERY, "texts": DOCS})
        api = await client.post(
            "/api/rerank", json={"query": QUERY, "documents": DOCS, "model": "any"}
        )
        top = await client.post(
            "/api/rerank",
            json={
                "query": QUERY,
                "documents": [{"text": d, "id": f"doc-{i}"} for i, d in enumerate(DOCS)],
                "top_n": 2,
                "return_scores": False,
            },
        )
        top_k = await client.post(
            "/api/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 3}
        )
        empty = await client.post("/api/rerank", json={"query": QUERY, "documents": []})
        many = await client.post("/api/rerank", json={"query": QUERY, "documents": ["a"] * 6})
        zero = await client.post(
            "/api/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 0}
        )
        rerankers = await client.get("/api/rerankers")
        embedders = await client.get("/api/embedders")
    assert api.status_code == 200, api.text
    results = api.json()["results"]
    assert api.json()["model"] == str(reranker)
    assert [r["index"] for r in results] == [r["index"] for r in tei.json()]
    assert np.allclose([r["score"] for r in results], [r["score"] for r in tei.json()], atol=1e-6)
    assert all(r["text"] == DOCS[r["index"]] and "id" not in r for r in results)
    assert top.json()["results"] == [
        {"index": r["index"], "id": f"doc-{r['index']}", "text": DOCS[r["index"]]}
        for r in results[:2]
    ]
    assert [r["index"] for r in top_k.json()["results"]] == [r["index"] for r in results[:3]]
    assert empty.status_code == 200 and empty.json() == {"results": [], "model": str(reranker)}
    assert many.status_code == 422
    assert zero.status_code == 422 and "top_n" in zero.json()["error"]
    assert [m["id"] for m in rerankers.json()] == [str(reranker)]
    assert rerankers.json()[0]["model_type"] == "reranker"
    assert "dimensions" not in rerankers.json()[0]
    assert embedders.json() == []


NEW_ROUTES = [
    ("POST", "/api/embed", {"input": "a"}),
    ("POST", "/api/embed/batch", {"texts": ["a"]}),
    ("GET", "/api/embedders", None),
    ("GET", "/api/rerankers", None),
    ("POST", "/embed_all", {"inputs": "a"}),
    ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
    ("POST", "/decode", {"ids": [18]}),
    ("POST", "/", {"inputs": "a"}),
]


async def test_new_routes_need_the_api_key(tiny_model_dir: Path, backend: FakeBackend) -> None:
    app = fake_app(tiny_model_dir, backend, api_key="s3cret")
    async with running(app) as client:
        for method, path, body in NEW_ROUTES:
            missing = await client.request(method, path, json=body)
            wrong = await client.request(
                method, path, json=body, headers={"authorization": "Bearer nope"}
            )
            empty = await client.request(
                method, path, json=body, headers={"authorization": "Bearer "}
            )
            right = await client.request(
                method, path, json=body, headers={"authorization": "Bearer s3cret"}
            )
            assert missing.status_code == wrong.status_code == empty.status_code == 401, path
            assert missing.json()["error_type"] == "Unauthorized"
            assert right.status_code == 200, (path, right.text)
