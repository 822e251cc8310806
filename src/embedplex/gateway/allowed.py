"""Which served names clients may use: ``allowed_embedding_models`` / ``allowed_rerank_models``.

The semantics of FastEmbed's ``INFERENCE_ALLOWED_EMBEDDING_MODELS`` /
``INFERENCE_ALLOWED_RERANK_MODELS``: a list of names or shell-style patterns (``*``, ``?``,
``[...]``; ``*`` alone: every model of the kind), matched case-sensitively against the name
clients send. Unset: every served model of the kind is allowed. A model outside its kind's list
is not loaded and not served: to a client it does not exist (404, like an unknown name).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from embedplex.backends.model_files import ModelKind

if TYPE_CHECKING:
    from embedplex.config import Settings


@dataclass(frozen=True, slots=True)
class AllowedModels:
    """Patterns per kind (``ModelKind`` values); ``None``: no list, every name allowed."""

    embedding: tuple[str, ...] | None = None
    reranker: tuple[str, ...] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowedModels:
        emb, rr = settings.allowed_embedding_models, settings.allowed_rerank_models
        return cls(tuple(emb) if emb is not None else None, tuple(rr) if rr is not None else None)

    def patterns(self, kind: str) -> tuple[str, ...] | None:
        return self.reranker if kind == ModelKind.RERANKER.value else self.embedding

    def restricted(self, kind: str) -> bool:
        """Whether a list is set for ``kind`` (then names must match exactly: no stand-in)."""
        return self.patterns(kind) is not None

    def allows(self, name: str, kind: str) -> bool:
        patterns = self.patterns(kind)
        return patterns is None or any(fnmatchcase(name, p) for p in patterns)
