"""``POST /v1/embeddings/batch``: many OpenAI-style sub-requests in one HTTP call.

Each sub-request goes through the same engine as ``/v1/embeddings`` (so concurrent callers'
texts still share upstream calls); the answer lists one result or one error per ``id``, in
request order, with status 200 unless the batch itself is invalid.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from embedplex.api.bounds import check_count, check_tokens, token_ids
from embedplex.api.common import as_inputs, json_response, unless_disconnected
from embedplex.api.errors import OPENAI_ERROR_RESPONSES, Dialect, spec_for
from embedplex.api.observe import request_record
from embedplex.api.routes.openai import (
    EmbeddingsRequest,
    embed_one,
    embeddings_body,
    routed_service,
)
from embedplex.core.errors import EmbedplexError, InvalidRequestError, PayloadTooLargeError
from embedplex.core.types import EmbeddingService, EmbedResult

router = APIRouter(tags=["OpenAI"], responses=OPENAI_ERROR_RESPONSES)

# Sub-requests of one batch in flight at once, at most, to a model that admits requests against
# its concurrency slots (``max_concurrent_requests``: a local or Ray-served model): a batch of
# 2,048 sent them all at once and took every slot (the rest of its items and every other caller
# got 429 meanwhile). A quarter of that model's slots, and never more than this: its items
# still share inference batches, and the rest wait their turn inside the route, holding nothing.
# Each holds a slot under the caller's key, as any request does (and past three quarters of the
# slots, within the key's fair share: ``batching/admission.py``). Routes to remote providers
# have no slots to take: their items all go at once, so that their texts fill upstream calls (a
# call per 16 texts would multiply the calls a provider bills and limits).
IN_FLIGHT = 16


class BatchItem(EmbeddingsRequest):
    id: str = Field(description="Caller's id, echoed in the result.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[BatchItem] = Field(min_length=1, fail_fast=True)


def _error_entry(item_id: str, exc: EmbedplexError) -> dict[str, object]:
    spec = spec_for(exc)
    error: dict[str, object] = {
        "message": exc.message,
        "type": spec.openai_type,
        "code": spec.openai_code,
        "status": spec.status_for(Dialect.OPENAI),
        "param": exc.param,
    }
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        error["retry_after"] = max(1, round(retry_after))
    return {"id": item_id, "object": "error", "error": error}


def _routed(request: Request, item: BatchItem) -> EmbeddingService | EmbedplexError:
    """The model or route ``item`` names, or why none: that item's error, not the batch's."""
    try:
        return routed_service(request, item)
    except EmbedplexError as exc:
        return exc


def _check_inputs(
    services: list[EmbeddingService | EmbedplexError],
    inputs: list[list[str] | list[list[int]]],
    limit: int,
) -> None:
    """The inputs bound for each model at most its own ``max_client_batch_size``; those bound
    for remote routes (which have none of their own) at most the server's, ``limit``, in all."""
    per: dict[str | None, tuple[int, int]] = {}  # model (None: remote) -> (inputs, its limit)
    for service, each in zip(services, inputs, strict=True):
        if isinstance(service, EmbedplexError):
            continue
        own = service.info.max_client_batch_size
        name = service.info.name if own is not None else None
        n, cap = per.get(name, (0, own or limit))
        per[name] = (n + len(each), cap)
    for name, (n, cap) in per.items():
        if n > cap:
            to = f" to model {name!r}" if name is not None else ""
            raise PayloadTooLargeError(
                f"{n} inputs across the batch{to} > maximum allowed batch size {cap}",
                param="requests",
            )


@router.post("/v1/embeddings/batch")
async def create_batch(body: BatchRequest, request: Request) -> Response:
    ids = [item.id for item in body.requests]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError("request ids must be unique", param="requests")
    settings = request.app.state.settings
    check_count(request, len(body.requests), "requests")
    inputs = [as_inputs(item.input) for item in body.requests]
    services = [_routed(request, item) for item in body.requests]
    _check_inputs(services, inputs, settings.max_client_batch_size)
    check_tokens(request, sum(token_ids(each) for each in inputs), "requests")
    turns: dict[str, asyncio.Semaphore] = {}  # per model with slots: see IN_FLIGHT

    async def in_turn(item: BatchItem, service: EmbeddingService | EmbedplexError) -> EmbedResult:
        if isinstance(service, EmbedplexError):
            raise service  # this item's (gather keeps it)
        if getattr(service, "admit", None) is None:
            return await embed_one(request, item, service)
        info = service.info
        turn = turns.get(info.name)
        if turn is None:
            slots = info.max_concurrent_requests or settings.max_concurrent_requests
            turn = turns[info.name] = asyncio.Semaphore(max(1, min(IN_FLIGHT, slots // 4)))
        async with turn:
            return await embed_one(request, item, service)

    work = asyncio.gather(
        *(in_turn(item, service) for item, service in zip(body.requests, services, strict=True)),
        return_exceptions=True,
    )
    outcomes = await unless_disconnected(request, work)
    results: list[dict[str, object]] = []
    record = request_record(request)  # tokens: what a key's tokens per minute are charged
    for item, outcome in zip(body.requests, outcomes, strict=True):
        if isinstance(outcome, EmbedplexError):
            results.append(_error_entry(item.id, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome  # a server fault, not a per-request error: the 500 handler logs it
        else:
            assert isinstance(outcome, EmbedResult)
            record.tokens += outcome.prompt_tokens
            entry = {"id": item.id, **embeddings_body(outcome, item.encoding_format, routed=True)}
            results.append(entry)
    return json_response({"object": "list", "results": results})
