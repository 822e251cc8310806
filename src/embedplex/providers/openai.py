"""OpenAI-compatible ``POST /v1/embeddings``: OpenAI, vLLM, Infinity, Ollama, another embedplex.

Rerank speaks the Jina-style ``POST /v1/rerank`` these servers (and Jina's own API) share; the
shape is the adapter's default (``embedplex.providers.adapter``). OpenAI itself has no rerank.

Vectors travel as base64 by default (``encoding_format``): exact float32 bytes, a third of the
size of JSON floats. Servers that ignore the field and answer with lists are read as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx

from embedplex.providers.adapter import HttpProvider, parse_openai_data
from embedplex.providers.base import Embeddings, EmbedParams


class OpenAIProvider(HttpProvider):
    type = "openai"
    default_endpoint = "https://api.openai.com/v1/embeddings"
    path = "/v1/embeddings"
    # Hosts that serve an OpenAI-compatible API beside their own give its base URL ending in
    # ``/openai`` (DeepInfra ``https://api.deepinfra.com/v1/openai``, Gemini
    # ``https://generativelanguage.googleapis.com/v1beta/openai/``).
    base_segments = frozenset({"openai"})
    max_texts = 2048  # OpenAI's documented cap on `input` items
    supported = frozenset({"dimensions"})

    def check(self, params: EmbedParams) -> None:
        """``truncate: false`` asks for what OpenAI does: an input over the model's length is
        its 400 (``maximum context length``), so it is sent as no field at all. ``true`` it
        cannot honour (its API has no such field): refused."""
        if params.truncate is False:
            params = dataclasses.replace(params, truncate=None)
        super().check(params)

    def default_max_tokens(self) -> int | None:
        """OpenAI's own API takes at most 300,000 tokens over one call's inputs (its 400
        ``max_tokens_per_request``); other OpenAI-compatible servers set their own, if any."""
        return 300_000 if httpx.URL(self.url).host == "api.openai.com" else None

    def body(self, texts: list[str], params: EmbedParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input": texts,
            "model": self.model or "default",
            "encoding_format": self.config.encoding_format,
        }
        if params.dimensions is not None:
            body["dimensions"] = params.dimensions
        return body

    def parse(self, data: Any, headers: httpx.Headers) -> Embeddings:
        usage = data.get("usage") or {}
        tokens = usage.get("prompt_tokens", usage.get("total_tokens"))
        return Embeddings(parse_openai_data(data), tokens, data.get("model"))
