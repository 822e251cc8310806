"""Real clients against a real server with the real model (all-MiniLM-L6-v2).

``huggingface_hub``'s ``InferenceClient`` pointed at the base URL (it posts to ``/``), LangChain's
``OpenAIEmbeddings`` sending chunks longer than the model takes, and TEI's token-level routes
checked against the pooled ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from helpers import running, served
from reference import TEXTS, min_cosine

pytestmark = pytest.mark.model

LONG = TEXTS[13]  # ~1,200 tokens: over the model's 256 and over 512
SHORT = ["hello world", "The quick brown fox jumps over the lazy dog.", "a"]


@pytest.fixture(scope="module")
def base_url(model_cache: Path) -> Iterator[str]:
    with served(create_app(Settings(cache_dir=model_cache))) as url:
        yield url


def test_inference_client_feature_extraction(base_url: str, reference: np.ndarray) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=base_url, api_key="unused")
    got = client.feature_extraction(TEXTS[1])
    cut = client.feature_extraction(LONG)  # auto-truncate is on by default
    assert got.shape == (1, 384)
    assert min_cosine(got, reference[1:2]) >= 0.99999
    assert min_cosine(cut, reference[13:14]) >= 0.99999


def test_inference_client_sentence_similarity(base_url: str, reference: np.ndarray) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=base_url, api_key="unused")
    others = [1, 4, 8, 13]
    scores = client.sentence_similarity(TEXTS[0], [TEXTS[i] for i in others])
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert scores == pytest.approx([float(unit[i] @ unit[0]) for i in others], abs=1e-5)


def test_langchain_openai_embeddings_with_long_chunks(base_url: str, reference: np.ndarray) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=base_url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    docs = embeddings.embed_documents([LONG, TEXTS[14], *SHORT])
    query = embeddings.embed_query(SHORT[0])
    expected = np.concatenate([reference[13:15], reference[[0, 1, 4]]])
    assert min_cosine(np.array(docs), expected) >= 0.99999
    assert min_cosine(np.array([query]), reference[0:1]) >= 0.99999


@pytest.mark.parametrize("backend", ["onnx", "torch"])
async def test_embed_all_mean_is_embed(backend: str, model_cache: Path) -> None:
    """all-MiniLM-L6-v2 mean-pools: the mean of /embed_all's rows is /embed's raw vector."""
    texts = [*SHORT, TEXTS[7], LONG]
    async with running(create_app(Settings(backend=backend, cache_dir=model_cache))) as client:
        every = await client.post("/embed_all", json={"inputs": texts})
        pooled = await client.post("/embed", json={"inputs": texts, "normalize": False})
        tokens = await client.post("/tokenize", json={"inputs": SHORT})
    assert every.status_code == 200, every.text
    rows = [np.array(m, dtype=np.float32) for m in every.json()]
    assert [len(r) for r in rows[:3]] == [len(t) for t in tokens.json()]
    assert len(rows[-1]) == 256  # truncated to the model's max_seq_length
    assert all(r.shape[1] == 384 for r in rows)
    means = np.stack([r.mean(axis=0) for r in rows])
    assert np.allclose(means, pooled.json(), atol=1e-5)


async def test_similarity_and_decode_on_the_real_tokenizer(model_cache: Path) -> None:
    sentences = ["a fast auburn fox", "stock markets fell", "The quick brown fox"]
    async with running(create_app(Settings(cache_dir=model_cache))) as client:
        sim = await client.post(
            "/similarity",
            json={"inputs": {"source_sentence": "the quick brown fox", "sentences": sentences}},
        )
        vectors = np.array(
            (
                await client.post("/embed", json={"inputs": ["the quick brown fox", *sentences]})
            ).json()
        )
        ids = [
            t["id"]
            for t in (await client.post("/tokenize", json={"inputs": "Hello, World!"})).json()[0]
        ]
        plain = await client.post("/decode", json={"ids": ids})
        special = await client.post("/decode", json={"ids": [ids], "skip_special_tokens": False})
    assert np.allclose(sim.json(), vectors[1:] @ vectors[0], atol=1e-6)
    assert sim.json()[2] > sim.json()[0] > sim.json()[1]
    assert plain.json() == ["hello, world!"]
    assert special.json() == ["[CLS] hello, world! [SEP]"]
