"""Rerankers: a tiny random cross-encoder against sentence-transformers, and the rerank routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Encoding, Tokenizer

from embedplex.api.app import create_app
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.config import Settings
from helpers import running
from tiny_models import make_tiny_reranker, set_model_max_length

pytestmark = pytest.mark.slow

QUERY = "quick brown fox"
TEXTS = ["the quick brown fox jumps", "a lazy dog", "hello world", "fox fox fox", "search"]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_reranker(tmp_path_factory.mktemp("rerankers") / "tiny-ce", seed=11)


@pytest.fixture(scope="module")
def expected(reranker_dir: Path) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(reranker_dir), device="cpu")
    scores: np.ndarray = model.predict([(QUERY, t) for t in TEXTS])  # sigmoid by default
    return scores


@pytest.mark.parametrize("backend", ["onnx", "torch"])
async def test_tei_rerank_matches_sentence_transformers(
    reranker_dir: Path, expected: np.ndarray, backend: str, tmp_path: Path
) -> None:
    settings = Settings(model_id=str(reranker_dir), backend=backend, cache_dir=tmp_path)
    async with running(create_app(settings)) as client:
        r = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})
        raw = await client.post(
            "/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}
        )
        info = (await client.get("/info")).json()
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [item["score"] for item in body]
    assert scores == sorted(scores, reverse=True)
    assert sorted(item["index"] for item in body) == list(range(len(TEXTS)))
    by_index = np.array(
        [next(x["score"] for x in body if x["index"] == i) for i in range(len(TEXTS))]
    )
    assert np.allclose(by_index, expected, atol=1e-5)
    assert all(item["text"] == TEXTS[item["index"]] for item in body)
    logits = {x["index"]: x["score"] for x in raw.json()}
    assert np.allclose(
        [1 / (1 + np.exp(-logits[i])) for i in range(len(TEXTS))], expected, atol=1e-5
    )
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }


async def test_cohere_and_jina_shapes(
    reranker_dir: Path, expected: np.ndarray, tmp_path: Path
) -> None:
    settings = Settings(model_id=str(reranker_dir), cache_dir=tmp_path)
    docs = [TEXTS[0], {"text": TEXTS[1]}, *TEXTS[2:]]
    async with running(create_app(settings)) as client:
        v1 = await client.post(
            "/v1/rerank",
            json={"model": "rerank-english-v3.0", "query": QUERY, "documents": docs, "top_n": 3},
        )
        v2 = await client.post(
            "/v2/rerank", json={"model": "m", "query": QUERY, "documents": TEXTS}
        )
        v1_no_docs = await client.post(
            "/v1/rerank", json={"query": QUERY, "documents": TEXTS, "return_documents": False}
        )
    body = v1.json()
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected)[:3])
    assert np.allclose(
        [r["relevance_score"] for r in body["results"]], np.sort(expected)[::-1][:3], atol=1e-5
    )
    assert body["results"][0]["document"] == {"text": TEXTS[body["results"][0]["index"]]}
    assert body["usage"]["total_tokens"] > len(TEXTS)
    assert len(v2.json()["results"]) == len(TEXTS)
    assert "document" not in v2.json()["results"][0]
    assert "document" not in v1_no_docs.json()["results"][0]


async def test_cohere_rank_fields_score_the_fields_as_cohere_renders_them(
    reranker_dir: Path, tmp_path: Path
) -> None:
    """Cohere v1 object documents through the local cross-encoder: ranked on the rank_fields as
    ``name: value`` lines, scored as sentence-transformers scores that text."""
    from sentence_transformers import CrossEncoder

    docs = [
        {"title": "Foxes", "body": TEXTS[0], "url": "https://example.com/0"},
        {"body": TEXTS[1], "title": "Dogs"},
        {"title": "Search", "body": TEXTS[4]},
    ]
    rendered = [f"title: {d['title']}\nbody: {d['body']}" for d in docs]
    want = CrossEncoder(str(reranker_dir), device="cpu").predict([(QUERY, t) for t in rendered])
    settings = Settings(model_id=str(reranker_dir), cache_dir=tmp_path)
    async with running(create_app(settings)) as client:
        r = await client.post(
            "/v1/rerank",
            json={"query": QUERY, "documents": docs, "rank_fields": ["title", "body"]},
        )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [row["index"] for row in results] == list(np.argsort(-want))
    got = [next(row["relevance_score"] for row in results if row["index"] == i) for i in range(3)]
    assert np.allclose(got, want, atol=1e-5)
    assert all(row["document"] == docs[row["index"]] for row in results)  # whole, as Cohere


async def test_rerank_errors_and_kind_mismatch(reranker_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model_id=str(reranker_dir), cache_dir=tmp_path, max_client_batch_size=3)
    long_text = " ".join(["fox"] * 80)
    async with running(create_app(settings)) as client:
        empty = await client.post("/rerank", json={"query": QUERY, "texts": []})
        many = await client.post("/rerank", json={"query": QUERY, "texts": ["a"] * 4})
        too_long = await client.post(
            "/rerank", json={"query": QUERY, "texts": [long_text], "truncate": False}
        )
        truncated = await client.post("/rerank", json={"query": QUERY, "texts": [long_text]})
        embed = await client.post("/embed", json={"inputs": "hello"})
        oai = await client.post(
            "/v1/embeddings", json={"input": "hello", "model": str(reranker_dir)}
        )
        bad = await client.post("/v1/rerank", json={"query": QUERY, "documents": [5]})
    assert empty.status_code == 400
    assert many.status_code == 422
    assert too_long.status_code == 422
    assert truncated.status_code == 200
    assert embed.status_code == 404
    assert "no embedding model" in embed.json()["error"]
    assert oai.status_code == 400  # OpenAI's status for an invalid request
    assert "reranker" in oai.json()["error"]["message"]
    assert bad.status_code == 422


async def test_a_cross_encoders_length_and_labels_come_from_its_files(tmp_path: Path) -> None:
    """Pairs are cut at the tokenizer's model_max_length, as ``CrossEncoder`` cuts them (not
    at the 64 positions), and /info names the config's labels, in TEI's shape."""
    import json

    from sentence_transformers import CrossEncoder

    model_dir = set_model_max_length(make_tiny_reranker(tmp_path / "ce", seed=14), 12)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(id2label={"0": "relevant"}, label2id={"relevant": 0})
    (model_dir / "config.json").write_text(json.dumps(config))
    texts = [*TEXTS, " ".join(["fox", "dog"] * 20)]
    expected = CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, t) for t in texts])
    settings = Settings(model_id=str(model_dir), backend="torch")
    async with running(create_app(settings)) as client:
        r = await client.post("/rerank", json={"query": QUERY, "texts": texts})
        refused = await client.post(
            "/rerank", json={"query": QUERY, "texts": texts[-1:], "truncate": False}
        )
        info = (await client.get("/info")).json()
    scores = {x["index"]: x["score"] for x in r.json()}
    got = np.array([scores[i] for i in range(len(texts))])
    # Random weights score every pair near 0.5: cut at the 64 positions, the long pair was
    # 4e-5 from CrossEncoder's; the engines agree to 3e-8.
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert refused.status_code == 422 and "maximum of 12" in refused.text
    assert info["max_input_length"] == 12
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "relevant"}, "label2id": {"relevant": 0}}
    }


def test_classifiers_with_many_labels_are_refused(tmp_path: Path) -> None:
    import json

    from embedplex.core.errors import FatalBackendError
    from embedplex.models.loading import load_local_model

    model_dir = make_tiny_reranker(tmp_path / "clf")
    config = json.loads((model_dir / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FatalBackendError, match="3 labels"):
        load_local_model(Settings(model_id=str(model_dir), cache_dir=tmp_path))


class Paired:
    """The model's truncating tokenizer, noting the tokens each pair is handed with: those
    truncation cut (an encoding's overflow) included, as each is copied wherever it goes."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.held: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def post_process(self, encoding: Encoding, pair: Encoding | None = None, **kw: Any) -> Any:
        self.held += [held(e) for e in (encoding, pair) if e is not None]
        return self.tok.post_process(encoding, pair, **kw)


def held(encoding: Encoding) -> int:
    return len(encoding) + sum(held(o) for o in encoding.overflowing)


async def test_a_two_megabyte_query_costs_each_document_what_a_short_one_does(
    reranker_dir: Path, tmp_path: Path
) -> None:
    """A 1.96 MB query with 200 one-letter documents, default settings: the query's tokens
    past what a pair keeps were copied into each of its 200 pairs (25 s of a core, and other
    rerank callers waited). Now each pair is handed at most a cut query and its document."""
    settings = Settings(model_id=str(reranker_dir), cache_dir=tmp_path)
    app = create_app(settings)
    docs = ["d"] * 200
    async with running(app) as client:
        tokenizer = app.state.gateway.reranker(None).tokenizer
        spy = Paired(tokenizer._truncating[TruncationDirection.RIGHT])
        tokenizer._truncating[TruncationDirection.RIGHT] = spy
        r = await client.post(
            "/v1/rerank", json={"query": "a " * 980_000, "documents": docs, "top_n": 3}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3
    assert len({x["index"] for x in body["results"]}) == 3
    assert all(0 <= x["index"] < len(docs) for x in body["results"])
    max_length = tokenizer.max_length
    assert len(spy.held) == 2 * len(docs)
    assert max(spy.held) <= max_length + 2  # a cut query, one token of its overflow
    assert body["usage"]["total_tokens"] == max_length * len(docs)
