"""OpenAI dialect: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /v1/models`` and
``GET /v1/models/{id}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import pybase64
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.responses import Response

from embedplex.api.common import (
    Inputs,
    PriorityField,
    as_asked,
    as_inputs,
    gateway,
    json_response,
    result_headers,
    run_embed,
    tenant_of,
)
from embedplex.api.errors import OPENAI_ERROR_RESPONSES
from embedplex.backends.model_files import ModelKind
from embedplex.core.errors import ModelNotFoundError, NotReadyError
from embedplex.core.types import EmbeddingService, EmbedRequest, EmbedResult, ModelInfo, Vector
from embedplex.gateway import Gateway

router = APIRouter(tags=["OpenAI"], responses=OPENAI_ERROR_RESPONSES)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Inputs = Field(
        description="A text, a list of texts, a list of token ids, or a list of such lists."
    )
    model: str | None = Field(None, description="Model name; with one model served, any name.")
    # null is float, as OpenAI takes it (LiteLLM and Dify send an explicit null).
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(
        None, description="Matryoshka: keep the first N dimensions."
    )
    user: str | None = None
    # embedplex extensions (OpenAI SDK: pass them in ``extra_body``).
    # Names are never empty: an empty one is a 422 here, not a route config that fails later.
    provider: str | None = Field(None, min_length=1, description="Route to this remote provider.")
    providers: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="Route to these remote providers, in order."
    )
    policy: Literal["any", "all"] | None = Field(
        None, description="any: first healthy provider, fail over; all: every provider."
    )
    input_type: str | None = Field(
        None, description="Remote providers: query or document (Voyage, Cohere)."
    )
    priority: PriorityField = None
    cache: StrictBool = Field(
        True, description="embedplex extension: false neither reads nor writes the cache."
    )
    # TEI's /v1/embeddings has no such field (it truncates by --auto-truncate alone); here it
    # is what TEI's /embed takes, so a client can ask for OpenAI's own answer to a long input
    # (400) from a server that truncates by default.
    truncate: StrictBool | None = Field(
        None,
        description="embedplex extension: false makes an input over the model's length a 400, "
        "true truncates it (default: the server's --auto-truncate).",
    )

    def routing(self) -> tuple[list[str], str | None]:
        """The providers and policy the caller asked for (empty: the model's own route)."""
        names = list(self.providers or [])
        if self.provider is not None and self.provider not in names:
            names.insert(0, self.provider)
        return names, self.policy

    @property
    def routed(self) -> bool:
        return bool(self.provider or self.providers or self.policy)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


def to_core(body: EmbeddingsRequest, request: Request) -> EmbedRequest:
    extra = {"input_type": body.input_type} if body.input_type is not None else {}
    return EmbedRequest(
        inputs=as_inputs(body.input),
        normalize=True,
        dimensions=body.dimensions,
        extra=extra,
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
        cache=body.cache,
    )


def _data(vectors: list[Vector], encoding_format: str | None) -> list[dict[str, Any]]:
    if encoding_format == "base64":
        return [
            {
                "object": "embedding",
                "index": i,
                "embedding": pybase64.b64encode_as_string(
                    np.ascontiguousarray(v, dtype="<f4").data
                ),
            }
            for i, v in enumerate(vectors)
        ]
    return [
        {"object": "embedding", "index": i, "embedding": np.asarray(v, dtype=np.float32)}
        for i, v in enumerate(vectors)
    ]


def _usage(result: EmbedResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}


def embeddings_body(
    result: EmbedResult, encoding_format: str | None, *, routed: bool
) -> dict[str, Any]:
    """The OpenAI response; with routing fields, also who answered (see docs/router.md).

    ``all``: ``data`` holds the first provider's vectors and ``providers`` maps every provider
    to its own ``{"model", "data", "usage"}``.
    """
    out: dict[str, Any] = {
        "object": "list",
        "data": _data(result.vectors, encoding_format),
        "model": result.model,
        "usage": _usage(result),
    }
    if routed and result.provider is not None:
        out["provider"] = result.provider
    if result.per_provider is not None:
        out["providers"] = {
            name: {
                "model": sub.model,
                "data": _data(sub.vectors, encoding_format),
                "usage": _usage(sub),
            }
            for name, sub in result.per_provider.items()
        }
    return out


def routed_service(request: Request, body: EmbeddingsRequest) -> EmbeddingService:
    """The model, or the ad-hoc provider route, that ``body`` names."""
    providers, policy = body.routing()
    return gateway(request).service(body.model, providers, policy)


async def embed_one(
    request: Request, body: EmbeddingsRequest, service: EmbeddingService | None = None
) -> EmbedResult:
    """Embed one (sub-)request through ``service``, the model or route it names (the batch
    route's way in; ``Cache-Control: no-cache|no-store`` applies to each, as in ``run_embed``)."""
    if service is None:
        service = routed_service(request, body)
    return await service.embed(as_asked(request, to_core(body, request)))


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
@router.post("/embeddings", response_model=EmbeddingsResponse, include_in_schema=False)
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    service, core = routed_service(request, body), to_core(body, request)
    result = await run_embed(request, service, core)
    return json_response(
        embeddings_body(result, body.encoding_format, routed=body.routed),
        raw=result_headers(result, core, service),
    )


def _model_object(info: ModelInfo) -> dict[str, object]:
    # "kind" (embed or rerank) is an extension; OpenAI clients ignore fields they do not know.
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "embedplex",
        "kind": "rerank" if info.kind == ModelKind.RERANKER.value else "embed",
    }


def _started(request: Request) -> Gateway:
    """503 while models load (as the other listings): a client that reads the list once at its
    start would otherwise take an empty list for the server's models."""
    gw = gateway(request)
    if not gw.started:
        raise NotReadyError("no model is loaded yet")
    return gw


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> Response:
    data = [_model_object(m) for m in _started(request).models]
    return json_response({"object": "list", "data": data})


# ``path``: served names may hold a '/' (``sentence-transformers/all-MiniLM-L6-v2``).
@router.get("/v1/models/{model_id:path}")
@router.get("/models/{model_id:path}", include_in_schema=False)
async def retrieve_model(model_id: str, request: Request) -> Response:
    """One served model, as the list gives it; a name not served is a 404 ``model_not_found``
    (no name stands in for another here: the caller asks what is served)."""
    for info in _started(request).models:
        if info.name == model_id:
            return json_response(_model_object(info))
    raise ModelNotFoundError(f"model {model_id!r} is not served here", param="model")
