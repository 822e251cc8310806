"""TEI's other embedding routes (``/embed_all``, ``/similarity``, ``/decode``) and ``POST /``.

``POST /`` is what ``huggingface_hub``'s ``InferenceClient`` calls when it is pointed at a base
URL: ``feature_extraction`` posts TEI's embed body and ``sentence_similarity`` posts
``{"inputs": {"source_sentence", "sentences"}, "parameters"}``. TEI picks one meaning for ``/``
from its model; here the body says which it is (embed, similarity, or a TEI rerank body).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, RootModel, StrictBool, ValidationError
from starlette.responses import Response

from embedplex.api.bounds import check_count, check_tokens, token_ids
from embedplex.api.common import (
    Inputs,
    TeiBody,
    Texts,
    TokenIdLists,
    TokenIds,
    as_inputs,
    gateway,
    json_response,
    noted,
    result_headers,
    run_embed,
    tenant_of,
    unless_disconnected,
)
from embedplex.api.errors import TEI_ERROR_RESPONSES, invalid_body
from embedplex.api.routes import rerank, tei
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.errors import EmptyInputError
from embedplex.core.types import (
    Decoding,
    EmbedRequest,
    TokenEmbedding,
    no_token_embeddings,
    no_tokenizer,
)

router = APIRouter(tags=["TEI"], responses=TEI_ERROR_RESPONSES)

Direction = Literal["Left", "Right", "left", "right"]


class EmbedAllBody(TeiBody):
    inputs: Inputs
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    model: str | None = Field(None, description="embedplex extension: pick a served model.")


class SimilarityInput(TeiBody):
    source_sentence: str
    sentences: Texts


class SimilarityParameters(TeiBody):
    truncate: StrictBool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None


class SimilarityBody(TeiBody):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None
    model: str | None = Field(None, description="embedplex extension: pick a served model.")
    cache: StrictBool = Field(
        True, description="embedplex extension: false neither reads nor writes the cache."
    )


class DecodeBody(TeiBody):
    ids: TokenIds | TokenIdLists
    skip_special_tokens: StrictBool = True
    model: str | None = Field(None, description="embedplex extension: pick a served model.")


def _direction(value: str) -> TruncationDirection:
    return TruncationDirection(value.lower())


@router.post("/embed_all", response_model=list[list[list[float]]])
async def embed_all(body: EmbedAllBody, request: Request) -> Response:
    """Every token's vector, special tokens included, unpooled and not normalized."""
    model = gateway(request).model(body.model)
    if not isinstance(model, TokenEmbedding):
        raise no_token_embeddings(model.info.name)
    core = EmbedRequest(
        inputs=as_inputs(body.inputs),
        normalize=False,
        truncate=body.truncate,
        truncation_direction=_direction(body.truncation_direction),
        prompt_name=body.prompt_name,
        tenant=tenant_of(request),
    )
    record = noted(request, model, len(core.inputs))
    check_tokens(request, token_ids(core.inputs), "inputs")
    result = await unless_disconnected(request, model.embed_all(core))
    record.tokens = result.prompt_tokens
    record.timings = result.timings
    return json_response(result.vectors, raw=result_headers(result, core, model))


@router.post("/similarity", response_model=list[float])
async def similarity(body: SimilarityBody, request: Request) -> Response:
    """Cosine similarity of ``source_sentence`` with each of ``sentences``, in their order."""
    model = gateway(request).model(body.model)
    noted(request, model, 1 + len(body.inputs.sentences))  # a refusal is under the model too
    if not body.inputs.sentences:
        raise EmptyInputError("inputs.sentences cannot be empty", param="inputs.sentences")
    params = body.parameters or SimilarityParameters()
    core = EmbedRequest(
        inputs=[body.inputs.source_sentence, *body.inputs.sentences],
        normalize=True,
        truncate=params.truncate,
        truncation_direction=_direction(params.truncation_direction),
        prompt_name=params.prompt_name,
        tenant=tenant_of(request),
        cache=body.cache,
    )
    result = await run_embed(request, model, core)
    vectors = np.stack(result.vectors).astype(np.float64)
    # Local vectors are unit length already; a remote provider's need not be.
    vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    scores = vectors[1:] @ vectors[0]
    return json_response([float(s) for s in scores], raw=result_headers(result, core, model))


@router.post("/decode", response_model=list[str])
async def decode(body: DecodeBody, request: Request) -> Response:
    """Token ids (one list, or a list of lists) back to text, one string per list."""
    model = gateway(request).model(body.model)
    if not isinstance(model, Decoding):
        raise no_tokenizer(model.info.name)
    ids = body.ids
    if not ids:
        raise EmptyInputError("ids cannot be empty", param="ids")
    sequences: list[list[int]] = [ids] if isinstance(ids[0], int) else ids
    check_count(request, len(sequences), "ids", model.info.max_client_batch_size)
    check_tokens(request, token_ids(sequences), "ids")
    texts = await model.decode(sequences, skip_special_tokens=body.skip_special_tokens)
    return json_response(texts)


def _parse(schema: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        # Reported like any other body error.
        raise invalid_body(exc.errors(include_url=False)) from None


class RootBody(RootModel[dict[str, Any]]):
    """Any JSON object: the root route reads its fields to decide what it is."""


@router.post("/")
async def root(body: RootBody, request: Request) -> Response:
    """TEI's predict root for ``InferenceClient``: a similarity body (``inputs`` is an object)
    gets ``/similarity``, a rerank body (``query``) gets ``/rerank``, anything else ``/embed``."""
    data = body.root
    if isinstance(data.get("inputs"), dict):
        return await similarity(_parse(SimilarityBody, data), request)
    if "query" in data:
        return await rerank.tei_rerank(_parse(rerank.TeiRerankBody, data), request)
    return await tei.embed(_parse(tei.EmbedBody, data), request)
