"""The int8 export's quality gate: min cosine of int8 against float32 over varied texts.

It runs inside the export child (``onnx_export.py``), beside the quantizer it judges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedplex.backends.base import TokenBatch
from embedplex.backends.model_files import ModelSpec
from embedplex.backends.onnx import OnnxBackend, make_session
from embedplex.backends.onnx_export import QualityCheck
from embedplex.backends.pooling import Floats, normalize_rows
from embedplex.backends.tokenizer import Encoded, TextTokenizer
from embedplex.batching.cost import TokenBudget

# Varied texts for the int8 quality gate: short, long, code, unicode, numbers.
CALIBRATION_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "def add(a, b):\n    return a + b",
    "SELECT id, name FROM users WHERE created_at > now() - interval '1 day';",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Emoji test 🚀🔥 with mixed content",
    "1234567890 3.14159 2.71828",
    "a",
    "Retrieval-augmented generation combines a retriever with a generator model. " * 6,
    "Machine learning models need careful evaluation on held-out data.",
    "The stock market fell sharply after the announcement of new tariffs.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy in plants.",
]


def _served_vectors(backend: OnnxBackend, encoded: list[Encoded]) -> Floats:
    """Vectors of ``encoded`` run in the passes a served batch of them would be cut into.

    int8 activations are quantized per pass, so a row's vector depends on its pass-mates: the
    quality gate measures the passes the server runs (one pass limit each), not one big batch.
    """
    budget = TokenBudget(tokens=backend.run_tokens, items=len(encoded))
    rows = budget.run_in_pieces(
        encoded, [len(e) for e in encoded], lambda p: list(backend.embed(TokenBatch.collate(p)))
    )
    return np.stack(rows)


def int8_quality_check(spec: ModelSpec, threads: int | None) -> QualityCheck:
    """``check(fp32_file, int8_file)``: the minimum cosine between their vectors of the
    calibration texts, as the server would compute them."""

    def backend(path: Path, dtype: str) -> OnnxBackend:
        return OnnxBackend(
            make_session(path, "cpu", threads),
            pooling=spec.pooling,
            dtype=dtype,
            device="cpu",
            dim=spec.hidden_size,
        )

    def check(fp32: Path, candidate: Path) -> float:
        tok = TextTokenizer.from_dir(
            spec.path, max_length=spec.max_input_length, vocab_size=spec.vocab_size
        )
        encoded = tok.encode(CALIBRATION_TEXTS, truncate=True)
        a = normalize_rows(_served_vectors(backend(fp32, "float32"), encoded))
        b = normalize_rows(_served_vectors(backend(candidate, "int8"), encoded))
        return float(np.min(np.sum(a * b, axis=1)))

    return check
