"""Voyage AI ``POST /v1/embeddings`` (input, model, input_type, truncation, output_dimension)
and ``POST /v1/rerank`` (query, documents, model, top_k, truncation -> ``data: [{index,
relevance_score}]``). Besides texts per call, Voyage caps the tokens of one call's texts by
model (``default_max_tokens``), and of one rerank call's query and documents
(``default_max_rerank_tokens``): over it the whole call is refused (400), so the lanes cut by
them too (``max_batch_tokens``, ``max_rerank_tokens``, docs/router.md)."""

from __future__ import annotations

from typing import Any

import httpx

from embedplex.providers.adapter import HttpProvider, parse_openai_data, parse_ranked
from embedplex.providers.base import Embeddings, EmbedParams, RerankParams, Scores

# Cohere-style names callers may send; Voyage knows only query and document.
_INPUT_TYPES = {"search_query": "query", "search_document": "document"}


# The tokens one call's texts may hold, by model (docs.voyageai.com/reference/embeddings-api);
# any other model (voyage-4-large, voyage-3-large, voyage-code-3, voyage-finance-2,
# voyage-law-2, ...) gets the least of them, 120K.
_TOKENS_PER_CALL = {
    "voyage-4-lite": 1_000_000,
    "voyage-3.5-lite": 1_000_000,
    "voyage-3-lite": 1_000_000,
    "voyage-4": 320_000,
    "voyage-3.5": 320_000,
    "voyage-3": 320_000,
    "voyage-2": 320_000,
}
_LEAST_TOKENS_PER_CALL = 120_000
DEFAULT_MODEL = "voyage-3.5"
# The tokens of one rerank call, "the number of query tokens x the number of documents + sum
# of the number of tokens in all documents", by model (docs.voyageai.com/reference/
# reranker-api); any other model gets the least of them.
_RERANK_TOKENS_PER_CALL = {
    "rerank-2.5": 600_000,
    "rerank-2.5-lite": 600_000,
    "rerank-2": 600_000,
    "rerank-2-lite": 600_000,
}
_LEAST_RERANK_TOKENS_PER_CALL = 300_000  # rerank-1, rerank-lite-1


class VoyageProvider(HttpProvider):
    type = "voyage"
    default_endpoint = "https://api.voyageai.com/v1/embeddings"
    path = "/v1/embeddings"
    # Texts per call (docs.voyageai.com/reference/embeddings-api: "The maximum length of the
    # list is 1,000", every model); the token cap above cuts most batches well before it.
    max_texts = 1000
    supported = frozenset({"truncate", "dimensions", "input_type"})
    rerank_supported = frozenset({"truncate"})
    default_rerank_model = "rerank-2.5"

    def default_max_tokens(self) -> int | None:
        return _TOKENS_PER_CALL.get(self.model or DEFAULT_MODEL, _LEAST_TOKENS_PER_CALL)

    def default_max_rerank_tokens(self) -> int | None:
        return _RERANK_TOKENS_PER_CALL.get(self.rerank_model, _LEAST_RERANK_TOKENS_PER_CALL)

    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        body: dict[str, Any] = {"input": texts, "model": self.model or DEFAULT_MODEL}
        if params.input_type is not None:
            body["input_type"] = _INPUT_TYPES.get(params.input_type, params.input_type)
        if params.truncate is not None:
            body["truncation"] = params.truncate
        if params.dimensions is not None:
            body["output_dimension"] = params.dimensions
        return body

    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        usage = data.get("usage") or {}
        return Embeddings(parse_openai_data(data), usage.get("total_tokens"), data.get("model"))

    def rerank_body(self, query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "query": query,
            "documents": documents,
            "model": self.rerank_model,
            "top_k": len(documents),
        }
        if params.truncate is not None:
            body["truncation"] = params.truncate
        return body

    def parse_rerank(self, data: Any, headers: httpx.Headers, n: int) -> Scores:
        usage = data.get("usage") or {}
        scores = parse_ranked(data["data"], n, "relevance_score")
        return Scores(scores, usage.get("total_tokens"), data.get("model"))
