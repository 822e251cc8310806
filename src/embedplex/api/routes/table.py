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

JSON_ROUTES: dict[str, JsonRoute] = {
    "/v1/embeddings": JsonRoute(openai.EmbeddingsRequest, openai.create_embeddings),
    "/embeddings": JsonRoute(openai.EmbeddingsRequest, openai.create_embeddings),
    "/embed": JsonRoute(tei.EmbedBody, tei.embed),
    "/api/v1/embed": JsonRoute(tei.NativeEmbedBody, tei.native_embed),
    "/tokenize": JsonRoute(tei.TokenizeBody, tei.tokenize),
    "/rerank": JsonRoute(rerank.TeiRerankBody, rerank.tei_rerank),
    "/v1/rerank": JsonRoute(rerank.RerankBody, rerank.rerank),
    "/v2/rerank": JsonRoute(rerank.RerankBody, rerank.rerank),
    "/v1/embeddings/batch": JsonRoute(batch.BatchRequest, batch.create_batch),
    "/embed_all": JsonRoute(tei_extras.EmbedAllBody, tei_extras.embed_all),
    "/similarity": JsonRoute(tei_extras.SimilarityBody, tei_extras.similarity),
    "/decode": JsonRoute(tei_extras.DecodeBody, tei_extras.decode),
    "/": JsonRoute(tei_extras.RootBody, tei_extras.root),
    "/api/embed": JsonRoute(native.ApiEmbedBody, native.embed),
    "/api/embed/batch": JsonRoute(native.ApiEmbedBody, native.embed_batch),
    "/api/rerank": JsonRoute(native.ApiRerankBody, native.rerank),
    # FastAPI runs this route's dependency; the pipeline runs it as the guard.
    "/api/v1/providers": JsonRoute(
        admin.AddProvider, admin.add_provider, guard=admin.require_admin_change
    ),
    "/api/v1/keys": JsonRoute(keys.CreateKey, keys.create_key, guard=admin.require_admin),
    "/api/v1/keys/rotate": JsonRoute(keys.RotateKey, keys.rotate_key, guard=admin.require_admin),
}
