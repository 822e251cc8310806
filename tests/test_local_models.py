"""Local models built from tiny random-weight checkpoints: export, dtypes, pooling, prompts."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.backends import onnx_cache
from embedplex.backends.base import TokenBatch
from embedplex.config import Settings
from embedplex.core.errors import BackendError, FatalBackendError
from embedplex.models.embedding import LocalEmbeddingModel
from helpers import running
from reference import embed_texts, min_cosine, st_encode
from tiny_models import make_tiny_bert, make_tiny_t5, set_model_max_length

pytestmark = pytest.mark.slow

TEXTS = ["hello world", "the quick brown fox", "a", "cat dog fox " * 12, "search query"]


# Every text of these tests truncated, whatever the server's auto_truncate.
embed = functools.partial(embed_texts, truncate=True)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
async def test_onnx_and_torch_match_sentence_transformers(tmp_path: Path, pooling: str) -> None:
    model_dir = make_tiny_bert(tmp_path / f"tiny-{pooling}", pooling=pooling, seed=3)
    expected = st_encode(model_dir, TEXTS)
    for backend in ("onnx", "torch"):
        got = await embed(
            Settings(model_id=str(model_dir), backend=backend, cache_dir=tmp_path / "c"), TEXTS
        )
        assert min_cosine(got, expected) >= 0.99999, backend


async def test_t5_encoder_matches_sentence_transformers(tmp_path: Path) -> None:
    """A T5 model serves its encoder, as sentence-transformers loads it (``AutoModel`` is the
    encoder-decoder, which asked for decoder inputs and failed every start)."""
    model_dir = make_tiny_t5(tmp_path / "t5", seed=12)
    expected = st_encode(model_dir, TEXTS)
    for backend in ("onnx", "torch"):
        settings = Settings(model_id=str(model_dir), backend=backend, cache_dir=tmp_path / "c")
        got = await embed(settings, TEXTS)
        assert min_cosine(got, expected) >= 0.99999, backend


async def test_the_tokenizers_length_cuts_as_sentence_transformers_6_saves_it(
    tmp_path: Path,
) -> None:
    """sentence-transformers 6 keeps the longest input in tokenizer_config.json only: the long
    text is cut at its 8 tokens, not at the 64 positions (cosine 0.965 when it was)."""
    model_dir = set_model_max_length(make_tiny_bert(tmp_path / "tiny", seed=13), 8)
    expected = st_encode(model_dir, TEXTS)
    for backend in ("onnx", "torch"):
        settings = Settings(model_id=str(model_dir), backend=backend, cache_dir=tmp_path / "c")
        got = await embed(settings, TEXTS)
        assert min_cosine(got, expected) >= 0.99999, backend


async def test_pooling_override_and_last_token(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean", seed=4)
    cache = tmp_path / "c"
    onnx_last = await embed(
        Settings(model_id=str(model_dir), pooling="last-token", cache_dir=cache), TEXTS
    )
    torch_last = await embed(
        Settings(model_id=str(model_dir), pooling="last-token", backend="torch"), TEXTS
    )
    mean = await embed(Settings(model_id=str(model_dir), cache_dir=cache), TEXTS)
    assert min_cosine(onnx_last, torch_last) >= 0.99999
    assert min_cosine(onnx_last, mean) < 0.999  # a different pooling really was used


async def test_export_is_cached_and_a_shipped_onnx_file_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=5)
    cache = tmp_path / "c"
    first = await embed(Settings(model_id=str(model_dir), cache_dir=cache), TEXTS)
    (entry,) = (cache / "onnx").iterdir()

    def no_export(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_cache, "export_command", no_export)
    again = await embed(Settings(model_id=str(model_dir), cache_dir=cache), TEXTS)
    assert np.allclose(first, again)
    # A model that ships onnx/model.onnx is served from it, without torch.
    shipped = tmp_path / "shipped"
    shutil.copytree(model_dir, shipped)
    (shipped / "onnx").mkdir()
    shutil.copyfile(entry / "model.onnx", shipped / "onnx" / "model.onnx")
    from_file = await embed(Settings(model_id=str(shipped), cache_dir=tmp_path / "c2"), TEXTS)
    assert min_cosine(from_file, first) >= 0.99999


async def test_int8_quality_gate(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=6)
    fp32 = await embed(Settings(model_id=str(model_dir), cache_dir=tmp_path / "c"), TEXTS)
    with pytest.raises(FatalBackendError, match=r"exit code 2\): int8 .* min cosine"):
        LocalEmbeddingModel.load(
            Settings(
                model_id=str(model_dir), dtype="int8", int8_min_cosine=1.0, cache_dir=tmp_path / "c"
            )
        )
    assert len(list((tmp_path / "c" / "onnx").iterdir())) == 1  # nothing cached for the refusal
    settings = Settings(
        model_id=str(model_dir), dtype="int8", int8_min_cosine=0.5, cache_dir=tmp_path / "c"
    )
    int8 = await embed(settings, TEXTS)
    quality = [json.loads(p.read_text()) for p in (tmp_path / "c" / "onnx").glob("*/quality.json")]
    assert len(quality) == 1
    assert 0.5 <= quality[0]["min_cosine"] <= 1.0
    assert min_cosine(int8, fp32) > 0.5


async def test_float16_onnx_is_close_to_float32(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=7)
    fp32 = await embed(Settings(model_id=str(model_dir), cache_dir=tmp_path / "c"), TEXTS)
    fp16 = await embed(
        Settings(model_id=str(model_dir), dtype="float16", cache_dir=tmp_path / "c"), TEXTS
    )
    assert min_cosine(fp16, fp32) >= 0.999


async def test_prompts_from_the_model_files(tmp_path: Path) -> None:
    prompts = {"query": "search query ", "passage": "the document "}
    model_dir = make_tiny_bert(tmp_path / "tiny", prompts=prompts, seed=8)
    settings = Settings(model_id=str(model_dir), cache_dir=tmp_path / "c")
    with_name = await embed(settings, ["hello world"], prompt_name="query")
    literal = await embed(settings, ["search query hello world"])
    plain = await embed(settings, ["hello world"])
    assert np.allclose(with_name, literal, atol=1e-6)
    assert not np.allclose(with_name, plain, atol=1e-3)
    expected = st_encode(model_dir, ["hello world"], prompt_name="query")
    assert min_cosine(with_name, expected) >= 0.99999
    defaulted = await embed(
        Settings(model_id=str(model_dir), cache_dir=tmp_path / "c", default_prompt_name="passage"),
        ["hello world"],
    )
    assert np.allclose(defaulted, await embed(settings, ["the document hello world"]), atol=1e-6)
    async with running(create_app(settings)) as client:
        info = (await client.get("/info")).json()
        tokens = (
            await client.post("/tokenize", json={"inputs": "hello", "prompt_name": "query"})
        ).json()
    assert info["prompts"] == prompts
    assert [t["text"] for t in tokens[0]] == ["[CLS]", "search", "query", "hello", "[SEP]"]


def test_unsupported_modules_are_refused_clearly(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=9)
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (model_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(FatalBackendError, match="Dense"):
        LocalEmbeddingModel.load(Settings(model_id=str(model_dir), cache_dir=tmp_path / "c"))


def test_max_input_length_override_is_checked(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=10)
    with pytest.raises(FatalBackendError, match="exceeds"):
        LocalEmbeddingModel.load(Settings(model_id=str(model_dir), max_input_length=100))


def test_max_batch_tokens_below_the_models_length_cuts_it_as_tei_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny model takes 32 tokens; a budget of 16 was accepted, and a 32-token input ran
    as a batch over it. TEI (router/src/lib.rs): with auto_truncate the length is cut to the
    budget, with a warning; without, the start fails."""
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=10)
    refused = Settings(model_id=str(model_dir), backend="torch", max_batch_tokens=16)
    with pytest.raises(FatalBackendError) as caught:
        LocalEmbeddingModel.load(refused.model_copy(update={"auto_truncate": False}))
    assert caught.value.message == (
        f"model {str(model_dir)!r}: max_batch_tokens (16) is below the model's max input "
        "length (32): raise max_batch_tokens to at least 32, or set auto_truncate to cut "
        "inputs at 16 tokens"
    )
    model = LocalEmbeddingModel.load(refused)
    assert model.info.max_input_length == 16 and model.tokenizer.max_length == 16
    assert "inputs are truncated to 16 tokens, as auto_truncate is on" in caplog.text


def test_batch_budget_follows_the_backend(tmp_path: Path) -> None:
    """ONNX runs 512 padded tokens per pass, so batches are cut to that; torch runs any."""
    from embedplex.backends.onnx import RUN_TOKENS

    model_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean", seed=5)
    models = {
        backend: LocalEmbeddingModel.load(
            Settings(model_id=str(model_dir), backend=backend, cache_dir=tmp_path / "c")
        )
        for backend in ("onnx", "torch")
    }
    expected = {"onnx": RUN_TOKENS, "torch": Settings().max_batch_tokens}
    assert {k: m.options.policy.max_cost for k, m in models.items()} == expected
    assert {k: m.info.max_batch_tokens for k, m in models.items()} == expected  # what /info says
    batch = TokenBatch.collate(models["onnx"].tokenizer.encode(["a cat"], truncate=True))
    for model in models.values():  # one protocol: the call an embedder is not built for refuses
        assert model.backend.embed(batch).shape == (1, model.backend.dim)
        with pytest.raises(BackendError, match="holds an embedding model: it cannot score"):
            model.backend.score(batch)
