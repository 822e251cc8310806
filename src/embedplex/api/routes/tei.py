"""TEI dialect (``/embed``, ``/tokenize``, ``/info``, ``/health``) and native ``/api/v1/embed``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt
from starlette.responses import Response

from embedplex import __version__
from embedplex.api.bounds import check_count, check_tokens
from embedplex.api.common import (
    Inputs,
    PriorityField,
    TeiBody,
    Texts,
    as_inputs,
    gateway,
    json_response,
    result_headers,
    run_embed,
    tenant_of,
)
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.api.responses import JsonResponse
from embedplex.backends.tokenizer import Token, TruncationDirection
from embedplex.core.cores import tokenizer_threads
from embedplex.core.errors import NotReadyError
from embedplex.core.types import EmbedRequest, Tokenizing, no_tokenizer

router = APIRouter(tags=["TEI"], responses=TEI_ERROR_RESPONSES)


class EmbedBody(TeiBody):
    inputs: Inputs
    normalize: StrictBool = True
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None
    dimensions: StrictInt | None = None
    model: str | None = Field(None, description="embedplex extension: pick a served model.")
    priority: PriorityField = None
    cache: StrictBool = Field(
        True, description="embedplex extension: false neither reads nor writes the cache."
    )


class NativeEmbedBody(TeiBody):
    inputs: Inputs
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    model: str | None = None
    priority: PriorityField = None
    cache: StrictBool = Field(
        True, description="embedplex extension: false neither reads nor writes the cache."
    )


class TokenizeBody(TeiBody):
    inputs: str | Texts
    add_special_tokens: StrictBool = True
    prompt_name: str | None = None
    model: str | None = None


@router.post("/embed", response_model=list[list[float]])
async def embed(body: EmbedBody, request: Request) -> Response:
    core = EmbedRequest(
        inputs=as_inputs(body.inputs),
        normalize=body.normalize,
        truncate=body.truncate,
        truncation_direction=TruncationDirection(body.truncation_direction.lower()),
        prompt_name=body.prompt_name,
        dimensions=body.dimensions,
        tenant=tenant_of(request, body.priority),
        cache=body.cache,
    )
    model = gateway(request).model(body.model)
    result = await run_embed(request, model, core)
    return json_response(np.stack(result.vectors), raw=result_headers(result, core, model))


@router.post("/api/v1/embed", tags=["native"])
async def native_embed(body: NativeEmbedBody, request: Request) -> Response:
    core = EmbedRequest(
        inputs=as_inputs(body.inputs),
        normalize=body.normalize,
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
        cache=body.cache,
    )
    model = gateway(request).model(body.model)
    result = await run_embed(request, model, core)
    return json_response(
        {"body": np.stack(result.vectors)}, raw=result_headers(result, core, model)
    )


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request) -> Response:
    model = gateway(request).model(body.model)
    if not isinstance(model, Tokenizing):
        raise no_tokenizer(model.info.name)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_count(request, len(texts), "inputs", model.info.max_client_batch_size)
    tokens = await model.tokenize(
        texts, add_special_tokens=body.add_special_tokens, prompt_name=body.prompt_name
    )
    # The answer is some 60 bytes a token: bounded, though only known once tokenized (a local
    # model refuses it as it tokenizes, TextTokenizer.tokens; this checks any other).
    count = sum(len(row) for row in tokens)
    check_tokens(request, count, "inputs")
    if count <= TOKENS_ON_LOOP:
        return JsonResponse(_token_rows(tokens))
    # The largest answer (max_request_tokens, ~16 MB) took ~140 ms of Python and JSON: on the
    # event loop, a stall for every other request; in a thread, the loop takes the GIL back
    # every switch interval (GIL_SWITCH_INTERVAL_S) and each row's JSON holds it for one row.
    return JsonResponse(await asyncio.to_thread(_token_rows, tokens))


# Tokens whose answer is built on the event loop (about 1 ms of work); more go to a thread.
TOKENS_ON_LOOP = 2048


def _token_rows(tokens: Sequence[Sequence[Token]]) -> bytes:
    """TEI's /tokenize answer: per input, its tokens' id, text, special, start and stop."""
    return b"[%b]" % b",".join(
        orjson.dumps(
            [
                {"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop}
                for t in row
            ]
        )
        for row in tokens
    )


@router.get("/info")
async def info(request: Request, model: str | None = None) -> Response:
    """TEI's model description, for the model named by ``?model=`` (default: the first
    served), with that model's own limits in force (admission limits: the server's for a
    remote route, which has no batch budget of its own)."""
    settings = request.app.state.settings
    m = gateway(request).get(model).info

    def own(value: object, default: object) -> object:
        return default if value is None else value

    # TEI's ModelType: a reranker's labels (transformers' own for one label where unknown: a
    # remote route, a lazy model not loaded yet), an embedding model's pooling by TEI's name.
    if m.kind == "reranker":
        model_type: dict[str, object] = {
            "reranker": {
                "id2label": m.id2label or {"0": "LABEL_0"},
                "label2id": m.label2id or {"LABEL_0": 0},
            }
        }
    else:
        model_type = {"embedding": {"pooling": m.pooling.replace("-", "_")}}
    # A reranker answers scores, not vectors: it has no width to give (TEI's Info has no
    # dimensions at all, and /api/rerankers leaves it out too).
    width = {} if m.kind == "reranker" else {"dimensions": m.dim}
    return json_response(
        {
            "model_id": m.model_id,
            "model_sha": m.sha,
            "model_dtype": m.dtype,
            "model_type": model_type,
            "max_concurrent_requests": own(
                m.max_concurrent_requests, settings.max_concurrent_requests
            ),
            "max_input_length": m.max_input_length,
            "max_batch_tokens": m.max_batch_tokens,  # the budget in force (None: remote)
            "max_batch_requests": m.max_batch_requests,
            "max_client_batch_size": own(m.max_client_batch_size, settings.max_client_batch_size),
            "auto_truncate": own(m.auto_truncate, settings.auto_truncate),
            # An integer, as TEI's Info has it: the threads a local model tokenizes with.
            "tokenization_workers": tokenizer_threads(settings.tokenization_workers),
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "backend": m.backend,
            "device": m.device,
            **width,
            "served_model_name": m.name,
            "prompts": m.prompts,
        }
    )


@router.get("/health", response_class=Response)  # an empty 200, as TEI answers
async def health(request: Request) -> Response:
    ok, reason = gateway(request).ready()
    if not ok:
        raise NotReadyError(f"not ready: {reason}")
    return Response(status_code=200)
