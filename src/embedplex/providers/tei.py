"""Hugging Face TEI ``POST /embed`` and ``POST /rerank``; the batch limit (texts or documents
per call, ``max_client_batch_size``) comes from ``GET /info``."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from embedplex.providers.adapter import HttpProvider, decode_vectors, parse_ranked
from embedplex.providers.base import Embeddings, EmbedParams, ProviderLimits, RerankParams, Scores

logger = logging.getLogger(__name__)


class TEIProvider(HttpProvider):
    type = "tei"
    path = "/embed"
    max_texts = 32  # TEI's default --max-client-batch-size, until /info says otherwise
    max_documents = 32  # /rerank is held to the same --max-client-batch-size
    served: str | None = None  # "model_id@model_sha" from /info, once read
    supported = frozenset({"truncate", "dimensions", "prompt_name", "truncation_direction"})
    rerank_supported = frozenset({"truncate", "truncation_direction", "raw_scores"})

    async def start(self) -> None:
        await super().start()
        info_url = str(httpx.URL(self.url).copy_with(path="/info", query=None))
        try:
            response = await self.transport.client.get(
                info_url, headers=self._headers, timeout=self.config.timeout_s
            )
            response.raise_for_status()
            info = response.json()
            limit = int(info["max_client_batch_size"])
            # What the upstream serves, for the cache's keys (providers/cached.py): a TEI
            # provider rarely names its model, so its URL alone would outlive a redeploy.
            self.served = f"{info.get('model_id')}@{info.get('model_sha')}"
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # The upstream may come up later; the default limit is safe for any TEI.
            logger.warning("provider %s: could not read %s (%s)", self.name, info_url, exc)
            return
        self._limits = ProviderLimits(max_texts=max(1, limit), max_documents=max(1, limit))

    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": texts, "normalize": params.normalize}
        if params.truncate is not None:
            body["truncate"] = params.truncate
        if params.truncation_direction.value != "right":
            body["truncation_direction"] = params.truncation_direction.value.capitalize()
        if params.prompt_name is not None:
            body["prompt_name"] = params.prompt_name
        if params.dimensions is not None:
            body["dimensions"] = params.dimensions
        return body

    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        tokens = headers.get("x-compute-tokens")
        return Embeddings(decode_vectors(data), int(tokens) if tokens else None)

    def rerank_body(self, query: str, documents: list[str], params: RerankParams) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "texts": documents, "raw_scores": params.raw_scores}
        if params.truncate is not None:
            body["truncate"] = params.truncate
        if params.truncation_direction.value != "right":
            body["truncation_direction"] = params.truncation_direction.value.capitalize()
        return body

    def parse_rerank(self, data: Any, headers: httpx.Headers, n: int) -> Scores:
        tokens = headers.get("x-compute-tokens")
        return Scores(parse_ranked(data, n, "score"), int(tokens) if tokens else None)
