"""Reranking: TEI ``POST /rerank`` and Cohere/Jina-style ``POST /v1/rerank`` (and ``/v2/rerank``).

Both run the same reranker (a local cross-encoder, or a remote route's providers) through the
batching engine; only the shapes differ. Results are sorted by score, best first, and carry each
text's index in the request. A remote answer carries ``x-embedplex-provider``; with the ``all``
policy the ``/v1/rerank`` body also has ``providers``: each provider's own ranked results.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.responses import Response

from embedplex.api.common import (
    PriorityField,
    Texts,
    gateway,
    json_response,
    result_headers,
    run_rerank,
    tenant_of,
)
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.types import RerankRequest, RerankResult

router = APIRouter(tags=["rerank"], responses=TEI_ERROR_RESPONSES)


class TeiRerankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    texts: Texts
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    raw_scores: StrictBool = Field(False, description="Raw logits instead of sigmoid scores.")
    return_text: StrictBool = False
    model: str | None = Field(None, description="embedplex extension: pick a served reranker.")
    priority: PriorityField = None


class Document(BaseModel):
    text: str


class RerankBody(BaseModel):
    """Cohere (v1/v2) and Jina rerank requests."""

    model_config = ConfigDict(extra="ignore")

    query: str
    documents: list[str | Document] = Field(fail_fast=True)
    model: str | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    return_documents: StrictBool | None = None
    truncate: StrictBool | None = None
    priority: PriorityField = None


def _ranked(result: RerankResult) -> list[tuple[int, float]]:
    return sorted(enumerate(result.scores), key=lambda pair: pair[1], reverse=True)


async def _rerank(request: Request, model_name: str | None, core: RerankRequest) -> RerankResult:
    return await run_rerank(request, gateway(request).reranker(model_name), core)


@router.post("/rerank")
async def tei_rerank(body: TeiRerankBody, request: Request) -> Response:
    core = RerankRequest(
        query=body.query,
        texts=body.texts,
        truncate=body.truncate,
        truncation_direction=TruncationDirection(body.truncation_direction.lower()),
        raw_scores=body.raw_scores,
        tenant=tenant_of(request, body.priority),
    )
    result = await _rerank(request, body.model, core)
    out = [
        {"index": i, "score": score, **({"text": body.texts[i]} if body.return_text else {})}
        for i, score in _ranked(result)
    ]
    return json_response(out, raw=result_headers(result))


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankBody, request: Request) -> Response:
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    core = RerankRequest(
        query=body.query,
        texts=texts,
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
    )
    result = await _rerank(request, body.model, core)
    # Jina and Cohere v1 return documents unless told not to; Cohere v2 only when asked.
    with_docs = body.return_documents
    if with_docs is None:
        with_docs = not request.url.path.startswith("/v2")

    def results(of: RerankResult) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "relevance_score": score,
                **({"document": {"text": texts[i]}} if with_docs else {}),
            }
            for i, score in _ranked(of)[: body.top_n]
        ]

    out: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": result.model,
        "results": results(result),
        "usage": {"total_tokens": result.prompt_tokens},
        "meta": {"billed_units": {"search_units": 1}},
    }
    if result.per_provider is not None:
        out["providers"] = {
            name: {"model": sub.model, "results": results(sub)}
            for name, sub in result.per_provider.items()
        }
    return json_response(out, raw=result_headers(result))
