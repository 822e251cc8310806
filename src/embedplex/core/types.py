"""Core request and result types, and the protocol every served model implements.

The HTTP layer builds an ``EmbedRequest`` from whichever dialect it speaks and hands it to a
model's ``embed``; local models and remote providers both answer with an ``EmbedResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from embedplex.backends.tokenizer import Token, TruncationDirection
from embedplex.core.errors import InvalidRequestError
from embedplex.core.tenant import ANONYMOUS, Tenant

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedRequest:
    """One caller's request. ``inputs`` holds texts, or token-id lists (never mixed)."""

    inputs: list[str] | list[list[int]]
    normalize: bool = True
    truncate: bool | None = None  # None: the server's auto_truncate
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT
    prompt_name: str | None = None
    prompt: str | None = None
    dimensions: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provider-specific (input_type, ...)
    tenant: Tenant = ANONYMOUS  # who asked: the batcher's items carry its key id and priority
    cache: bool = True  # False: neither read nor write the embedding cache (docs/cache.md)

    @property
    def is_tokens(self) -> bool:
        return bool(self.inputs) and isinstance(self.inputs[0], list)


@dataclass(slots=True)
class Timings:
    """Milliseconds spent in each stage (for a batch request: the slowest input's)."""

    tokenization: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    total: float = 0.0

    def headers(
        self, *, tokens: int, characters: int, compute_type: bytes | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The answer's headers as TEI sends them, as raw header lines
        (``JsonResponse(raw=...)``): the stage times, and what was computed: ``tokens`` (the
        answer's usage), ``characters`` (TEI's count, ``api/common.py: characters``) and the
        total time again as ``x-compute-time``, in whole milliseconds as TEI writes it (a
        client may read it as an integer); ``x-compute-type`` where it is known."""
        total = b"%.3f" % self.total
        raw = [
            (b"x-compute-time", b"%d" % self.total),  # whole milliseconds, as TEI's
            (b"x-compute-characters", b"%d" % characters),
            (b"x-compute-tokens", b"%d" % tokens),
            (b"x-tokenization-time", b"%.3f" % self.tokenization),
            (b"x-queue-time", b"%.3f" % self.queue),
            (b"x-inference-time", b"%.3f" % self.inference),
            (b"x-total-time", total),
        ]
        if compute_type is not None:
            raw.append((b"x-compute-type", compute_type))
        return raw


@dataclass(slots=True)
class EmbedResult:
    """Vectors in input order.

    ``provider`` names the remote provider that answered (None for a local model);
    ``per_provider`` is set by the ``all`` policy: every provider's own result, in route order
    (``vectors`` is then the first provider's, so dialects that carry one list still work).
    """

    vectors: list[Vector]
    prompt_tokens: int
    model: str
    timings: Timings = field(default_factory=Timings)
    provider: str | None = None
    per_provider: dict[str, EmbedResult] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RerankRequest:
    """Score each text's relevance to the query (a cross-encoder reads each pair whole)."""

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT
    raw_scores: bool = False  # False: sigmoid of the logit, in [0, 1]
    tenant: Tenant = ANONYMOUS


@dataclass(slots=True)
class RerankResult:
    """Scores in the order of the request's texts.

    ``provider`` and ``per_provider`` as in ``EmbedResult`` (remote rerankers; ``all`` policy).
    """

    scores: list[float]
    prompt_tokens: int
    model: str
    timings: Timings = field(default_factory=Timings)
    provider: str | None = None
    per_provider: dict[str, RerankResult] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """What a served model says about itself (``/info``, ``/v1/models``).

    ``max_batch_tokens`` / ``max_batch_requests``: the batch budget in force (a local model's
    ``TokenBudget``, which may be below the settings: cut to the backend's pass limit); None
    where there is none (a remote route).
    """

    name: str
    model_id: str
    sha: str | None
    backend: str
    device: str
    dtype: str
    dim: int
    pooling: str
    max_input_length: int
    prompts: dict[str, str]
    kind: str = "embedding"
    max_batch_tokens: int | None = None
    max_batch_requests: int | None = None
    # This model's own admission limits (None: a remote route, which has the server's).
    max_concurrent_requests: int | None = None
    max_client_batch_size: int | None = None
    auto_truncate: bool | None = None
    # A reranker's labels, from its config.json (TEI's /info reports them); None: unknown.
    id2label: dict[str, str] | None = None
    label2id: dict[str, int] | None = None

    def __getstate__(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __setstate__(self, state: Sequence[object]) -> None:
        """From a pickle (a Ray replica's answer): one of an earlier release has fewer fields,
        and those it lacks (all added at the end, with defaults) take their defaults; more
        fields than this release knows (a later replica's) are dropped."""
        known = fields(self)
        for f, value in zip(known, state, strict=False):
            object.__setattr__(self, f.name, value)
        for f in known[len(state) :]:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            object.__setattr__(self, f.name, default)


class ServedModel(Protocol):
    """What the gateway needs of any served model, whatever it computes."""

    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None: ...

    async def close(self, *, drain: bool = True) -> None: ...

    def health(self) -> None:
        """Raise if this model cannot serve (readiness reads this)."""

    def stats(self) -> dict[str, Any]: ...


class EmbeddingService(ServedModel, Protocol):
    """A served embedding model: local (tokenizer + batcher + backend) or a remote provider."""

    async def embed(self, request: EmbedRequest) -> EmbedResult: ...


class RerankService(ServedModel, Protocol):
    """A served reranker (cross-encoder)."""

    async def rerank(self, request: RerankRequest) -> RerankResult: ...


@runtime_checkable
class Tokenizing(Protocol):
    """Served models that expose their tokenizer (TEI ``/tokenize``)."""

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool, prompt_name: str | None
    ) -> list[list[Token]]: ...


@dataclass(slots=True)
class TokenEmbedResult:
    """Per-token hidden states, unpooled (TEI ``/embed_all``): one (tokens, dim) array per input,
    in input order, padding dropped."""

    vectors: list[npt.NDArray[np.float32]]
    prompt_tokens: int
    model: str
    timings: Timings = field(default_factory=Timings)


@runtime_checkable
class TokenEmbedding(Protocol):
    """Served models that can return every token's vector (local models; remote providers
    answer pooled vectors only)."""

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult: ...


@runtime_checkable
class Decoding(Protocol):
    """Served models that can turn token ids back into text (TEI ``/decode``)."""

    async def decode(
        self, sequences: list[list[int]], *, skip_special_tokens: bool
    ) -> list[str]: ...


def no_tokenizer(name: str) -> InvalidRequestError:
    """The refusal of ``/tokenize`` and ``/decode`` by a model that is not ``Tokenizing`` or
    ``Decoding``: one wording wherever it is found out (the route, a lazy model once loaded, a
    Ray replica)."""
    return InvalidRequestError(f"{name} does not expose a tokenizer", param="model")


def no_token_embeddings(name: str) -> InvalidRequestError:
    """The refusal of ``/embed_all`` by a model that is not ``TokenEmbedding``."""
    return InvalidRequestError(
        f"model {name!r} cannot return token embeddings (remote models answer pooled vectors only)",
        param="model",
    )
