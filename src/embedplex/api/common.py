"""Helpers shared by the route modules: the gateway handle, JSON responses, disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from functools import partial
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from embedplex.api.bounds import check_tokens, token_ids
from embedplex.api.channel import CHANNEL_KEY, Channel
from embedplex.api.observe import RequestRecord, request_record
from embedplex.api.responses import JsonResponse
from embedplex.core.tenant import ANONYMOUS, Priority, Tenant, lowered
from embedplex.core.types import (
    EmbeddingService,
    EmbedRequest,
    EmbedResult,
    RerankRequest,
    RerankResult,
    RerankService,
    ServedModel,
    TokenEmbedResult,
)
from embedplex.gateway import Gateway

T = TypeVar("T")

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready."""


# Lists in request bodies stop at their first bad item (``fail_fast``): a wrong body is one
# error, not one per item. A 2 MB body of 660,000 wrong items was ~2 million errors (every
# alternative of a union collects its own), 7-10 s of the event loop and ~2.4 GB to build them.
Texts = Annotated[list[str], Field(fail_fast=True)]
# StrictInt: a JSON true is not token id 1 (the documented schema says integer).
TokenIds = Annotated[list[StrictInt], Field(fail_fast=True)]
TokenIdLists = Annotated[list[TokenIds], Field(fail_fast=True)]
Inputs = str | Texts | TokenIds | TokenIdLists


class TeiBody(BaseModel):
    """A TEI route's body: unknown fields are ignored, as TEI's own (serde, no
    ``deny_unknown_fields``) ignore them. Clients send fields meant for other servers: LiteLLM's
    ``huggingface/`` rerank sends ``top_n``, ``huggingface_hub`` ``encoding_format``. An ignored
    field costs its parsing alone, bounded by ``payload_limit`` like the rest of the body; it is
    never kept nor echoed."""

    model_config = ConfigDict(extra="ignore")


def as_inputs(raw: Inputs) -> list[str] | list[list[int]]:
    """One text, one token list, or a list of either, as the list the core takes."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]
    return raw  # type: ignore[return-value]  # a list of texts or of id lists (no cast call)


# A request's own priority (embed and rerank bodies): it may lower its key's, never raise it.
PriorityField = Annotated[
    Priority | None,
    Field(description="embedplex extension: batch lowers this request below its key's priority."),
]


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def admit_embedding(request: Request) -> None:
    """Before the body is read: 429 when every embedding model is at its concurrency cap."""
    gateway(request).admit_kind("embedding", partial(tenant_of, request))


def admit_reranking(request: Request) -> None:
    """Before the body is read: 429 when every reranker is at its concurrency cap."""
    gateway(request).admit_kind("reranker", partial(tenant_of, request))


def tenant_of(request: Request, priority: Priority | None = None) -> Tenant:
    """Who the pipeline authenticated this request as (``api/stages.py``), at the ``priority``
    its body asked for when that is lower than its key's (never higher)."""
    tenant: Tenant = request.scope.get("state", {}).get("tenant", ANONYMOUS)
    return lowered(tenant, priority)


def json_response(
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: list[tuple[bytes, bytes]] | None = None,
    status: int = 200,
) -> Response:
    """``raw``: header lines as ``JsonResponse`` takes them (instead of ``headers``)."""
    return JsonResponse(orjson.dumps(body, option=_JSON_OPTIONS), status, headers, raw=raw)


def characters(core: EmbedRequest | RerankRequest) -> int:
    """What TEI's ``x-compute-characters`` counts: each text's characters (code points, as
    Rust's ``chars().count()``), each token-id input's ids, and for a rerank the query once per
    text (TEI scores each pair whole)."""
    if isinstance(core, RerankRequest):
        return len(core.query) * len(core.texts) + sum(map(len, core.texts))
    return sum(map(len, core.inputs))


def compute_type(device: str) -> bytes | None:
    """TEI's ``x-compute-type`` for a model on ``device`` (TEI itself always says
    ``gpu+optimized``): ``cpu`` or ``gpu``; None for a remote route, where it is not known."""
    if device == "cpu":
        return b"cpu"
    if device.startswith(("cuda", "mps")):
        return b"gpu"
    return None


def result_headers(
    result: EmbedResult | RerankResult | TokenEmbedResult,
    core: EmbedRequest | RerankRequest,
    model: ServedModel,
) -> list[tuple[bytes, bytes]]:
    """The headers TEI sends with an answer (``Timings.headers``) for ``result`` of ``core``
    by ``model``, and who answered when a remote provider did."""
    raw = result.timings.headers(
        tokens=result.prompt_tokens,
        characters=characters(core),
        compute_type=compute_type(model.info.device),
    )
    provider = None if isinstance(result, TokenEmbedResult) else result.provider
    if provider is not None:
        raw.append((b"x-embedplex-provider", provider.encode("latin-1")))
    return raw


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any]) -> bool:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return True


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes first, cancel it (its queued items are dropped).

    ``work`` runs in the caller's own task and one watcher task cancels that task when the
    client disconnects: no second task and no ``asyncio.wait`` per request, which on the hot
    path cost as much as the rest of the route together. Under our own server not even the
    watcher: its connection cancels the task it was given (``api/channel.py``).
    """
    task = asyncio.current_task()
    if task is None:  # not in a task (cannot happen under an ASGI server): nothing to cancel
        return await work
    channel: Channel | None = request.scope.get(CHANNEL_KEY)
    if channel is not None:  # our server cancels the task itself when the client leaves
        if channel.gone:
            close = getattr(work, "close", None)  # a coroutine never awaited: no warning
            if close is not None:
                close()
            raise ClientGoneError
        channel.watch(task)
        try:
            return await work
        except asyncio.CancelledError:
            if channel.cancelled_watched():
                task.uncancel()
                raise ClientGoneError from None
            raise
        finally:
            channel.watch(None)
    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(request, task))
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            task.uncancel()
            raise ClientGoneError from None
        raise
    finally:
        watcher.cancel()


def as_asked(request: Request, core: EmbedRequest) -> EmbedRequest:
    """``core`` with the cache off where the request says ``Cache-Control: no-cache|no-store``
    (``run_embed``, and each sub-request of the batch route)."""
    if core.cache and no_cache(request.scope):
        return dataclasses.replace(core, cache=False)
    return core


def no_cache(scope: Scope) -> bool:
    """``Cache-Control: no-cache`` or ``no-store`` on the request: the standard way to ask for
    a fresh answer (``docs/cache.md``); read from the raw headers (no Headers object)."""
    for name, value in scope["headers"]:
        if name == b"cache-control":
            directives = value.lower()
            if b"no-cache" in directives or b"no-store" in directives:
                return True
    return False


def noted(request: Request, model: ServedModel, inputs: int) -> RequestRecord:
    """This request's record (``api/observe.py``) with the model it is for and its inputs,
    noted before any check that may refuse it: a refusal, or an empty answer, is counted and
    logged under that model, not ``-``."""
    record = request_record(request)
    record.model = model.info.name
    record.inputs = inputs
    return record


async def run_embed(request: Request, model: EmbeddingService, core: EmbedRequest) -> EmbedResult:
    """Embed with ``model``, noting model, inputs, tokens and timings for observability."""
    record = noted(request, model, len(core.inputs))
    check_tokens(request, token_ids(core.inputs), "input")
    core = as_asked(request, core)
    admit = getattr(model, "admit", None)  # local models: refuse before any per-request work
    if admit is not None:
        admit(core.tenant)
    result = await unless_disconnected(request, model.embed(core))
    record.tokens = result.prompt_tokens
    record.timings = result.timings
    return result


async def run_rerank(request: Request, model: RerankService, core: RerankRequest) -> RerankResult:
    """Rerank with ``model``, noting model, texts, tokens (what a key's tokens per minute are
    charged: ``docs/limits.md``) and timings as ``run_embed`` does."""
    record = noted(request, model, len(core.texts))
    admit = getattr(model, "admit", None)
    if admit is not None:
        admit(core.tenant)
    result = await unless_disconnected(request, model.rerank(core))
    record.tokens = result.prompt_tokens
    record.timings = result.timings
    return result
