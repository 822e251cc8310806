"""Load the configured local model's tokenizer and backend in process (for offline runs)."""

from __future__ import annotations

from typing import Any

from embedplex.backends.base import Backend
from embedplex.backends.model_files import load_spec, resolve_model_dir, tokenizer_for
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.models.layout import InferenceLayout, inference_layout
from embedplex.models.local import load_backend


def load_local(**overrides: Any) -> tuple[TextTokenizer, Backend, InferenceLayout]:
    """The tokenizer, backend and inference layout ``embedplex serve`` would build with these
    settings."""
    settings = Settings.load(None, **overrides)
    path, sha = resolve_model_dir(
        settings.model_id, revision=settings.revision, old_cache_dir=settings.cache_dir
    )
    spec = load_spec(settings.model_id, path, revision=settings.revision, sha=sha)
    tokenizer = tokenizer_for(spec)
    return tokenizer, load_backend(settings, spec), inference_layout(settings)
