"""The Ray Serve replica: one local model (tokenizer -> batcher -> backend) in a Ray actor.

Each replica loads the model with the same ``load_local_model`` an in-process server uses and
runs the same token-budget batcher over it, so a request crossing Ray is batched exactly as a
local one: Serve only spreads requests over replicas (``max_ongoing_requests`` is set high
enough that a replica's batches can fill, see ``application.py``). The replica's inference
threads follow its Ray CPUs (``num_cpus``), not the node's cores, which other replicas share.
Each replica keeps its own embedding cache of ``cache_max_bytes``, as an in-process server
does; not the Redis tier, whose URL is a secret the cluster is never sent.
"""

from __future__ import annotations

import asyncio
import math
import typing
from typing import Any

import numpy as np

from embedplex.cache import EmbeddingCache
from embedplex.config import Settings
from embedplex.core.errors import EmbedplexError, InvalidRequestError
from embedplex.core.types import (
    EmbeddingService,
    EmbedRequest,
    ModelInfo,
    RerankRequest,
    TokenEmbedding,
    Tokenizing,
    no_token_embeddings,
    no_tokenizer,
)
from embedplex.models.config import ModelConfig
from embedplex.models.layout import inference_layout
from embedplex.models.loading import load_local_model
from embedplex.models.local import LocalModel
from embedplex.models.rerank import LocalRerankModel
from embedplex.ray.wire import (
    WIRE_VERSION,
    DecodeAnswer,
    DecodeCall,
    EmbedAnswer,
    RerankAnswer,
    TokenEmbedAnswer,
    TokenizeCall,
    TokensAnswer,
)


def replica_config(
    settings: Settings, model: ModelConfig, cores: int
) -> tuple[Settings, ModelConfig]:
    """The settings and table a replica loads its model with: layout from its ``cores``."""
    layout = inference_layout(settings, cores, model=model)
    settings = settings.model_copy(
        update={
            "inference_threads": layout.threads,
            "inference_solo_threads": layout.solo_threads or layout.threads,
            "tokenization_workers": settings.tokenization_workers or cores,
        }
    )
    update: dict[str, Any] = {"inference_streams": layout.streams, "runtime": "local"}
    update.update(dict.fromkeys(("replicas", "autoscaling", "ray_address", "num_cpus")))
    update["num_gpus"] = None
    return settings, model.model_copy(update=update)


class EmbedplexReplica:
    """A Serve deployment class (``application.py`` wraps it); methods take and return the core
    types, which Ray pickles."""

    def __init__(self, settings: dict[str, Any], model: dict[str, Any]) -> None:
        config = ModelConfig.model_validate(model)
        cores = max(1, math.floor(config.num_cpus or 1))
        self._settings, self._config = replica_config(Settings(**settings), config, cores)
        self._cache = EmbeddingCache(self._settings.cache_max_bytes)
        # Blocking load in the constructor: Serve counts the replica as starting until it
        # returns, so no request reaches a replica whose model is still loading.
        self._model: LocalModel[Any] = load_local_model(
            self._settings, self._config, cache=self._cache
        )
        self._started: asyncio.Task[None] | None = None
        self.replica = _replica_id()

    async def _ready(self) -> LocalModel[Any]:
        # The batcher must start on the loop that serves the requests: the first call starts it.
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._model.start())
        await asyncio.shield(self._started)
        return self._model

    async def info(self) -> ModelInfo:
        await self._ready()
        return self._model.info

    async def wire_version(self) -> int:
        """Which methods this replica has (``wire.py``); a replica without this method is 1."""
        return WIRE_VERSION

    async def embed(self, request: EmbedRequest) -> EmbedAnswer | EmbedplexError:
        model = await self._ready()
        try:
            result = await typing.cast(EmbeddingService, model).embed(request)
        except EmbedplexError as exc:
            return exc
        dim = result.vectors[0].shape[0] if result.vectors else 0
        matrix = (
            np.stack(result.vectors).astype(np.float32, copy=False)
            if result.vectors
            else np.empty((0, dim), np.float32)
        )
        return EmbedAnswer(matrix, result.prompt_tokens, result.timings, self.replica)

    async def rerank(self, request: RerankRequest) -> RerankAnswer | EmbedplexError:
        model = await self._ready()
        if not isinstance(model, LocalRerankModel):
            return InvalidRequestError(f"{model.info.name} is not a reranker", param="model")
        try:
            result = await model.rerank(request)
        except EmbedplexError as exc:
            return exc
        return RerankAnswer(result.scores, result.prompt_tokens, result.timings, self.replica)

    async def tokenize(self, call: TokenizeCall) -> TokensAnswer | EmbedplexError:
        model = await self._ready()
        if not isinstance(model, Tokenizing):
            return no_tokenizer(model.info.name)
        try:
            rows = await model.tokenize(
                call.texts, add_special_tokens=call.add_special_tokens, prompt_name=call.prompt_name
            )
        except EmbedplexError as exc:
            return exc
        return TokensAnswer.pack(rows, self.replica)

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedAnswer | EmbedplexError:
        model = await self._ready()
        if not isinstance(model, TokenEmbedding):
            return no_token_embeddings(model.info.name)
        try:
            result = await model.embed_all(request)
        except EmbedplexError as exc:
            return exc
        return TokenEmbedAnswer.pack(
            result.vectors, result.prompt_tokens, result.timings, self.replica
        )

    async def decode(self, call: DecodeCall) -> DecodeAnswer | EmbedplexError:
        model = await self._ready()
        try:
            texts = await model.decode(call.sequences, skip_special_tokens=call.skip_special_tokens)
        except EmbedplexError as exc:
            return exc
        return DecodeAnswer(texts, self.replica)

    async def stats(self) -> dict[str, Any]:
        return {**self._model.stats(), "replica": self.replica, "cache": self._cache.stats()}

    async def check_health(self) -> None:
        """Serve's health check: a replica whose backend died is replaced."""
        model = await self._ready()
        model.health()


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica (a test calling the class directly)
        return "local"
