"""Cohere embed and rerank, v2 (``/v2/embed``, ``/v2/rerank``, the default) or v1 (an endpoint
whose path has ``/v1/``, or a base URL ending in ``/v1``). v1 has no ``output_dimension``, so a
v1 provider refuses ``dimensions`` (422) instead of answering the model's full width.

Cohere requires ``input_type`` for v3+ models: a request without one uses the provider's
configured ``input_type`` or ``search_document``. Rerank always truncates each document at
``max_tokens_per_doc`` and returns relevance scores in [0, 1], so ``truncate: false`` and
``raw_scores`` are refused (422).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx

from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.errors import InvalidRequestError
from embedplex.providers.adapter import HttpProvider, decode_vectors
from embedplex.providers.base import Embeddings, EmbedParams, RerankParams

_INPUT_TYPES = {"query": "search_query", "document": "search_document"}


class CohereProvider(HttpProvider):
    type = "cohere"
    default_endpoint = "https://api.cohere.com/v2/embed"
    path = "/v2/embed"
    max_texts = 96
    supported = frozenset({"truncate", "dimensions", "input_type", "truncation_direction"})
    default_rerank_model = "rerank-v3.5"

    @property
    def v1(self) -> bool:
        return "/v1/" in httpx.URL(self.url).path

    def check(self, params: EmbedParams) -> None:
        super().check(params)
        if self.v1 and params.dimensions is not None:
            # v1's /embed has no output_dimension: the upstream would answer its full width,
            # and the cache would keep it under the width asked for.
            raise InvalidRequestError(
                f"provider {self.name} (cohere v1) does not support dimensions: /v1/embed has "
                "no output_dimension (a /v2/embed endpoint does)",
                param="dimensions",
            )

    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        input_type = params.input_type or "search_document"
        body: dict[str, Any] = {
            "texts": texts,
            "model": self.model or "embed-english-v3.0",
            "input_type": _INPUT_TYPES.get(input_type, input_type),
            "embedding_types": ["float"],
        }
        if params.truncate is False:
            body["truncate"] = "NONE"
        elif params.truncate or params.truncation_direction is TruncationDirection.LEFT:
            left = params.truncation_direction is TruncationDirection.LEFT
            body["truncate"] = "START" if left else "END"
        if params.dimensions is not None:  # v2 only: v1 refuses it (``check``)
            body["output_dimension"] = params.dimensions
        return body

    def check_rerank(self, params: RerankParams) -> None:
        if params.truncate:  # Cohere truncates documents anyway: true asks for what it does
            params = dataclasses.replace(params, truncate=None)
        super().check_rerank(params)

    def rerank_body(self, query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        body = super().rerank_body(query, documents, params)
        if not self.v1:
            del body["return_documents"]  # v2 never returns them
        return body

    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        embeddings = data["embeddings"]
        if isinstance(embeddings, dict):  # embeddings_by_type (always in v2)
            embeddings = embeddings["float"]
        units = (data.get("meta") or {}).get("billed_units") or {}
        return Embeddings(decode_vectors(embeddings), units.get("input_tokens"))
