"""What TEI's answers carry beside the body: its x-compute-* headers, a reranker's /info, and
every request counted under the model it named, an empty or refused one too.

Embedders "a" and "b" and reranker "r" on fake backends (``test_gateway_models.three``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from embedplex.config import Settings
from helpers import parse_metrics, running, value
from test_gateway_models import app_of, three

E_ACUTE = "\u00e9"  # one code point, two bytes in UTF-8: TEI counts it as one character
TEXTS = [f"h{E_ACUTE}llo world", "cat"]  # 11 + 3 characters


def computed(r: httpx.Response) -> tuple[int, int]:
    """An answer's (x-compute-characters, x-compute-tokens), after the headers TEI always
    sends beside them."""
    assert r.status_code == 200, r.text
    # Whole milliseconds, as TEI writes it (a client may parse an integer); the others keep
    # their three decimals.
    assert r.headers["x-compute-time"] == str(int(float(r.headers["x-total-time"])))
    assert r.headers["x-compute-type"] == "cpu"  # the fake backend's device
    return int(r.headers["x-compute-characters"]), int(r.headers["x-compute-tokens"])


async def test_answers_carry_teis_compute_headers(tiny_model_dir: Path) -> None:
    async with running(app_of(Settings(), three(tiny_model_dir))) as client:

        async def post(path: str, body: dict[str, Any]) -> httpx.Response:
            return await client.post(path, json=body)

        openai = await post("/v1/embeddings", {"input": TEXTS, "model": "a"})
        embed = await post("/embed", {"inputs": TEXTS, "model": "a"})
        root = await post("/", {"inputs": TEXTS, "model": "a"})
        native = await post("/api/embed", {"input": TEXTS, "model": "a"})
        ids = await post("/embed", {"inputs": [2, 18, 19, 3], "model": "a"})
        every = await post("/embed_all", {"inputs": TEXTS, "model": "a"})
        similar = await post(
            "/similarity",
            {"inputs": {"source_sentence": "cat", "sentences": TEXTS}, "model": "a"},
        )
        rerank_body = {"query": "fox", "texts": TEXTS, "model": "r"}
        tei_rerank = await post("/rerank", rerank_body)
        cohere = await post("/v1/rerank", {"query": "fox", "documents": TEXTS, "model": "r"})
        tokenized = await post("/tokenize", {"inputs": TEXTS, "model": "a"})
    usage = openai.json()["usage"]["prompt_tokens"]
    assert computed(openai) == computed(embed) == computed(root) == (14, usage)
    assert computed(native) == computed(every) == (14, usage)
    assert computed(ids) == (4, 4)  # token ids: TEI counts each id as a character
    assert computed(similar) == (3 + 14, usage + 3)  # [CLS] cat [SEP] besides
    pairs = cohere.json()["usage"]["total_tokens"]
    assert computed(tei_rerank) == computed(cohere) == (2 * 3 + 14, pairs)
    assert "x-compute-tokens" not in tokenized.headers  # as TEI: timings of embed and rerank


async def test_a_rerankers_info_gives_no_dimensions(tiny_model_dir: Path) -> None:
    async with running(app_of(Settings(), three(tiny_model_dir))) as client:
        embedder = (await client.get("/info", params={"model": "a"})).json()
        reranker = (await client.get("/info", params={"model": "r"})).json()
    assert embedder["dimensions"] == 16
    assert "reranker" in reranker["model_type"]
    assert "dimensions" not in reranker


async def test_empty_and_refused_requests_count_under_their_model(tiny_model_dir: Path) -> None:
    settings = Settings(max_request_tokens=4)
    async with running(app_of(settings, three(tiny_model_dir))) as client:
        answered = [
            await client.post("/api/rerank", json={"query": "q", "documents": [], "model": "r"}),
            await client.post("/api/embed", json={"input": [], "model": "a"}),
        ]
        refused = [
            await client.post(
                "/similarity",
                json={"inputs": {"source_sentence": "s", "sentences": []}, "model": "a"},
            ),
            await client.post("/embed", json={"inputs": [2, 5, 6, 7, 3], "model": "a"}),
            await client.post("/embed_all", json={"inputs": [2, 5, 6, 7, 3], "model": "a"}),
        ]
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert [r.status_code for r in answered] == [200, 200]
    assert [r.status_code for r in refused] == [400, 422, 422]
    for route, model in [
        ("/api/rerank", "r"),
        ("/api/embed", "a"),
        ("/similarity", "a"),
        ("/embed", "a"),
        ("/embed_all", "a"),
    ]:
        assert value(metrics, "embedplex_requests_total", route=route, model=model) == 1, route
    assert not any(labels and ("model", "-") in labels for _, labels in metrics), "some under -"
