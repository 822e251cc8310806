"""Every route module's router, and the JSON POST routes the pipeline serves itself.

The pipeline (``api/pipeline.py``) validates these routes' bodies straight from the bytes and
calls their handlers directly: FastAPI's routing and dependency solving would cost more than an
embed route itself. The same handlers stay registered with FastAPI (``ROUTERS``) for OpenAPI
and ``/docs``; tests/api/test_pipeline.py checks that the two agree. Every POST route with a
JSON body belongs here, so that every body is parsed by the same parser (one answer for bad
JSON on every route). FastAPI dependencies do not run here: a route that has one names it as
its ``guard``.
"""

from __future__ import annotations

from fastapi import APIRouter

from embedplex.api.common import admit_embedding, admit_reranking
from embedplex.api.pipeline import JsonRoute
from embedplex.api.routes import (
    admin,
    batch,
    keys,
    native,
    openai,
    probes,
    rerank,
    status,
    tei,
    tei_extras,
)

ROUTERS: tuple[APIRouter, ...] = (
    openai.router,
    batch.router,
    tei.router,
    tei_extras.router,
    rerank.router,
    native.router,
    probes.router,
    status.router,
    admin.router,
    keys.router,
)

# Refused before the body is read when every model of the kind is full (``JsonRoute.admit``).
EMBED = admit_embedding
RERANK = admit_reranking

JSON_ROUTES: dict[str, JsonRoute] = {
    "/v1/embeddings": JsonRoute(openai.EmbeddingsRequest, openai.create_embeddings, admit=EMBED),
    "/embeddings": JsonRoute(openai.EmbeddingsRequest, openai.create_embeddings, admit=EMBED),
    "/embed": JsonRoute(tei.EmbedBody, tei.embed, admit=EMBED),
    "/api/v1/embed": JsonRoute(tei.NativeEmbedBody, tei.native_embed, admit=EMBED),
    "/tokenize": JsonRoute(tei.TokenizeBody, tei.tokenize),
    "/rerank": JsonRoute(rerank.TeiRerankBody, rerank.tei_rerank, admit=RERANK),
    "/v1/rerank": JsonRoute(rerank.RerankBody, rerank.rerank, admit=RERANK),
    "/v2/rerank": JsonRoute(rerank.RerankBody, rerank.rerank, admit=RERANK),
    "/v1/embeddings/batch": JsonRoute(batch.BatchRequest, batch.create_batch),
    "/embed_all": JsonRoute(tei_extras.EmbedAllBody, tei_extras.embed_all, admit=EMBED),
    "/similarity": JsonRoute(tei_extras.SimilarityBody, tei_extras.similarity),
    "/decode": JsonRoute(tei_extras.DecodeBody, tei_extras.decode),
    "/": JsonRoute(tei_extras.RootBody, tei_extras.root),
    "/api/embed": JsonRoute(native.ApiEmbedBody, native.embed, admit=EMBED),
    "/api/embed/batch": JsonRoute(native.ApiEmbedBody, native.embed_batch, admit=EMBED),
    "/api/rerank": JsonRoute(native.ApiRerankBody, native.rerank, admit=RERANK),
    # FastAPI runs this route's dependency; the pipeline runs it as the guard.
    "/api/v1/providers": JsonRoute(
        admin.AddProvider, admin.add_provider, guard=admin.require_admin_change
    ),
    "/api/v1/keys": JsonRoute(keys.CreateKey, keys.create_key, guard=admin.require_admin),
    "/api/v1/keys/rotate": JsonRoute(keys.RotateKey, keys.rotate_key, guard=admin.require_admin),
}
