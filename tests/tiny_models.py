"""Tiny random-weight Hugging Face models, built inside the tests (no hub, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "of",
    "to",
    "and",
    "in",
    "on",
    "for",
    "with",
    "hello",
    "world",
    "cat",
    "dog",
    "fox",
    "quick",
    "brown",
    "lazy",
    "jumps",
    "over",
    "embedding",
    "server",
    "model",
    "text",
    "query",
    "document",
    "search",
    "fast",
    "slow",
    "red",
    "blue",
    "green",
]


def write_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = decoders.WordPiece()
    tok.save(str(path / "tokenizer.json"))
    (path / "vocab.txt").write_text("\n".join(vocab_list) + "\n")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    return len(vocab_list)


def tiny_bert_config(vocab_size: int, **extra: object) -> Any:
    """2 layers, 32 wide, 64 positions: big enough to be a real BERT, small enough to be instant."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        **extra,
    )


def make_tiny_bert(
    path: Path,
    *,
    pooling: str | None = "mean",
    normalize: bool = True,
    max_seq_length: int | None = 32,
    prompts: dict[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """A 2-layer, 32-wide BERT with random weights, saved as a sentence-transformers model."""
    import torch
    from transformers import BertModel

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(vocab_size)).eval().save_pretrained(
        str(path), safe_serialization=True
    )
    if pooling is not None:
        write_st_modules(
            path,
            {
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_lasttoken": pooling == "last-token",
            },
            normalize=normalize,
        )
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
        )
    if prompts is not None:
        (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return path


def write_st_modules(
    path: Path, pooling: dict[str, object], *, width: int = 32, normalize: bool = False
) -> None:
    """sentence-transformers' ``modules.json`` (Transformer, Pooling, and Normalize if asked)
    with this pooling config."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": width, **pooling})
    )


def make_tiny_distilbert(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide DistilBERT (its config says ``dim``, not ``hidden_size``), mean pooled."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2, pad_token_id=0
    )
    DistilBertModel(config).eval().save_pretrained(str(path), safe_serialization=True)
    write_st_modules(path, {"pooling_mode_mean_tokens": True})
    return path


def make_tiny_t5(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide T5 encoder (``T5EncoderModel``: its config says ``d_model``, has no
    positions table), mean pooled and normalized, as sentence-transformers' T5 models are."""
    import torch
    from transformers import T5Config, T5EncoderModel

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).eval().save_pretrained(str(path), safe_serialization=True)
    write_st_modules(path, {"pooling_mode": "mean"}, normalize=True)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return path


def set_model_max_length(path: Path, length: int | None) -> Path:
    """Keep the longest input where sentence-transformers 6 saves it, tokenizer_config.json's
    ``model_max_length`` (None: absent), and none in sentence_bert_config.json."""
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    if length is not None:
        config["model_max_length"] = length
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "sentence_bert_config.json").unlink(missing_ok=True)
    return path


def make_tiny_reranker(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer BERT cross-encoder (one relevance logit) with random weights."""
    import torch
    from transformers import BertForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size, num_labels=1)).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def ship_onnx(path: Path) -> Path:
    """Give a tiny model its own ``onnx/model.onnx`` (float32, traced here), as hub repos do."""
    from embedplex.backends.onnx_export import export_fp32

    (path / "onnx").mkdir(exist_ok=True)
    export_fp32(path, path / "onnx" / "model.onnx", with_token_type_ids=True)
    return path
