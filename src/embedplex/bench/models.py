"""Load the configured local model's tokenizer and backend in process (for offline runs)."""

from __future__ import annotations

from typing import Any

from embedplex.backends.base import Backend
from embedplex.backends.model_files import tokenizer_for
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.models.layout import InferenceLayout, inference_layout
from embedplex.models.loading import load_backend, read_model


def load_local(**overrides: Any) -> tuple[TextTokenizer, Backend, InferenceLayout]:
    """The tokenizer, backend and inference layout ``embedplex serve`` would build with these
    settings."""
    settings = Settings.load(None, **overrides)
    spec = read_model(settings, settings.flat_model())
    tokenizer = tokenizer_for(spec)
    return tokenizer, load_backend(settings, spec), inference_layout(settings)
