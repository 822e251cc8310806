"""Rerank scores that cannot be ranked: a NaN from a local cross-encoder, a score that is not a
JSON number from a remote one. One NaN scrambles the sort of every other score (Python's sort
compares NaN as neither less nor greater) and reaches the caller as ``null``: both are refused
instead, as TEI refuses a NaN (424 "score is NaN")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.core.errors import UpstreamError
from embedplex.providers import PROVIDER_TYPES
from embedplex.providers.adapter import parse_ranked
from embedplex.providers.base import RerankParams
from embedplex.providers.config import ProviderConfig
from helpers import running
from tiny_models import make_tiny_reranker

DOCS = ["the cat", "a dog", "the quick fox", "blue sky", "hello world", "red"]


def make_nan_reranker(path: Path) -> Path:
    """The tiny cross-encoder with a NaN embedding for "fox": a pair holding that word scores
    NaN (as an fp16 overflow does), every other pair scores as before."""
    import torch
    from transformers import BertForSequenceClassification

    make_tiny_reranker(path, seed=11)
    model = BertForSequenceClassification.from_pretrained(str(path))
    vocab = (path / "vocab.txt").read_text().split()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[vocab.index("fox")] = float("nan")
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.mark.slow
async def test_a_nan_from_the_model_is_a_424_not_a_null_ranked_anywhere(tmp_path: Path) -> None:
    settings = Settings(model_id=str(make_nan_reranker(tmp_path / "ce")), backend="torch")
    async with running(create_app(settings)) as client:
        tei = await client.post("/rerank", json={"query": "quick", "texts": DOCS})
        cohere = await client.post("/v1/rerank", json={"query": "dog", "documents": DOCS})
        raw = await client.post(
            "/rerank", json={"query": "quick", "texts": DOCS, "raw_scores": True}
        )
        fine = await client.post("/rerank", json={"query": "quick", "texts": DOCS[:2]})
    for r in (tei, cohere, raw):
        assert r.status_code == 424, r.text
        assert r.json()["error_type"] == "Backend"
        assert "text 2" in r.json()["error"]
    # The batch's other pairs are not spoiled: a request without the word still answers.
    assert fine.status_code == 200
    assert all(isinstance(x["score"], float) for x in fine.json())


@pytest.mark.slow
async def test_v1_refusals_name_documents_and_count_under_the_model(tmp_path: Path) -> None:
    model_dir = make_tiny_reranker(tmp_path / "ce", seed=11)
    settings = Settings(model_id=str(model_dir), cache_dir=tmp_path, max_client_batch_size=2)
    async with running(create_app(settings)) as client:
        empty = await client.post("/v1/rerank", json={"query": "q", "documents": []})
        many = await client.post("/v2/rerank", json={"query": "q", "documents": ["a"] * 3})
        metrics = (await client.get("/metrics")).text
    assert empty.status_code == 400
    assert empty.json() == {"error": "documents cannot be empty", "error_type": "Empty"}
    assert many.status_code == 422
    label = f'model="{model_dir}"'
    for error_type, route in (("empty", "/v1/rerank"), ("payload_too_large", "/v2/rerank")):
        labels = f'error_type="{error_type}",{label},route="{route}"'
        assert f"embedplex_request_failures_total{{{labels}}} 1.0" in metrics


# -- remote: what an upstream's ranking may hold -------------------------------------------


@pytest.mark.parametrize("bad", ["NaN", "inf", "0.5", True, None, [0.5]])
def test_a_score_that_is_not_a_json_number_is_malformed(bad: Any) -> None:
    rows = [{"index": 0, "score": 0.25}, {"index": 1, "score": bad}]
    with pytest.raises(ValueError, match="result 1: score is a JSON"):
        parse_ranked(rows, 2, "score")


def test_integers_are_numbers() -> None:
    assert parse_ranked([{"index": 1, "s": 0}, {"index": 0, "s": 1}], 2, "s") == [1.0, 0.0]


def _answer(kind: str, scores: list[Any]) -> Any:
    """Each vendor's rerank answer with these scores (as JSON the upstream sends)."""
    if kind == "tei":
        return [{"index": i, "score": s} for i, s in enumerate(scores)]
    rows = [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]
    if kind == "voyage":
        return {"object": "list", "data": rows, "model": "m", "usage": {"total_tokens": 9}}
    return {"id": "x", "results": rows, "model": "m", "usage": {"total_tokens": 9}}


@pytest.mark.parametrize("kind", ["openai", "voyage", "cohere", "tei"])
async def test_each_adapter_refuses_a_nan_written_as_a_string(kind: str) -> None:
    """``float("NaN")`` is a float: before, the caller got ``null`` and a scrambled ranking."""
    scores: list[Any] = [0.3, 0.1, "NaN", 0.9, 0.5]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/info"):
            return httpx.Response(200, json={"max_client_batch_size": 32})
        body = json.loads(request.content)
        n = len(body.get("texts") or body["documents"])
        return httpx.Response(200, json=_answer(kind, scores[:n]))

    endpoint = {"tei": "http://up/embed", "openai": "http://up/v1/embeddings"}.get(kind)
    config = ProviderConfig(name="p", type=kind, endpoint=endpoint, max_attempts=1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        p = PROVIDER_TYPES[kind](config, client)
        p.bind(lambda attempt: None, lambda: None)
        await p.start()
        docs = [f"d{i}" for i in range(len(scores))]
        with pytest.raises(UpstreamError, match="malformed") as info:
            await p.rerank("q", docs, RerankParams())
        assert "result 2" in info.value.message
        scores[2] = 0.7
        assert (await p.rerank("q", docs, RerankParams())).scores == [0.3, 0.1, 0.7, 0.9, 0.5]
