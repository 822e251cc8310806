"""Remote embedding providers behind one protocol, batched by the shared engine.

``base`` holds the protocol, ``http`` the pooled client with retries and error mapping, one
module per API (``tei``, ``openai``, ``voyage``, ``cohere``), ``health`` the circuit breaker,
``aimd`` adaptive batch sizing and ``runtime`` a provider's batch lanes.
"""

from __future__ import annotations

from embedplex.providers.adapter import HttpProvider
from embedplex.providers.base import Embeddings, EmbedParams, Provider, ProviderLimits
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
    "RouteConfig",
    "TEIProvider",
    "VoyageProvider",
]
