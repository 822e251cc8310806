"""The common part of the HTTP adapters: URL, API key, limits, parameter checks, vectors.

A concrete adapter says which URL path it speaks, how many texts a call may carry, which
``EmbedParams`` it can honour, how to build the request body and how to read the answer.

Rerank (``Reranker``) is built the same way: ``rerank_body`` and ``parse_rerank``. The default
pair speaks the Jina/Cohere shape (``{model, query, documents, top_n}`` -> ``results: [{index,
relevance_score}]``) that OpenAI-compatible servers (vLLM, Infinity, embedplex) and Jina use;
TEI and Voyage override it. The call asks for every document's score (``top_n`` = all) because
callers with the same query share a call; each caller's own ``top_n`` is applied by the route.
"""

from __future__ import annotations

import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import numpy as np
import pybase64

from embedplex.core.errors import InvalidRequestError
from embedplex.core.types import Vector
from embedplex.providers.base import (
    Embeddings,
    EmbedParams,
    ProviderLimits,
    RerankParams,
    Scores,
)
from embedplex.providers.config import ProviderConfig
from embedplex.providers.http import AttemptListener, HttpTransport, RetryListener, RetryPolicy

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

logger = logging.getLogger(__name__)

_DEFAULTS = EmbedParams()
_RERANK_DEFAULTS = RerankParams()


def decode_vector(raw: Any) -> Vector:
    """A JSON list of floats, or base64 of little-endian float32 (OpenAI's ``base64``)."""
    if isinstance(raw, str):
        return np.frombuffer(_b64decode(raw), dtype="<f4").astype(np.float32)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"expected a list of floats, got {type(raw).__name__}")
    return np.asarray(raw, dtype=np.float32)


def _b64decode(text: str) -> bytes:
    """Strict base64 (RFC 4648 alphabet and padding only): an upstream's row with anything
    else in it is a malformed answer, never bytes guessed from what was left (the stdlib's
    lenient decoding skips stray characters and reads on past padding)."""
    return pybase64.b64decode(text, validate=True)


_LITTLE = sys.byteorder == "little"  # "<f4" is then the machine's float32: no conversion


def decode_vectors(rows: Any) -> list[Vector]:
    """``decode_vector`` of every row, made cheaper where the rows agree.

    An answer carries one vector per text of the call (up to thousands). Base64 rows of one
    length become read-only arrays over their own decoded bytes: no copy, and each holds only
    its own data, so the cache keeps it as it is (``providers/cached.py``). Lists of floats of
    one length become one matrix, each vector a row of it (writable, its own part of it). Rows
    that do not agree (lengths, kinds) take ``decode_vector`` one by one, which says what is
    wrong with them. Every row of one answer must have one width: rows of mixed widths (or
    an empty row) are a malformed answer, not vectors of different models handed to callers.
    """
    if not isinstance(rows, list):
        raise TypeError(f"expected a list of vectors, got {type(rows).__name__}")
    if rows and all(type(row) is str for row in rows):
        blobs = [_b64decode(row) for row in rows]
        width = len(blobs[0])
        if _LITTLE and width and width % 4 == 0 and all(len(b) == width for b in blobs):
            return [np.frombuffer(blob, dtype=np.float32) for blob in blobs]
    elif rows and all(type(row) is list for row in rows):
        try:
            matrix = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = None
        if matrix is not None and matrix.ndim == 2 and matrix.shape[1]:
            return list(matrix)
    vectors = [decode_vector(row) for row in rows]
    if vectors and len({v.shape[0] for v in vectors}) != 1:
        raise ValueError("rows of different widths in one answer")
    return vectors


def check_width(vectors: list[Vector], dimensions: int | None) -> None:
    """Raise ValueError unless the answer's rows have the width asked for (``dimensions``, when
    it was sent). ``decode_vectors`` made them one width: the first row says it."""
    if dimensions is not None and vectors and vectors[0].shape[0] != dimensions:
        raise ValueError(f"vectors of width {vectors[0].shape[0]}, asked for {dimensions}")


def resolve_url(endpoint: str | None, default: str | None, path: str) -> str:
    """A full URL: ``endpoint`` as given when it has a path, else with ``path`` appended."""
    url = endpoint or default
    if url is None:
        raise ValueError("this provider type needs an endpoint")
    parsed = httpx.URL(url)
    if parsed.path in ("", "/"):
        return url.rstrip("/") + path
    if parsed.path.rstrip("/") == "/v1" and path.startswith("/v1/"):
        return url.rstrip("/") + path[3:]
    return url


def rerank_url(endpoint: str | None, embed_url: str) -> str | None:
    """``endpoint`` if set, else the embeddings URL with ``embed``/``embeddings`` -> ``rerank``.

    ``/embed`` (TEI), ``/v1/embeddings`` (OpenAI, Voyage) and ``/v2/embed`` (Cohere) all sit
    beside their vendor's rerank path. Any other path is not guessed at: None (not configured).
    """
    if endpoint:
        return endpoint
    url = httpx.URL(embed_url)
    head, _, last = url.path.rstrip("/").rpartition("/")
    if last not in ("embed", "embeddings"):
        return None
    return str(url.copy_with(path=f"{head}/rerank"))


def parse_ranked(rows: Any, n: int, score: str) -> list[float]:
    """``[{index, <score>}]`` in any order -> one score per document, in document order."""
    scores: list[float | None] = [None] * n
    for row in rows:
        i = int(row["index"])
        if not 0 <= i < n or scores[i] is not None:
            raise ValueError(f"result index {i} is out of range or repeated ({n} documents)")
        scores[i] = float(row[score])
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise ValueError(f"no score for {len(missing)} of {n} documents")
    return [s for s in scores if s is not None]


class HttpProvider(ABC):
    """Base of the HTTP adapters (see ``embedplex.providers.base.Provider``)."""

    type: ClassVar[str]
    default_endpoint: ClassVar[str | None] = None
    path: ClassVar[str]
    max_texts: ClassVar[int]
    # EmbedParams fields this API can honour when they differ from the defaults.
    supported: ClassVar[frozenset[str]] = frozenset()
    # RerankParams fields this API can honour when they differ from the defaults.
    rerank_supported: ClassVar[frozenset[str]] = frozenset()
    max_documents: ClassVar[int] = 1000  # documents per rerank call (Cohere, Voyage: 1,000)
    default_rerank_model: ClassVar[str] = "default"

    def __init__(
        self,
        config: ProviderConfig,
        client: httpx.AsyncClient,
    ) -> None:
        self.config = config
        self.name = config.name
        self.model = config.model
        self.url = resolve_url(config.endpoint, self.default_endpoint, self.path)
        self.transport = HttpTransport(
            config.name,
            client,
            policy=RetryPolicy(
                attempt_timeout=config.timeout_s,
                budget=config.retry_budget_s,
                max_attempts=config.max_attempts,
                backoff_base=config.backoff_base_ms / 1000,
                backoff_max=config.backoff_max_s,
            ),
        )
        self.rerank_url = rerank_url(config.rerank_endpoint, self.url)
        self.rerank_model = config.rerank_model or config.model or self.default_rerank_model
        self._limits = ProviderLimits(max_texts=self.max_texts, max_documents=self.max_documents)
        self._headers: dict[str, str] = {}

    @property
    def limits(self) -> ProviderLimits:
        return self._limits

    def bind(
        self,
        listener: AttemptListener,
        gate: Callable[[], None],
        *,
        on_retry: RetryListener | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        t = self.transport
        t.listener, t.gate, t.on_retry, t.tracer = listener, gate, on_retry, tracer

    async def start(self) -> None:
        env = self.config.api_key_env
        if env:
            key = os.environ.get(env)
            if key:
                self._headers["authorization"] = f"Bearer {key}"
            else:
                # Not fatal: the other providers should still serve; this one will get 401s.
                logger.warning("provider %s: environment variable %s is not set", self.name, env)

    async def close(self) -> None:
        """Forget the key; the pooled client belongs to the router, which closes it."""
        self._headers.clear()

    def check(self, params: EmbedParams) -> None:
        for field in ("truncate", "dimensions", "input_type", "prompt_name"):
            if field in self.supported or getattr(params, field) == getattr(_DEFAULTS, field):
                continue
            raise InvalidRequestError(
                f"provider {self.name} ({self.type}) does not support {field}", param=field
            )
        if params.truncation_direction != _DEFAULTS.truncation_direction and (
            "truncation_direction" not in self.supported
        ):
            raise InvalidRequestError(
                f"provider {self.name} ({self.type}) only truncates on the right",
                param="truncation_direction",
            )

    async def embed(
        self, texts: list[str], params: EmbedParams, *, traces: Sequence[SpanContext] = ()
    ) -> Embeddings:
        n = len(texts)
        body = self.body(texts, params)
        # The width the upstream was asked for, under its API's name (Cohere v1 sends none).
        asked = body.get("dimensions", body.get("output_dimension"))

        def parse(data: Any, headers: httpx.Headers) -> Embeddings:
            out = self.parse(data, headers)
            if len(out.vectors) != n:
                raise ValueError(f"{len(out.vectors)} vectors for {n} texts")
            check_width(out.vectors, asked)
            return out

        return await self.transport.post_json(
            self.url,
            body,
            parse=parse,
            headers=self._headers,
            size=n,
            traces=traces,
        )

    def check_rerank(self, params: RerankParams) -> None:
        if self.rerank_url is None:
            raise self._no_rerank_url()
        for field in ("truncate", "truncation_direction", "raw_scores"):
            if field in self.rerank_supported:
                continue
            if getattr(params, field) != getattr(_RERANK_DEFAULTS, field):
                raise InvalidRequestError(
                    f"provider {self.name} ({self.type}) does not support {field} in rerank",
                    param=field,
                )

    async def rerank(
        self,
        query: str,
        documents: list[str],
        params: RerankParams,
        *,
        traces: Sequence[SpanContext] = (),
    ) -> Scores:
        url = self.rerank_url
        if url is None:
            raise self._no_rerank_url()
        n = len(documents)
        return await self.transport.post_json(
            url,
            self.rerank_body(query, documents, params),
            parse=lambda data, headers: self.parse_rerank(data, headers, n),
            headers=self._headers,
            size=n,
            traces=traces,
        )

    def _no_rerank_url(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"provider {self.name} ({self.type}) has no rerank URL: set rerank_endpoint",
            param="model",
        )

    def rerank_body(self, query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        """Jina / OpenAI-compatible servers' ``/v1/rerank`` (Cohere's shape, less its extras)."""
        return {
            "model": self.rerank_model,
            "query": query,
            "documents": documents,
            "top_n": len(documents),
            "return_documents": False,
        }

    def parse_rerank(self, data: Any, headers: httpx.Headers, n: int) -> Scores:
        usage = data.get("usage") or {}
        tokens = usage.get("total_tokens", usage.get("prompt_tokens"))
        scores = parse_ranked(data["results"], n, "relevance_score")
        return Scores(scores, tokens, data.get("model"))

    @abstractmethod
    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        """The upstream request body for one call."""

    @abstractmethod
    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        """Vectors in input order (raise KeyError/TypeError/ValueError on a bad shape)."""


def parse_openai_data(data: Any) -> list[Vector]:
    """``data: [{"index", "embedding"}]`` (OpenAI, Voyage), put back in input order.

    The indexes must be exactly 0..n-1 in some order: a repeated or out-of-range index would
    hand one caller's vector to another (ValueError: a malformed answer).
    """
    rows = data["data"]
    indexes = [int(row["index"]) for row in rows]
    expected = list(range(len(rows)))
    if indexes != expected:  # most upstreams answer in order: one list comparison
        order = sorted(expected, key=indexes.__getitem__)
        if [indexes[i] for i in order] != expected:
            raise ValueError(f"indexes are not a permutation of 0..{len(rows) - 1}")
        rows = [rows[i] for i in order]
    return decode_vectors([row["embedding"] for row in rows])
