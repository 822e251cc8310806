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

import dataclasses
import logging
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import httpx
import numpy as np
import pybase64

from embedplex.core.errors import InvalidRequestError, UpstreamError, UpstreamTooLargeError
from embedplex.core.types import Vector
from embedplex.providers.base import (
    Embeddings,
    EmbedParams,
    ProviderLimits,
    RerankParams,
    Scores,
    budget_tokens,
)
from embedplex.providers.config import ProviderConfig
from embedplex.providers.endpoints import url_credentials
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


_VERSION = re.compile(r"v\d+\w*")  # v1, v2, v1beta (Gemini), v1alpha2...


def resolve_url(
    endpoint: str | None, default: str | None, path: str, bases: Collection[str] = ()
) -> str:
    """The URL of the adapter's calls: ``endpoint`` with ``path`` appended when it is a base
    URL, else as written (the full URL of the calls).

    A base URL has no path (``http://host:8080``: ``path`` whole), or a path that ends in an
    API version (``/v1``, ``/inference/v1``, ``/openai/v1/``, ``/v1beta``: how OpenAI-compatible
    hosts give theirs, and what openai-python appends ``/embeddings`` to) or in one of the
    adapter's ``bases`` (the openai type's ``openai``: DeepInfra's ``/v1/openai``, Gemini's
    ``/v1beta/openai/``). Then the version is the endpoint's own and only the rest of ``path``
    is appended: ``.../inference/v1`` + ``/embeddings``; a Cohere ``.../v1`` gets ``/v1/embed``
    (its v1 API), ``.../v2`` gets ``/v2/embed``. No full URL of these APIs ends in a version
    or in ``bases``, so none is taken for a base. The query, if any, stays at the end.
    """
    url = endpoint or default
    if url is None:
        raise ValueError("this provider type needs an endpoint")
    base = httpx.URL(url).path.rstrip("/")
    if not base:
        tail = path
    else:
        version, _, rest = path.lstrip("/").partition("/")
        last = base.rpartition("/")[2]
        if not ((_VERSION.fullmatch(last) or last in bases) and _VERSION.fullmatch(version)):
            return url
        tail = "/" + rest
    head, mark, query = url.partition("?")
    return head.rstrip("/") + tail + mark + query


def sibling_url(url: str, name: str) -> str:
    """``url`` with its last path segment replaced by ``name``, its query kept (a key may
    travel there: ``?key=``): where an API keeps its other routes beside the one configured
    (TEI's ``/info`` beside ``/embed``, under any prefix a proxy puts before both)."""
    parsed = httpx.URL(url)
    head = parsed.path.rpartition("/")[0]
    return str(parsed.copy_with(path=f"{head}/{name}"))


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
    """``[{index, <score>}]`` in any order -> one score per document, in document order.

    A score must be a JSON number: ``float()`` would also take ``"nan"``, ``"inf"`` or ``true``,
    and one NaN scrambles the ranking of every other document (and reaches the caller as
    null). The JSON parser already refuses NaN literals and numbers that overflow."""
    scores: list[float | None] = [None] * n
    for row in rows:
        i = int(row["index"])
        if not 0 <= i < n or scores[i] is not None:
            raise ValueError(f"result index {i} is out of range or repeated ({n} documents)")
        value = row[score]
        if type(value) not in (int, float):
            raise ValueError(f"result {i}: {score} is a JSON {type(value).__name__}, not a number")
        scores[i] = float(value)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise ValueError(f"no score for {len(missing)} of {n} documents")
    return [s for s in scores if s is not None]


class SizeRefusal(NamedTuple):
    """What an upstream's refusal of a call for its size said: the inputs one call may carry,
    the tokens one call may carry and the tokens it counted in the refused one (None: not
    said). All None: it said the call was too large, and no number (Mistral's "Too many
    tokens overall, split into more batches.")."""

    max_items: int | None = None
    max_tokens: int | None = None
    sent_tokens: int | None = None


# How upstreams refuse a call for its size, in their own words (read from the message the
# transport kept: the upstream's, at most ``http.MAX_REASON`` characters of it):
# - TEI, any version (422 since 2026-02, 413 before; router/src/http/server.rs), and an
#   embedplex upstream (422): "batch size 64 > maximum allowed batch size 32";
_TOO_MANY_INPUTS = re.compile(r"batch size \d+ > maximum allowed batch size (\d+)")
# - Voyage (400): "... The max allowed tokens per submitted batch is 120000. Your batch has
#   124302 tokens after truncation. ..." (the count may be cut off with the message);
_VOYAGE_TOKENS = re.compile(
    r"max allowed tokens per submitted batch is (\d+)(?:\. Your batch has (\d+) tokens)?"
)
# - OpenAI (400, code max_tokens_per_request): "Requested 453357 tokens, max 300000 tokens
#   per request";
_OPENAI_TOKENS = re.compile(r"Requested (\d+) tokens, max (\d+) tokens per request")
# - Mistral's OpenAI-style API (400): "Too many tokens in batch. Max is 16384 got 17555".
_MISTRAL_TOKENS = re.compile(r"Too many tokens in batch\. Max is (\d+) got (\d+)")
# - and words that say the call holds too much, without a number: Mistral's since 2025 (400,
#   code 3210) "Too many tokens overall, split into more batches.", and the like. Only words
#   about the call or batch as a whole: an input's own ("This model's maximum context length
#   is 8192 tokens", "Input is too long") are a bad input's refusal, isolated as such.
_TOO_MUCH = re.compile(
    r"(?i)too many tokens (?:overall|in (?:the |this |your )?batch)|too many (?:inputs|texts)\b"
    r"|split (?:\w+ )?into (?:more|smaller) (?:batches|requests|chunks)"
    r"|batch (?:size )?(?:is )?too (?:large|big)"
)
_SIZE_STATUSES = frozenset({400, 413, 422})

# How long (seconds) limits learned from refusals hold, from the last one: then the limits the
# provider was told hold again (``HttpProvider.limits``).
LEARNED_TTL_S = 600.0
# Learned limits stay at or above 1/LEARNED_FLOOR of the told ones (TEI's default 32: 2).
LEARNED_FLOOR = 16
# An upstream's count of the refused call's tokens is believed within this factor of the
# router's reckoning of it; further off it is some other count, and the cap is learned as
# though no count were said.
PLAUSIBLE = 10


def size_refusal(error: UpstreamError) -> SizeRefusal | None:
    """What ``error`` said one call may carry, if it is an upstream's refusal of a call for
    its size (not of one input); None otherwise. Whatever the provider's type: an
    OpenAI-compatible endpoint may be TEI's, embedplex's or Mistral's."""
    if error.status not in _SIZE_STATUSES:
        return None
    text = error.message
    if m := _TOO_MANY_INPUTS.search(text):
        return SizeRefusal(max_items=int(m[1]))
    if m := _VOYAGE_TOKENS.search(text):
        return SizeRefusal(max_tokens=int(m[1]), sent_tokens=int(m[2]) if m[2] else None)
    if m := _OPENAI_TOKENS.search(text):
        return SizeRefusal(max_tokens=int(m[2]), sent_tokens=int(m[1]))
    if m := _MISTRAL_TOKENS.search(text):
        return SizeRefusal(max_tokens=int(m[1]), sent_tokens=int(m[2]))
    if _TOO_MUCH.search(text):
        return SizeRefusal()
    return None


def _plausible(count: int, estimate: int) -> bool:
    """Whether an upstream's ``count`` of a call's tokens can be of the call the router
    reckoned at ``estimate``."""
    return estimate <= count * PLAUSIBLE and count <= estimate * PLAUSIBLE


class HttpProvider(ABC):
    """Base of the HTTP adapters (see ``embedplex.providers.base.Provider``)."""

    type: ClassVar[str]
    default_endpoint: ClassVar[str | None] = None
    path: ClassVar[str]
    # Last path segments besides a version that make an endpoint a base URL (``resolve_url``).
    base_segments: ClassVar[frozenset[str]] = frozenset()
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
        self.url = resolve_url(
            config.endpoint, self.default_endpoint, self.path, self.base_segments
        )
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
            max_response_bytes=config.max_response_bytes,
            secrets=url_credentials(config.proxy),
        )
        self.rerank_url = rerank_url(config.rerank_endpoint, self.url)
        self.rerank_model = config.rerank_model or config.model or self.default_rerank_model
        tokens = config.max_batch_tokens
        rerank_tokens = config.max_rerank_tokens
        if rerank_tokens is None:
            rerank_tokens = self.default_max_rerank_tokens()
        self._limits = ProviderLimits(
            max_texts=self.max_texts,
            max_documents=self.max_documents,
            max_tokens=(self.default_max_tokens() if tokens is None else tokens) or None,
            max_rerank_tokens=rerank_tokens or None,
        )
        # The limits the provider was told (configured, the vendor's, TEI's /info), which
        # learned ones (``_learn``) stand below for ``LEARNED_TTL_S`` from the last lesson.
        self._told = self._limits
        self._learned_at: float | None = None
        self._headers: dict[str, str] = {}

    @property
    def limits(self) -> ProviderLimits:
        """What one call may carry now: the limits learned from refusals while they last, else
        the ones the provider was told."""
        if self._learned_at is not None and time.monotonic() - self._learned_at >= LEARNED_TTL_S:
            self._forget()
        return self._limits

    def _learn(self, **lower: int) -> None:
        """Limits an upstream's refusal (or an answer over the cap) said, taken where they are
        below the current ones; never below ``1/LEARNED_FLOOR`` of the told ones, and only
        for ``LEARNED_TTL_S``: a refusal from a replica misconfigured for a minute, a canary,
        a proxy's own cap, must not hold the provider to tiny calls until restart."""
        changes: dict[str, int] = {}
        for field, n in lower.items():
            told = getattr(self._told, field)
            n = max(n, told // LEARNED_FLOOR if told else 1, 1)
            current = getattr(self._limits, field)
            if current is None or n < current:
                changes[field] = n
        if changes:
            self._limits = dataclasses.replace(self._limits, **changes)
            self._learned_at = time.monotonic()

    def _forget(self) -> None:
        """Learned limits expired: the told ones hold again (the runtime resizes its lanes and
        AIMD's ceiling on the new ``limits``); an upstream still over them refuses once and
        teaches them again."""
        self._learned_at = None
        self._limits = self._told

    def default_max_tokens(self) -> int | None:
        """The vendor's documented cap on the tokens of one embedding call, where this
        provider has one and ``max_batch_tokens`` is not set (None: no cap known; a refusal
        that names one still teaches it, ``sized``)."""
        return None

    def default_max_rerank_tokens(self) -> int | None:
        """The vendor's documented cap on the tokens of one rerank call (the query counted
        with every document), where ``max_rerank_tokens`` is not set (None: no cap known)."""
        return None

    def sized(
        self, error: UpstreamError, costs: Sequence[int], *, documents: bool = False
    ) -> UpstreamError:
        """``error`` as ``UpstreamTooLargeError`` where the upstream refused the call for its
        size (``size_refusal``), having learned what it said into ``limits``; else ``error``.

        ``costs``: each input's ``budget_tokens`` in the refused call. A token cap is learned
        in those units: the refused call's reckoning scaled by the upstream's own count against
        its cap (exact for texts as dense as these), or halved where the count was not said or
        is not believable (over ``PLAUSIBLE`` times off ours: some other count). Words without
        a number (``SizeRefusal()``) teach half the tokens sent; a limit under 1 is no limit,
        and teaches nothing (the call is split in halves). Learned limits come down, within
        bounds, for a while (``_learn``). A rerank call's (``documents``) teaches the documents
        limit and the rerank token cap (its inputs' costs count the query with every document,
        as vendors count them). ``UpstreamTooLargeError`` from the transport (an answer over
        ``max_response_bytes``) teaches its ``max_items``.
        """
        if isinstance(error, UpstreamTooLargeError):
            if error.max_items is not None:
                self.learn_items(error.max_items, documents=documents)
            return error
        said = size_refusal(error)
        if said is None:
            return error
        max_items = max_cost = None
        if said.max_items is not None and 1 <= said.max_items < len(costs):
            max_items = said.max_items
            self.learn_items(max_items, documents=documents)
        cap = said.max_tokens if said.max_tokens is not None and said.max_tokens >= 1 else None
        if cap is not None or said == SizeRefusal():
            estimate = sum(costs)
            sent = said.sent_tokens
            if cap is not None and sent and _plausible(sent, estimate):
                budget = estimate * cap // sent
            else:
                budget = estimate // 2
            max_cost = max(1, min(budget, estimate - 1))
            self._learn(**{"max_rerank_tokens" if documents else "max_tokens": max_cost})
        out = UpstreamTooLargeError(
            error.message, status=error.status, max_items=max_items, max_cost=max_cost
        )
        out.__cause__ = error
        return out

    def learn_items(self, n: int, *, documents: bool) -> None:
        """An upstream said one call takes at most ``n`` texts (or documents)."""
        self._learn(**{"max_documents" if documents else "max_texts": n})

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

    async def prepare(self) -> None:
        """Before each upstream call: what the adapter must see to first, without holding the
        call (TEI: a read of its ``/info`` started in the background, when due). Nothing by
        default."""
        return None

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
        await self.prepare()
        n = len(texts)
        body = self.body(texts, params)
        # The width the upstream was asked for, under its API's name.
        asked = body.get("dimensions", body.get("output_dimension"))

        def parse(data: Any, headers: httpx.Headers) -> Embeddings:
            out = self.parse(data, headers)
            if len(out.vectors) != n:
                raise ValueError(f"{len(out.vectors)} vectors for {n} texts")
            check_width(out.vectors, asked)
            return out

        try:
            return await self.transport.post_json(
                self.url,
                body,
                parse=parse,
                headers=self._headers,
                size=n,
                traces=traces,
            )
        except UpstreamError as exc:
            sized = self.sized(exc, [budget_tokens(t) for t in texts])
            if sized is exc:
                raise
            raise sized from exc

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
        await self.prepare()
        n = len(documents)
        try:
            return await self.transport.post_json(
                url,
                self.rerank_body(query, documents, params),
                parse=lambda data, headers: self.parse_rerank(data, headers, n),
                headers=self._headers,
                size=n,
                traces=traces,
            )
        except UpstreamError as exc:
            q = budget_tokens(query)
            sized = self.sized(exc, [q + budget_tokens(d) for d in documents], documents=True)
            if sized is exc:
                raise
            raise sized from exc

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
