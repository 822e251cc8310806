"""The real default model (all-MiniLM-L6-v2) against sentence-transformers, over HTTP."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from helpers import running
from reference import TEXTS, min_cosine

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", params=["onnx", "torch"])
def settings(request: pytest.FixtureRequest, model_cache: Path) -> Settings:
    return Settings(backend=request.param, cache_dir=model_cache)


async def test_tei_embed_matches_sentence_transformers(
    settings: Settings, reference: np.ndarray
) -> None:
    async with running(create_app(settings)) as client:
        r = await client.post("/embed", json={"inputs": TEXTS, "truncate": True})
        single = await client.post("/embed", json={"inputs": TEXTS[1]})
    assert r.status_code == 200, r.text
    got = np.array(r.json(), dtype=np.float32)
    assert got.shape == (len(TEXTS), 384)
    assert min_cosine(got, reference) >= 0.99999
    assert min_cosine(np.array(single.json()), reference[1:2]) >= 0.99999


async def test_openai_route_matches_sentence_transformers(
    settings: Settings, reference: np.ndarray
) -> None:
    short = TEXTS[:13]
    async with running(create_app(settings)) as client:
        f = await client.post(
            "/v1/embeddings", json={"input": short, "model": "text-embedding-3-small"}
        )
        b = await client.post(
            "/v1/embeddings", json={"input": short, "encoding_format": "base64", "model": "x"}
        )
    floats = np.array([d["embedding"] for d in f.json()["data"]], dtype=np.float32)
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b.json()["data"]]
    )
    assert min_cosine(floats, reference[:13]) >= 0.99999
    assert min_cosine(decoded, reference[:13]) >= 0.99999
    assert f.json()["model"] == "sentence-transformers/all-MiniLM-L6-v2"


async def test_openai_route_takes_truncate_as_teis_embed_does(
    settings: Settings, reference: np.ndarray
) -> None:
    """``truncate`` on /v1/embeddings (an extension, as on TEI's /embed): false makes a long
    input OpenAI's 400 on a server that truncates by default (it was ignored: README promised
    the 400), true truncates it as sentence-transformers does; per batch item too."""
    long = len(TEXTS) - 1  # over the model's 256 tokens
    async with running(create_app(settings)) as client:
        sdk = openai.AsyncOpenAI(
            api_key="unused", base_url="http://test/v1", http_client=client, max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.embeddings.create(
                model="m", input=TEXTS[long], extra_body={"truncate": False}
            )
        cut = await client.post("/v1/embeddings", json={"input": TEXTS[long], "truncate": True})
        batch = await client.post(
            "/v1/embeddings/batch",
            json={"requests": [{"id": "a", "input": TEXTS[long], "truncate": False}]},
        )
        bad = await client.post("/v1/embeddings", json={"input": "x", "truncate": "no"})
    assert refused.value.code == "context_length_exceeded"
    assert "more than the maximum of 256; set truncate to true" in refused.value.message
    vector = np.array([cut.json()["data"][0]["embedding"]], dtype=np.float32)
    assert min_cosine(vector, reference[long : long + 1]) >= 0.99999
    (item,) = batch.json()["results"]
    assert item["error"]["status"] == 400
    assert item["error"]["code"] == "context_length_exceeded"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate"


async def test_concurrent_callers_get_their_own_vectors(
    settings: Settings, reference: np.ndarray
) -> None:
    import asyncio

    async with running(create_app(settings)) as client:

        async def one(i: int) -> np.ndarray:
            r = await client.post("/embed", json={"inputs": TEXTS[i], "truncate": True})
            return np.array(r.json()[0], dtype=np.float32)

        results = await asyncio.gather(*(one(i % len(TEXTS)) for i in range(45)))
    got = np.stack(results)
    expected = np.stack([reference[i % len(TEXTS)] for i in range(45)])
    assert min_cosine(got, expected) >= 0.99999


def test_second_start_reuses_the_cached_export(tmp_path: Path) -> None:
    from embedplex.models.embedding import LocalEmbeddingModel

    settings = Settings(cache_dir=tmp_path)
    LocalEmbeddingModel.load(settings)
    exports = list((tmp_path / "onnx").iterdir())
    assert len(exports) == 1
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    LocalEmbeddingModel.load(settings)
    assert list((tmp_path / "onnx").iterdir()) == exports
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp
