"""The FastEmbed-style API of the local embedding/reranking server embedplex grew from:
``/api/embed``, ``/api/embed/batch``, ``/api/embedders``, ``/api/rerankers``, ``/api/rerank``.

Shapes follow that server: its README sends ``{"input": [...], "model"}`` and its code
``{"text"}`` (single) or ``{"texts"}`` (batch), so both routes take any one of the three.
Answers are ``{"embeddings", "model", "count", "dimensions"}`` and ``{"results": [{"index",
"id"?, "text", "score"?}], "model"}``; an empty list is a 200 with nothing in it, as there.
Errors use the TEI shape and embedplex's status table (docs/api.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from starlette.responses import Response

from embedplex.api.common import (
    PriorityField,
    Texts,
    gateway,
    json_response,
    noted,
    result_headers,
    run_embed,
    run_rerank,
    tenant_of,
)
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.core.errors import NotReadyError
from embedplex.core.types import EmbedRequest, ModelInfo, RerankRequest

router = APIRouter(tags=["native"], responses=TEI_ERROR_RESPONSES)


class ApiEmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | Texts | None = Field(None, description="A text or a list of texts.")
    text: str | None = Field(None, description="One text (the same as input).")
    texts: Texts | None = Field(None, description="A list of texts (the same as input).")
    model: str | None = Field(None, description="Served model name; with one served, any name.")
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    priority: PriorityField = None
    cache: StrictBool = Field(
        True, description="embedplex extension: false neither reads nor writes the cache."
    )

    @model_validator(mode="after")
    def _one_input(self) -> ApiEmbedBody:
        given = [f for f in ("input", "text", "texts") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of input, text or texts (got {given or 'none'})")
        return self

    def inputs(self) -> list[str]:
        raw = self.input if self.input is not None else self.text
        if raw is None:
            raw = self.texts or []
        return [raw] if isinstance(raw, str) else raw


class ApiDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    id: str | None = Field(None, description="Caller's id, echoed in the result.")


class ApiRerankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    documents: list[str | ApiDocument] = Field(fail_fast=True)
    model: str | None = None
    top_n: StrictInt | None = Field(
        None, ge=1, description="Return only the best N (default: all)."
    )
    top_k: StrictInt | None = Field(None, ge=1, description="The same as top_n (older clients).")
    return_scores: StrictBool = True
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    priority: PriorityField = None


async def _embed(body: ApiEmbedBody, request: Request) -> Response:
    model = gateway(request).model(body.model)
    texts = body.inputs()
    noted(request, model, len(texts))  # an empty list is counted and logged under it too
    if not texts:
        return json_response(
            {"embeddings": [], "model": model.info.name, "count": 0, "dimensions": 0}
        )
    core = EmbedRequest(
        inputs=texts,
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
        cache=body.cache,
    )
    result = await run_embed(request, model, core)
    return json_response(
        {
            "embeddings": result.vectors,
            "model": result.model,
            "count": len(result.vectors),
            "dimensions": int(result.vectors[0].shape[0]),
        },
        raw=result_headers(result, core, model),
    )


@router.post("/api/embed")
async def embed(body: ApiEmbedBody, request: Request) -> Response:
    """Embed a text or a list of texts (normalized vectors)."""
    return await _embed(body, request)


@router.post("/api/embed/batch")
async def embed_batch(body: ApiEmbedBody, request: Request) -> Response:
    """The same as ``/api/embed``; kept as its own route for clients that call it."""
    return await _embed(body, request)


def _listing(request: Request, kind: str) -> list[dict[str, object]]:
    gw = gateway(request)
    if not gw.started:
        raise NotReadyError("no model is loaded yet")

    def entry(info: ModelInfo) -> dict[str, object]:
        out: dict[str, object] = {
            "id": info.name,
            "name": info.name,
            "description": f"{info.model_id} ({info.backend}, {info.dtype})",
            "model_type": kind,
        }
        if kind == "embedding":
            out["dimensions"] = info.dim or None  # a remote route: width unknown (docs/api.md)
        return out

    return [entry(m) for m in sorted(gw.models, key=lambda m: m.name) if m.kind == kind]


@router.get("/api/embedders")
async def embedders(request: Request) -> Response:
    """The served embedding models."""
    return json_response(_listing(request, "embedding"))


@router.get("/api/rerankers")
async def rerankers(request: Request) -> Response:
    """The served rerankers."""
    return json_response(_listing(request, "reranker"))


@router.post("/api/rerank")
async def rerank(body: ApiRerankBody, request: Request) -> Response:
    """Documents sorted by relevance to the query, best first (sigmoid scores in [0, 1])."""
    model = gateway(request).reranker(body.model)
    docs = [ApiDocument(text=d) if isinstance(d, str) else d for d in body.documents]
    noted(request, model, len(docs))  # an empty list is counted and logged under it too
    if not docs:
        return json_response({"results": [], "model": model.info.name})
    core = RerankRequest(
        query=body.query,
        texts=[d.text for d in docs],
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
    )
    result = await run_rerank(request, model, core)
    ranked = sorted(enumerate(result.scores), key=lambda pair: pair[1], reverse=True)
    top = body.top_n if body.top_n is not None else body.top_k
    results = []
    for index, score in ranked[:top]:
        entry: dict[str, object] = {"index": index}
        if docs[index].id is not None:
            entry["id"] = docs[index].id
        entry["text"] = docs[index].text
        if body.return_scores:
            entry["score"] = score
        results.append(entry)
    return json_response(
        {"results": results, "model": result.model}, raw=result_headers(result, core, model)
    )
