"""OpenAI dialect: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /v1/models``."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from embedplex.api.common import (
    Inputs,
    as_inputs,
    gateway,
    json_response,
    result_headers,
    run_embed,
)
from embedplex.service import EmbedRequest

router = APIRouter(tags=["OpenAI"])


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Inputs = Field(
        description="A text, a list of texts, a list of token ids, or a list of such lists."
    )
    model: str | None = Field(None, description="Model name; with one model served, any name.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Matryoshka: keep the first N dimensions.")
    user: str | None = None


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


def to_core(body: EmbeddingsRequest) -> EmbedRequest:
    return EmbedRequest(inputs=as_inputs(body.input), normalize=True, dimensions=body.dimensions)


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
@router.post("/embeddings", response_model=EmbeddingsResponse, include_in_schema=False)
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    result = await run_embed(request, body.model, to_core(body))
    if body.encoding_format == "base64":
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode(),
            }
            for i, v in enumerate(result.vectors)
        ]
    else:
        data = [
            {"object": "embedding", "index": i, "embedding": np.asarray(v, dtype=np.float32)}
            for i, v in enumerate(result.vectors)
        ]
    body_out = {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return json_response(body_out, headers=result_headers(result))


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> Response:
    data = [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "embedplex"}
        for m in gateway(request).models
    ]
    return json_response({"object": "list", "data": data})
