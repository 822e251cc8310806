"""What a model directory's own files say (backends/model_files.py, st_modules.py,
model_json.py): positions, width, pooling, lowercasing, and start errors that name the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedplex.backends.model_files import (
    _POSITIONS_AFTER_PADDING,
    ModelKind,
    Pooling,
    load_spec,
    resolve_model_dir,
    tokenizer_for,
)
from embedplex.backends.st_modules import pooling_config_name
from embedplex.config import Settings
from embedplex.core.errors import FatalBackendError
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.loading import load_local_model
from reference import embed_texts, min_cosine, st_encode
from tiny_models import (
    make_tiny_bert,
    make_tiny_distilbert,
    make_tiny_reranker,
    set_model_max_length,
    write_st_modules,
    write_tokenizer,
)

# --- positions -------------------------------------------------------------------------------

_TINY: dict[str, Any] = {
    "vocab_size": 40,  # write_tokenizer's vocabulary
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "pad_token_id": 3,  # not 1: the rule must read it (or, for mpnet, not)
}
_TINY_BY_TYPE: dict[str, dict[str, Any]] = {
    "distilbert": {
        "vocab_size": 40,
        "dim": 32,
        "n_layers": 1,
        "n_heads": 2,
        "hidden_dim": 64,
        "max_position_embeddings": 40,
        "pad_token_id": 3,
    },
    "longformer": {**_TINY, "attention_window": 4},
    "luke": {**_TINY, "entity_vocab_size": 8, "entity_emb_size": 16},
    "xmod": {**_TINY, "languages": ["en_XX"], "default_language": "en_XX"},
}
# Absolute positions from 0: every row of the table is a token's.
_FROM_ZERO = ["albert", "bert", "deberta-v2", "distilbert", "electra"]


@pytest.mark.parametrize("model_type", sorted(_POSITIONS_AFTER_PADDING) + _FROM_ZERO)
def test_max_input_length_is_the_longest_input_the_model_runs(
    tmp_path: Path, model_type: str
) -> None:
    """The rule, checked against transformers' own modeling code: an input of the derived
    length runs, one token more does not (one such input failed every request batched with it)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, **_TINY_BY_TYPE.get(model_type, _TINY))
    config.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    longest = load_spec(model_type, tmp_path, pooling=Pooling.MEAN).max_input_length
    model = AutoModel.from_config(config).eval()

    def run(length: int) -> None:
        ids = torch.full((1, length), 10)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    run(longest)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        run(longest + 1)


# The forms sentence-transformers 6 saves a model in: its longest input only in
# tokenizer_config.json (sentence_bert_config.json without max_seq_length).
_ST6_CONFIG = {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings"}


@pytest.mark.parametrize(
    ("declared", "st_config", "expected"),
    [
        (16, _ST6_CONFIG, 16),  # sentence-transformers 6
        (16, None, 16),  # no sentence_bert_config.json at all
        (1000, _ST6_CONFIG, 64),  # capped by the 64 positions
        (10**30, _ST6_CONFIG, 64),  # transformers' "no limit" (int(1e30)) as saved
        (1e30, _ST6_CONFIG, 64),  # the same, written as a float
        (None, _ST6_CONFIG, 64),
        (16, {"max_seq_length": 32}, 32),  # max_seq_length wins, as in sentence-transformers
    ],
)
def test_the_longest_input_without_max_seq_length_is_the_tokenizers(
    tmp_path: Path,
    tiny_model_dir: Path,
    declared: float | None,
    st_config: dict[str, Any] | None,
    expected: int,
) -> None:
    """sentence-transformers cuts at min(max_position_embeddings, the tokenizer's
    model_max_length) where sentence_bert_config.json names no max_seq_length: served at the
    64 positions, a 16-token model's long inputs were other vectors."""
    model_dir = set_model_max_length(_copy(tiny_model_dir, tmp_path), None)
    if declared is not None:
        _edit(model_dir / "tokenizer_config.json", lambda c: c.update(model_max_length=declared))
    if st_config is not None:
        (model_dir / "sentence_bert_config.json").write_text(json.dumps(st_config))
    assert load_spec("tiny", model_dir).max_input_length == expected


def test_a_rerankers_longest_input_is_its_tokenizers(tmp_path: Path) -> None:
    """``CrossEncoder`` cuts pairs at the tokenizer's model_max_length (a cross-encoder has no
    sentence_bert_config.json)."""
    model_dir = set_model_max_length(make_tiny_reranker(tmp_path / "ce"), 16)
    assert load_spec("ce", model_dir).max_input_length == 16


@pytest.mark.parametrize("value", ["16", 16.5, 0, True])
def test_a_wrong_model_max_length_stops_the_start_naming_the_file(
    tmp_path: Path, tiny_model_dir: Path, value: object
) -> None:
    model_dir = set_model_max_length(_copy(tiny_model_dir, tmp_path), None)
    _edit(model_dir / "tokenizer_config.json", lambda c: c.update(model_max_length=value))
    with pytest.raises(FatalBackendError, match=r"tokenizer_config\.json: model_max_length"):
        load_spec("tiny", model_dir)


# --- width -----------------------------------------------------------------------------------


def test_distilbert_width_is_read_from_dim(tmp_path: Path) -> None:
    spec = load_spec("distil", make_tiny_distilbert(tmp_path / "distil"))
    assert spec.hidden_size == 32


def test_a_model_of_unknown_width_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = _copy(tiny_model_dir, tmp_path)
    _edit(model_dir / "config.json", lambda c: c.pop("hidden_size"))
    with pytest.raises(FatalBackendError, match=r"config\.json: the model's width"):
        load_spec("tiny", model_dir)


# --- pooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ({"pooling_mode": "cls"}, Pooling.CLS),  # sentence-transformers >= 6 writes this form
        ({"pooling_mode": ["lasttoken"]}, Pooling.LAST_TOKEN),
        ({"pooling_mode": "mean", "include_prompt": True}, Pooling.MEAN),
        ({}, Pooling.MEAN),  # no mode named: sentence-transformers pools the mean
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, Pooling.CLS),
    ],
)
def test_pooling_config_forms(
    tmp_path: Path, tiny_model_dir: Path, pooling: dict[str, Any], expected: Pooling
) -> None:
    model_dir = _copy(tiny_model_dir, tmp_path)
    write_st_modules(model_dir, pooling)
    assert load_spec("tiny", model_dir).pooling is expected


@pytest.mark.parametrize(
    ("pooling", "match"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "concatenated"),
        ({"pooling_mode": ["cls", "mean"]}, "concatenated"),
        ({"pooling_mode_max_tokens": True}, "'max' is not supported"),
        ({"pooling_mode": "weightedmean"}, "'weightedmean' is not supported"),
        ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt: false"),
    ],
)
def test_pooling_that_would_change_the_vectors_is_refused(
    tmp_path: Path, tiny_model_dir: Path, pooling: dict[str, Any], match: str
) -> None:
    model_dir = _copy(tiny_model_dir, tmp_path)
    write_st_modules(model_dir, pooling)
    with pytest.raises(FatalBackendError, match=match):
        load_spec("tiny", model_dir)


def test_pooling_override_serves_one_mode_but_never_drops_the_prompt(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model_dir = _copy(tiny_model_dir, tmp_path)
    write_st_modules(model_dir, {"pooling_mode": ["mean", "max"]})
    assert load_spec("tiny", model_dir, pooling=Pooling.MEAN).pooling is Pooling.MEAN
    write_st_modules(model_dir, {"pooling_mode": "mean", "include_prompt": False})
    with pytest.raises(FatalBackendError, match="include_prompt"):
        load_spec("tiny", model_dir, pooling=Pooling.MEAN)


def _without_pooling(tiny_model_dir: Path, tmp_path: Path, model_type: str) -> Path:
    """The tiny model as a plain Hugging Face checkpoint (no modules.json) of this type."""
    model_dir = _copy(tiny_model_dir, tmp_path)
    (model_dir / "modules.json").unlink()
    _edit(model_dir / "config.json", lambda c: c.update(model_type=model_type))
    return model_dir


@pytest.mark.parametrize("model_type", ["qwen3", "gpt2", "mpnet", "t5"])
def test_a_model_without_pooling_that_is_not_bert_is_refused(
    tmp_path: Path, tiny_model_dir: Path, model_type: str
) -> None:
    """No Pooling module, no pooling configured: TEI's rule. CLS served a Qwen3 decoder's every
    text that starts with the same token as one vector."""
    model_dir = _without_pooling(tiny_model_dir, tmp_path, model_type)
    with pytest.raises(
        FatalBackendError, match=r"no sentence-transformers Pooling module.*--pooling"
    ):
        load_spec("plain", model_dir)
    assert load_spec("plain", model_dir, pooling=Pooling.LAST_TOKEN).pooling is Pooling.LAST_TOKEN


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta", "distilbert", "modernbert"])
def test_a_bert_family_model_without_pooling_pools_cls_with_a_warning(
    tmp_path: Path, tiny_model_dir: Path, model_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _without_pooling(tiny_model_dir, tmp_path, model_type)
    with caplog.at_level("WARNING", logger="embedplex.backends.model_files"):
        assert load_spec("plain", model_dir).pooling is Pooling.CLS
    assert "no sentence-transformers Pooling module" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="embedplex.backends.model_files"):
        assert load_spec("plain", model_dir, pooling=Pooling.MEAN).pooling is Pooling.MEAN
    assert not caplog.text


def test_a_reranker_needs_no_pooling(tmp_path: Path) -> None:
    model_dir = make_tiny_reranker(tmp_path / "ce")
    _edit(model_dir / "config.json", lambda c: c.update(model_type="qwen3"))
    assert load_spec("ce", model_dir).kind is ModelKind.RERANKER


def test_a_model_that_needs_its_repositorys_code_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """GTE-v1.5 style (``auto_map`` to the repo's modeling.py): transformers asked for
    trust_remote_code, an option embedplex does not have; it never runs a repo's code."""
    model_dir = _copy(tiny_model_dir, tmp_path)
    auto_map = {"AutoConfig": "configuration.NewConfig", "AutoModel": "modeling.NewModel"}
    _edit(model_dir / "config.json", lambda c: c.update(model_type="new", auto_map=auto_map))
    with pytest.raises(FatalBackendError, match=r"auto_map.*never runs a repository's code"):
        load_spec("gte", model_dir)


def test_a_rerankers_labels_come_from_its_config(tmp_path: Path) -> None:
    model_dir = make_tiny_reranker(tmp_path / "ce")
    spec = load_spec("ce", model_dir)
    assert (spec.id2label, spec.label2id) == ({"0": "LABEL_0"}, {"LABEL_0": 0})
    _edit(model_dir / "config.json", lambda c: c.update(id2label={"0": "relevant"}))
    _edit(model_dir / "config.json", lambda c: c.update(label2id={"relevant": 0}))
    spec = load_spec("ce", model_dir)
    assert (spec.id2label, spec.label2id) == ({"0": "relevant"}, {"relevant": 0})


# --- malformed files: a start error that names the file -----------------------------------


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_text(text)


def _modules(change: Callable[[list[dict[str, Any]]], object]) -> Callable[[Path], None]:
    return lambda d: _edit(d / "modules.json", change)


_BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "config not json": (_write("config.json", "{not json"), r"config\.json: cannot read"),
    "pooling not json": (_write("1_Pooling/config.json", "nope"), r"1_Pooling/config\.json"),
    "pooling config missing": (
        lambda d: (d / "1_Pooling" / "config.json").unlink(),
        r"1_Pooling/config\.json is missing",
    ),
    "tokenizer malformed": (_write("tokenizer.json", "{}"), r"tokenizer\.json: cannot load"),
    "max_seq_length 0": (
        _write("sentence_bert_config.json", '{"max_seq_length": 0}'),
        r"sentence_bert_config\.json: max_seq_length must be at least 1",
    ),
    "hidden_size a string": (
        lambda d: _edit(d / "config.json", lambda c: c.update(hidden_size="abc")),
        r"config\.json: hidden_size must be an integer",
    ),
    "prompts a list": (
        _write("config_sentence_transformers.json", '{"prompts": ["a"]}'),
        r"config_sentence_transformers\.json: prompts must be an object",
    ),
    "prompt text a number": (
        _write("config_sentence_transformers.json", '{"prompts": {"q": 3}}'),
        r"config_sentence_transformers\.json: prompts must be an object",
    ),
    "default_prompt_name a list": (
        _write("config_sentence_transformers.json", '{"prompts": {}, "default_prompt_name": []}'),
        r"default_prompt_name must be a string",
    ),
    "modules an object": (_write("modules.json", "{}"), r"modules\.json: expected a JSON array"),
    "module path outside": (
        _modules(lambda m: m[1].update(path="../../../../etc")),
        r"modules\.json: module path '../../../../etc' is not a folder of the model",
    ),
}


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_malformed_model_files_stop_the_start_naming_the_file(
    tmp_path: Path, tiny_model_dir: Path, case: str
) -> None:
    change, match = _BROKEN[case]
    model_dir = _copy(tiny_model_dir, tmp_path)
    change(model_dir)
    settings = Settings(model_id=str(model_dir), cache_dir=tmp_path / "c")
    with pytest.raises(FatalBackendError, match=match):
        load_local_model(settings)


def test_a_revision_for_a_local_directory_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(FatalBackendError, match="local directory, which has no revisions"):
        resolve_model_dir(str(tiny_model_dir), revision="main")


_POOLING = "sentence_transformers.models.Pooling"


@pytest.mark.parametrize(
    ("modules", "name"),
    [
        ([{"type": _POOLING, "path": "1_Pooling"}], "1_Pooling/config.json"),
        ([{"type": _POOLING, "path": "./2_Pooling/"}], "2_Pooling/config.json"),
        ([{"type": _POOLING, "path": "a/../pool"}], "pool/config.json"),
        ([{"type": _POOLING, "path": ""}], "config.json"),
        # The first Pooling module is the one read_pooling reads.
        ([{"type": _POOLING, "path": "p1"}, {"type": _POOLING, "path": "p2"}], "p1/config.json"),
        # Out of the directory, or no path at all: nothing to fetch, read_pooling refuses it.
        ([{"type": _POOLING, "path": "../../etc"}], None),
        ([{"type": _POOLING, "path": "a/../../etc"}], None),
        ([{"type": _POOLING, "path": "/etc"}], None),
        ([{"type": _POOLING, "path": 3}], None),
        ([{"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}], None),
        ([], None),
    ],
)
def test_the_pooling_config_a_hub_download_fetches(
    modules: list[dict[str, Any]], name: str | None
) -> None:
    """Where the Pooling module's config lies in a hub repo, as modules.json names it: fetched
    by that name (a repo may use 2_Pooling); never a path out of the directory."""
    assert pooling_config_name(modules) == name


@pytest.mark.parametrize("model_id", ["/no/such/model", "./no-such", "../no-such", "~/no-such"])
def test_a_path_that_is_no_directory_is_said_so(model_id: str) -> None:
    """A path is never a repo id: the hub's "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'" (HFValidationError) only hid the typo."""
    with pytest.raises(FatalBackendError) as caught:
        resolve_model_dir(model_id)
    where = Path(model_id).expanduser().absolute()  # relative to where it started
    assert caught.value.message == (
        f"cannot load model {model_id!r}: no such directory: {where} (a model is a directory "
        "holding config.json, or a Hugging Face repo id)"
    )


def test_a_file_is_no_model_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.onnx").write_bytes(b"a graph, not a model directory")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the old code asked the hub for "model.onnx"
    with pytest.raises(FatalBackendError) as caught:
        resolve_model_dir("model.onnx")
    assert f"'model.onnx': not a directory: {tmp_path / 'model.onnx'} (" in caught.value.message


# --- vectors, against sentence-transformers -------------------------------------------------


@pytest.mark.slow
async def test_do_lower_case_lowercases_as_sentence_transformers_does(tmp_path: Path) -> None:
    """A cased tokenizer with ``do_lower_case: true`` in sentence_bert_config.json: the text
    (prompt included) is lowercased before it is tokenized."""
    model_dir = make_tiny_bert(tmp_path / "cased", prompts={"query": "Query: "})
    _edit(model_dir / "tokenizer.json", lambda t: t["normalizer"].update(lowercase=False))
    (model_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 32, "do_lower_case": True})
    )
    texts = ["The Quick Brown Fox", "HELLO World", "the quick brown fox"]
    ours = await _embed(model_dir, texts)
    assert min_cosine(ours, st_encode(model_dir, texts)) > 0.99999
    ours = await _embed(model_dir, texts, prompt_name="query")
    assert min_cosine(ours, st_encode(model_dir, texts, prompt_name="query")) > 0.99999
    assert min_cosine(ours[:1], ours[2:]) > 0.99999  # cased and lowercase: one vector


@pytest.mark.slow
async def test_distilbert_serves_its_width(tmp_path: Path) -> None:
    model_dir = make_tiny_distilbert(tmp_path / "distil")
    texts = ["hello world", "the quick brown fox"]
    model = LocalEmbeddingModel.load(Settings(model_id=str(model_dir), backend="torch"))
    await model.start()
    try:
        assert model.info.dim == 32
        full = np.stack((await model.embed(EmbedRequest(inputs=texts))).vectors)
        cut = await model.embed(EmbedRequest(inputs=texts, dimensions=8))
    finally:
        await model.close()
    assert min_cosine(full, st_encode(model_dir, texts)) > 0.99999
    assert len(cut.vectors[0]) == 8


@pytest.mark.slow
async def test_new_pooling_config_form_matches_sentence_transformers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model_dir = _copy(tiny_model_dir, tmp_path)
    write_st_modules(model_dir, {"pooling_mode": "cls"})
    texts = ["hello world", "the quick brown fox"]
    assert min_cosine(await _embed(model_dir, texts), st_encode(model_dir, texts)) > 0.99999


# --- helpers -----------------------------------------------------------------------------------


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _edit(file: Path, change: Callable[[Any], object]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


async def _embed(model_dir: Path, texts: list[str], **kwargs: Any) -> np.ndarray:
    return await embed_texts(Settings(model_id=str(model_dir), backend="torch"), texts, **kwargs)


@pytest.mark.parametrize("cased", [True, False])
def test_do_lower_case_keeps_the_fast_cut_and_changes_only_what_it_lowercases(
    tiny_model_dir: Path, tmp_path: Path, cased: bool
) -> None:
    """``do_lower_case`` on a tokenizer that lowercases already (BGE's, uncased BERT's)
    changes nothing; on a cased BERT normalizer it becomes that normalizer's own lowercasing.
    Either way the tokenizer still cuts long texts at a piece boundary (a Sequence of
    normalizers is never cut: a 2 MB text took ~100x longer), and only the cased one is named
    apart in the shared cache (its vectors differ from its file's tokenizer's)."""
    model_dir = _copy(tiny_model_dir, tmp_path)
    if cased:
        _edit(model_dir / "tokenizer.json", lambda t: t["normalizer"].update(lowercase=False))
    (model_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 32, "do_lower_case": True})
    )
    tokenizer = tokenizer_for(load_spec(str(model_dir), model_dir))
    assert tokenizer._cuts  # long texts are tokenized from their part
    assert tokenizer.lowered is cased
    ids = tokenizer.encode(["The Quick FOX"], truncate=True)[0].ids
    assert ids == tokenizer.encode(["the quick fox"], truncate=True)[0].ids


def test_a_module_folder_linked_in_is_served(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A module folder that is a symlink (to a shared pooling config) is the operator's to
    serve: only a path naming its way out (``..``) is refused."""
    model_dir = _copy(tiny_model_dir, tmp_path)
    shared = tmp_path / "shared-pooling"
    shutil.move(model_dir / "1_Pooling", shared)
    (model_dir / "1_Pooling").symlink_to(shared, target_is_directory=True)
    assert load_spec(str(model_dir), model_dir).pooling is Pooling.MEAN
