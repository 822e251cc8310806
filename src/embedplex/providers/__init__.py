"""Remote embedding and rerank providers behind two small protocols, batched by the shared engine.

``base`` holds the protocols (``Provider`` embeds, ``Reranker`` reranks), ``http`` the pooled
client with retries and error mapping, one module per API (``tei``, ``openai``, ``voyage``,
``cohere``: each speaks both), ``health`` the circuit breaker, ``aimd`` adaptive batch sizing,
``guard`` the way into an upstream (breaker, semaphore, split on 413), ``lanes`` batch lanes by
key, ``runtime`` a provider's embedding lanes and ``rerank_lanes`` its rerank lanes.
"""

from __future__ import annotations

from embedplex.providers.adapter import HttpProvider
from embedplex.providers.base import (
    Embeddings,
    EmbedParams,
    Provider,
    ProviderLimits,
    Reranker,
    RerankParams,
    Scores,
)
from embedplex.providers.cohere import CohereProvider
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.openai import OpenAIProvider
from embedplex.providers.tei import TEIProvider
from embedplex.providers.voyage import VoyageProvider

PROVIDER_TYPES: dict[str, type[HttpProvider]] = {
    "tei": TEIProvider,
    "openai": OpenAIProvider,
    "voyage": VoyageProvider,
    "cohere": CohereProvider,
}

__all__ = [
    "PROVIDER_TYPES",
    "CohereProvider",
    "EmbedParams",
    "Embeddings",
    "HttpProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderConfig",
    "ProviderLimits",
    "RerankParams",
    "Reranker",
    "RouteConfig",
    "Scores",
    "TEIProvider",
    "VoyageProvider",
]
