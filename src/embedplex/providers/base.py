"""The protocols remote provider adapters implement, and the values they trade in.

An adapter turns a list of texts plus ``EmbedParams`` into one upstream call and back into
vectors. It knows its own limits (texts per call) and maps every upstream failure into the
embedplex error tree at its edge; batching, health and adaptive sizing live above it.

Reranking is a second, separate protocol (``Reranker``: one query and its documents -> one
score per document), so ``Provider`` stays as narrow as an embedding API is: an adapter that
only embeds need not pretend to rerank. The HTTP adapters implement both on one object, so
embed and rerank calls to one provider share its transport and with it the retry budget, the
circuit breaker and the AIMD signal (one vendor account, one rate limit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.types import EmbedRequest, RerankRequest, Vector

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

    from embedplex.providers.http import AttemptListener, RetryListener


@dataclass(frozen=True, slots=True)
class EmbedParams:
    """Everything but the texts that changes an upstream call.

    Hashable: together with the provider name it is the batch grouping key, so requests that
    differ in any of these never share an upstream call.
    """

    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT
    dimensions: int | None = None
    input_type: str | None = None
    prompt_name: str | None = None

    @classmethod
    def from_request(
        cls, request: EmbedRequest, default_input_type: str | None = None
    ) -> EmbedParams:
        input_type = request.extra.get("input_type") or default_input_type
        return cls(
            normalize=request.normalize,
            truncate=request.truncate,
            truncation_direction=request.truncation_direction,
            dimensions=request.dimensions,
            input_type=str(input_type) if input_type is not None else None,
            prompt_name=request.prompt_name,
        )

    def describe(self) -> dict[str, Any]:
        """The key as JSON-friendly values (status pages)."""
        return {
            "normalize": self.normalize,
            "truncate": self.truncate,
            "truncation_direction": self.truncation_direction.value,
            "dimensions": self.dimensions,
            "input_type": self.input_type,
            "prompt_name": self.prompt_name,
        }


@dataclass(frozen=True, slots=True)
class RerankParams:
    """Everything but the query and the documents that changes an upstream rerank call.

    Hashable: the rerank lane key, as ``EmbedParams`` is for embeddings.
    """

    truncate: bool | None = None
    truncation_direction: TruncationDirection = TruncationDirection.RIGHT
    raw_scores: bool = False

    @classmethod
    def from_request(cls, request: RerankRequest) -> RerankParams:
        return cls(
            truncate=request.truncate,
            truncation_direction=request.truncation_direction,
            raw_scores=request.raw_scores,
        )

    def describe(self) -> dict[str, Any]:
        """The key as JSON-friendly values (status pages)."""
        return {
            "truncate": self.truncate,
            "truncation_direction": self.truncation_direction.value,
            "raw_scores": self.raw_scores,
        }


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What one upstream call may carry: texts to embed, documents to rerank, the tokens of an
    embedding call's texts and those of a rerank call as ``budget_tokens`` reckons them (the
    query counted with every document, as vendors count them; None: no cap).

    An adapter replaces its limits (never changes them in place) when it learns new ones from
    its upstream (TEI's ``/info``, a refusal that names the limit): the runtime notices by
    identity after each call and resizes its lanes (``ProviderRuntime._sync``)."""

    max_texts: int
    max_documents: int = 1000
    max_tokens: int | None = None
    max_rerank_tokens: int | None = None


def budget_tokens(text: str) -> int:
    """What ``text`` weighs against an upstream's cap on the tokens of one call
    (``ProviderLimits.max_tokens``): a third of its UTF-8 bytes, plus two special tokens.

    Not the chars/4 that estimates a key's spend (``core/spend.py``): a call over the cap is
    refused whole, while an estimate too high only makes calls somewhat smaller. Byte-level
    BPE tokenizers (OpenAI's, Voyage's) make about 4 characters a token of English prose
    (reckoned here a third high), about 3 of code, and about one a character of CJK text,
    which UTF-8 writes in 3 bytes (chars/4 would reckon a quarter of it): counted in bytes,
    scripts land on one scale. What is left over, the upstream's refusal teaches
    (``HttpProvider.sized``: its own count of the refused call against this reckoning).
    """
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return n // 3 + 2


@dataclass(slots=True)
class Embeddings:
    """One upstream call's answer: a vector per text, and the tokens it billed (if it said)."""

    vectors: list[Vector]
    tokens: int | None = None
    model: str | None = None


@dataclass(slots=True)
class Scores:
    """One upstream rerank call's answer: a score per document, in the documents' order."""

    scores: list[float]
    tokens: int | None = None
    model: str | None = None


class Provider(Protocol):
    """A remote embedding API.

    ``start`` may do I/O (TEI reads ``/info`` for its limits); ``embed`` makes exactly one
    logical upstream call (with retries inside its budget) and raises only embedplex errors.
    """

    name: str
    model: str | None

    @property
    def type(self) -> str: ...

    @property
    def limits(self) -> ProviderLimits: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def bind(
        self,
        listener: AttemptListener,
        gate: Callable[[], None],
        *,
        on_retry: RetryListener | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """Report every upstream attempt to ``listener``; call ``gate`` before each retry and
        report the retry to ``on_retry``; with a ``tracer``, wrap each attempt in a span."""

    def check(self, params: EmbedParams) -> None:
        """Raise InvalidRequestError if this provider cannot honour ``params``."""

    async def embed(
        self, texts: list[str], params: EmbedParams, *, traces: Sequence[SpanContext] = ()
    ) -> Embeddings:
        """Vectors for ``texts``; ``traces`` are their callers' request spans (for tracing)."""


@runtime_checkable
class Reranker(Protocol):
    """A remote rerank API: one query and its documents per call.

    Implemented beside ``Provider`` by the same adapter object (see the module docstring);
    ``rerank`` makes one logical upstream call and raises only embedplex errors.
    """

    name: str
    rerank_model: str  # the upstream model name rerank calls send

    @property
    def limits(self) -> ProviderLimits: ...

    def check_rerank(self, params: RerankParams) -> None:
        """Raise InvalidRequestError if this provider cannot honour ``params``."""

    async def rerank(
        self,
        query: str,
        documents: list[str],
        params: RerankParams,
        *,
        traces: Sequence[SpanContext] = (),
    ) -> Scores:
        """A score per document of ``documents``, in their order."""
