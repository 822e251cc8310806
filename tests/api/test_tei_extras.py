"""TEI's /embed_all, /similarity, /decode and the predict root ``POST /``, on a fake backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest, EmbedResult, ModelInfo
from embedplex.gateway import Gateway
from helpers import fake_app, running


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(dim=16)


async def test_embed_all_gives_every_token_and_their_mean_is_embed(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    texts = ["hello world", "cat"]
    async with running(fake_app(tiny_model_dir, backend)) as client:
        every = await client.post("/embed_all", json={"inputs": texts})
        single = await client.post("/embed_all", json={"inputs": "cat"})
        ids = await client.post("/embed_all", json={"inputs": [2, 18, 19, 3]})
        pooled = await client.post("/embed", json={"inputs": texts, "normalize": False})
    assert every.status_code == 200, every.text
    rows = [np.array(m, dtype=np.float32) for m in every.json()]
    # [CLS] hello world [SEP] and [CLS] cat [SEP]: special tokens included, no padding
    assert [r.shape for r in rows] == [(4, 16), (3, 16)]
    assert np.allclose([r.mean(axis=0) for r in rows], pooled.json(), atol=1e-6)
    assert np.allclose(single.json(), every.json()[1], atol=1e-7)
    assert np.allclose(ids.json()[0], every.json()[0], atol=1e-7)
    assert float(every.headers["x-total-time"]) >= 0


async def test_embed_all_limits_and_truncation(
    tiny_model_dir: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedplex.models import token_level

    long_text = " ".join(["cat"] * 40)  # 42 tokens, max is 32
    app = fake_app(tiny_model_dir, backend, max_client_batch_size=2, max_queue_size=8)
    async with running(app) as client:
        cut = await client.post("/embed_all", json={"inputs": long_text})
        refused = await client.post("/embed_all", json={"inputs": long_text, "truncate": False})
        many = await client.post("/embed_all", json={"inputs": ["a", "b", "c"]})
        empty = await client.post("/embed_all", json={"inputs": []})
        # TEI's /embed_all has no normalize: ignored, as TEI ignores it (vectors stay raw).
        extra = await client.post("/embed_all", json={"inputs": "a", "normalize": True})
        plain = await client.post("/embed_all", json={"inputs": "a"})
        # 2 inputs of 4 tokens x 16 dims = 128 numbers: one more than allowed
        monkeypatch.setattr(token_level, "MAX_NUMBERS", 127)
        big = await client.post("/embed_all", json={"inputs": ["hello world", "hello world"]})
        monkeypatch.setattr(token_level, "MAX_NUMBERS", 128)
        fits = await client.post("/embed_all", json={"inputs": ["hello world", "hello world"]})
    assert cut.status_code == 200 and len(cut.json()[0]) == 32
    assert refused.status_code == 422 and "32" in refused.json()["error"]
    assert many.status_code == 422 and "batch size 3" in many.json()["error"]
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"
    assert extra.status_code == 200 and extra.json() == plain.json()
    assert big.status_code == 422 and "128 numbers" in big.json()["error"]
    assert fits.status_code == 200


async def test_similarity_is_the_cosine_of_embed_vectors(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    source, others = "hello world", ["hello", "cat dog", "hello world"]
    async with running(fake_app(tiny_model_dir, backend)) as client:
        r = await client.post(
            "/similarity",
            json={"inputs": {"source_sentence": source, "sentences": others}, "parameters": {}},
        )
        vectors = (await client.post("/embed", json={"inputs": [source, *others]})).json()
    assert r.status_code == 200, r.text
    unit = np.array(vectors)
    assert np.allclose(r.json(), unit[1:] @ unit[0], atol=1e-6)
    assert r.json()[2] == pytest.approx(1.0, abs=1e-6)


async def test_similarity_errors(tiny_model_dir: Path, backend: FakeBackend) -> None:
    app = fake_app(tiny_model_dir, backend, max_client_batch_size=3, max_queue_size=8)
    async with running(app) as client:
        empty = await client.post(
            "/similarity", json={"inputs": {"source_sentence": "a", "sentences": []}}
        )
        # the source sentence counts: 1 + 3 > 3
        many = await client.post(
            "/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b"] * 3}}
        )
        flat = await client.post("/similarity", json={"inputs": "a"})
        bad_param = await client.post(
            "/similarity",
            json={
                "inputs": {"source_sentence": "a", "sentences": ["b"]},
                "parameters": {"truncation_direction": "Up"},
            },
        )
    assert empty.status_code == 400 and "sentences" in empty.json()["error"]
    assert many.status_code == 422
    assert flat.status_code == 422 and "inputs" in flat.json()["error"]
    assert bad_param.status_code == 422 and "truncation_direction" in bad_param.json()["error"]


async def test_decode(tiny_model_dir: Path, backend: FakeBackend) -> None:
    # (skipping special tokens is tested on the real tokenizer: the tiny one registers none)
    async with running(fake_app(tiny_model_dir, backend, max_client_batch_size=2)) as client:
        one = await client.post("/decode", json={"ids": [18, 19]})
        special = await client.post(
            "/decode", json={"ids": [2, 18, 19, 3], "skip_special_tokens": False}
        )
        batch = await client.post("/decode", json={"ids": [[18], [20, 21]]})
        roundtrip = await client.post("/tokenize", json={"inputs": "Quick brown fox"})
        empty = await client.post("/decode", json={"ids": []})
        empty_row = await client.post("/decode", json={"ids": [[18], []]})
        outside = await client.post("/decode", json={"ids": [18, 99999]})
        negative = await client.post("/decode", json={"ids": [-1]})
        many = await client.post("/decode", json={"ids": [[18], [18], [18]]})
        words = [t["id"] for t in roundtrip.json()[0] if not t["special"]]
        again = await client.post("/decode", json={"ids": words})
    assert one.json() == ["hello world"]
    assert special.json() == ["[CLS] hello world [SEP]"]
    assert batch.json() == ["hello", "cat dog"]
    assert again.json() == ["quick brown fox"]  # the tiny tokenizer lower-cases
    assert empty.status_code == empty_row.status_code == 400
    assert outside.status_code == negative.status_code == 422
    assert "vocabulary" in outside.json()["error"]
    assert many.status_code == 422


async def test_root_takes_embed_similarity_and_rerank_bodies(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    similarity_body = {"inputs": {"source_sentence": "cat", "sentences": ["dog", "cat"]}}
    async with running(fake_app(tiny_model_dir, backend)) as client:
        embed = await client.post("/", json={"inputs": "hello", "encoding_format": "float"})
        direct = await client.post("/embed", json={"inputs": "hello"})
        sim = await client.post("/", json={**similarity_body, "parameters": {}})
        sim_direct = await client.post("/similarity", json=similarity_body)
        rerank = await client.post("/", json={"query": "cat", "texts": ["dog"]})
        not_object = await client.post("/", json=["hello"])
        no_inputs = await client.post("/", json={"text": "hello"})
        bad_json = await client.post(
            "/", content=b"{", headers={"content-type": "application/json"}
        )
    assert embed.status_code == 200 and embed.json() == direct.json()
    assert sim.status_code == 200 and sim.json() == sim_direct.json()
    assert rerank.status_code == 404 and "reranker" in rerank.json()["error"]
    assert not_object.status_code == 422
    assert no_inputs.status_code == 422 and "inputs" in no_inputs.json()["error"]
    assert bad_json.status_code == 400


class PooledOnly:
    """A served model that answers pooled vectors only, not unit length (like a remote one)."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name="remote-ish",
            model_id="remote-ish",
            sha=None,
            backend="remote",
            device="remote",
            dtype="float32",
            dim=2,
            pooling="remote",
            max_input_length=0,
            prompts={},
        )

    async def start(self) -> None:
        pass

    async def close(self, *, drain: bool = True) -> None:
        pass

    def health(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        table = {"a": [3.0, 0.0], "b": [0.0, 5.0], "c": [2.0, 2.0]}
        vectors = [np.array(table[str(t)], dtype=np.float32) for t in request.inputs]
        return EmbedResult(vectors=vectors, prompt_tokens=len(vectors), model=self.info.name)


async def test_models_without_tokens_refuse_embed_all_and_decode_but_compare(
    tiny_model_dir: Path,
) -> None:
    app = create_app(
        Settings(model_id=str(tiny_model_dir)),
        gateway_factory=lambda s: Gateway([PooledOnly()]),
    )
    async with running(app) as client:
        every = await client.post("/embed_all", json={"inputs": "a"})
        decode = await client.post("/decode", json={"ids": [1]})
        sim = await client.post(
            "/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b", "c", "a"]}}
        )
    assert every.status_code == 422 and "token embeddings" in every.json()["error"]
    assert decode.status_code == 422 and "tokenizer" in decode.json()["error"]
    # cosines, whatever the vectors' lengths
    assert sim.json() == pytest.approx([0.0, 2**-0.5, 1.0], abs=1e-6)
