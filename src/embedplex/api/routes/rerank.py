"""Reranking: TEI ``POST /rerank`` and Cohere/Jina-style ``POST /v1/rerank`` (and ``/v2/rerank``).

Both run the same reranker (a local cross-encoder, or a remote route's providers) through the
batching engine; only the shapes differ. Results are sorted by score, best first, and carry each
text's index in the request. A remote answer carries ``x-embedplex-provider``; with the ``all``
policy the ``/v1/rerank`` body also has ``providers``: each provider's own ranked results.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag
from starlette.responses import Response

from embedplex.api.bounds import check_count
from embedplex.api.common import (
    PriorityField,
    TeiBody,
    Texts,
    gateway,
    json_response,
    noted,
    result_headers,
    run_rerank,
    tenant_of,
)
from embedplex.api.errors import TEI_ERROR_RESPONSES
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.errors import EmptyInputError, InvalidRequestError
from embedplex.core.types import RerankRequest, RerankResult

router = APIRouter(tags=["rerank"], responses=TEI_ERROR_RESPONSES)


class TeiRerankBody(TeiBody):
    query: str
    texts: Texts
    truncate: StrictBool | None = Field(None, description="Default: the server's --auto-truncate.")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    raw_scores: StrictBool = Field(False, description="Raw logits instead of sigmoid scores.")
    return_text: StrictBool = False
    model: str | None = Field(None, description="embedplex extension: pick a served reranker.")
    priority: PriorityField = None


# Fields of one object document, and names in rank_fields, at most: Cohere's documents carry a
# few (title, text, author...). Each is a string, so a document's ranked text is never more than
# its own fields, and with rank_fields taken once each, never more than the body holds.
MAX_DOCUMENT_FIELDS = 64

# A Cohere v1 document object: string fields only, as Cohere's ``RerankDocument`` has them.
DocumentObject = Annotated[dict[str, str], Field(max_length=MAX_DOCUMENT_FIELDS)]
# A text or an object, told apart by the JSON type: a wrong object is refused for what is wrong
# in it, not also for not being a string.
RerankDocument = Annotated[
    Annotated[str, Tag("string")] | Annotated[DocumentObject, Tag("object")],
    Discriminator(lambda doc: "object" if isinstance(doc, dict) else "string"),
]


class RerankBody(BaseModel):
    """Cohere (v1/v2) and Jina rerank requests."""

    model_config = ConfigDict(extra="ignore")

    query: str
    documents: list[RerankDocument] = Field(
        fail_fast=True,
        description='Texts, or objects of string fields (Cohere v1): ranked on "text", or on '
        "rank_fields; returned whole.",
    )
    model: str | None = None
    top_n: StrictInt | None = Field(None, ge=1)
    rank_fields: list[str] | None = Field(
        None,
        max_length=MAX_DOCUMENT_FIELDS,
        description='Cohere v1: the object fields ranked on, in order, as "name: value" lines '
        '(default: "text").',
    )
    return_documents: StrictBool | None = None
    truncate: StrictBool | None = None
    priority: PriorityField = None


def _document_texts(body: RerankBody) -> list[str]:
    """The text each document is ranked on, as Cohere v1 makes it: a string as it is; an
    object's ``text``, or with ``rank_fields`` its fields named there (each once, in that order,
    those it has) as ``name: value`` lines."""
    fields = list(dict.fromkeys(body.rank_fields)) if body.rank_fields else None
    texts = []
    for i, doc in enumerate(body.documents):
        if isinstance(doc, str):
            texts.append(doc)
        elif fields is None:
            if "text" not in doc:
                raise InvalidRequestError(
                    f'documents.{i}: an object document needs a "text" field, or rank_fields '
                    "naming the fields to rank on",
                    param="documents",
                )
            texts.append(doc["text"])
        else:
            lines = [f"{name}: {doc[name]}" for name in fields if name in doc]
            if not lines:
                raise InvalidRequestError(
                    f"documents.{i} has none of the rank_fields ({', '.join(fields)})",
                    param="documents",
                )
            texts.append("\n".join(lines))
    return texts


def _echoed(doc: str | dict[str, str]) -> dict[str, str]:
    """A document as a result returns it: an object whole (Cohere v1), a text as ``{"text"}``."""
    return {"text": doc} if isinstance(doc, str) else doc


def _ranked(result: RerankResult) -> list[tuple[int, float]]:
    return sorted(enumerate(result.scores), key=lambda pair: pair[1], reverse=True)


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
    model = gateway(request).reranker(body.model)
    result = await run_rerank(request, model, core)
    out = [
        {"index": i, "score": score, **({"text": body.texts[i]} if body.return_text else {})}
        for i, score in _ranked(result)
    ]
    return json_response(out, raw=result_headers(result, core, model))


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankBody, request: Request) -> Response:
    model = gateway(request).reranker(body.model)
    noted(request, model, len(body.documents))  # a refusal below is under the model too
    if not body.documents:  # refused under this API's name for them (the model says "texts")
        raise EmptyInputError("documents cannot be empty", param="documents")
    # Before any document is made into text: at most as many as the reranker takes (422).
    check_count(request, len(body.documents), "documents", model.info.max_client_batch_size)
    texts = _document_texts(body)
    core = RerankRequest(
        query=body.query,
        texts=texts,
        truncate=body.truncate,
        tenant=tenant_of(request, body.priority),
    )
    result = await run_rerank(request, model, core)
    # Jina and Cohere v1 return documents unless told not to; Cohere v2 only when asked.
    with_docs = body.return_documents
    if with_docs is None:
        with_docs = not request.url.path.startswith("/v2")

    def results(of: RerankResult) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "relevance_score": score,
                **({"document": _echoed(body.documents[i])} if with_docs else {}),
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
    return json_response(out, raw=result_headers(result, core, model))
