"""Errors to HTTP: the one table, and the two body shapes (TEI and OpenAI).

TEI and native routes answer ``{"error": str, "error_type": str}`` with TEI's error types;
OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``, and a request OpenAI
would call invalid (a wrong value, an input over the context length, too many inputs) is the
400 it answers, not TEI's 422: the ``openai`` SDK raises ``BadRequestError`` for a 400
alone (a 422 is its ``UnprocessableEntityError``), and callers catch that.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.responses import Response

from embedplex.api.responses import JsonResponse
from embedplex.core import errors as e

logger = logging.getLogger(__name__)


class Dialect(Enum):
    TEI = "tei"
    OPENAI = "openai"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    tei_type: str
    openai_type: str
    openai_code: str
    # The status on OpenAI routes where it is not ``status`` (OpenAI answers 400 for them).
    openai_status: int | None = None

    def status_for(self, dialect: Dialect) -> int:
        if dialect is Dialect.OPENAI and self.openai_status is not None:
            return self.openai_status
        return self.status


class _RouteNotFound(e.ClientError):
    kind = "not_found"


class _MethodNotAllowed(e.ClientError):
    kind = "method_not_allowed"


# Most specific class first: the first isinstance match wins.
# ``openai_status``: 400 on the OpenAI routes for what OpenAI calls an invalid request. A body
# over ``payload_limit`` stays 413 everywhere (refused before it is parsed).
ERROR_TABLE: list[tuple[type[e.EmbedplexError], ErrorSpec]] = [
    (e.EmptyInputError, ErrorSpec(400, "Empty", "invalid_request_error", "empty_input")),
    (
        e.BodyTooLargeError,
        ErrorSpec(413, "Validation", "invalid_request_error", "payload_too_large"),
    ),
    (
        # TEI answers 422 for every Validation error since 1.9 (batch size over
        # max_client_batch_size included; 413 before): the TEI routes follow it.
        e.PayloadTooLargeError,
        ErrorSpec(
            422, "Validation", "invalid_request_error", "payload_too_large", openai_status=400
        ),
    ),
    (
        e.UnsupportedEncodingError,
        ErrorSpec(415, "Validation", "invalid_request_error", "unsupported_media_type"),
    ),
    (
        e.HeadersTooLargeError,
        ErrorSpec(431, "Validation", "invalid_request_error", "headers_too_large"),
    ),
    (e.RequestTimeoutError, ErrorSpec(408, "Validation", "invalid_request_error", "timeout")),
    (
        e.InputTooLongError,
        ErrorSpec(
            422, "Validation", "invalid_request_error", "context_length_exceeded", openai_status=400
        ),
    ),
    (
        e.InvalidRequestError,
        ErrorSpec(422, "Validation", "invalid_request_error", "invalid_value", openai_status=400),
    ),
    (
        e.ModelNotFoundError,
        ErrorSpec(404, "Validation", "invalid_request_error", "model_not_found"),
    ),
    (_RouteNotFound, ErrorSpec(404, "Validation", "invalid_request_error", "not_found")),
    (
        _MethodNotAllowed,
        ErrorSpec(405, "Validation", "invalid_request_error", "method_not_allowed"),
    ),
    (
        e.AuthenticationError,
        ErrorSpec(401, "Unauthorized", "invalid_request_error", "invalid_api_key"),
    ),
    (
        e.ModelNotAllowedError,
        ErrorSpec(403, "Forbidden", "invalid_request_error", "model_not_allowed"),
    ),
    (e.ForbiddenError, ErrorSpec(403, "Forbidden", "invalid_request_error", "forbidden")),
    (
        e.ClientError,
        ErrorSpec(422, "Validation", "invalid_request_error", "invalid_request", openai_status=400),
    ),
    (e.RateLimitedError, ErrorSpec(429, "Overloaded", "rate_limit_error", "rate_limit_exceeded")),
    (e.OverloadedError, ErrorSpec(429, "Overloaded", "rate_limit_error", "overloaded")),
    (e.QueueTimeoutError, ErrorSpec(503, "Overloaded", "server_error", "queue_timeout")),
    (e.UnavailableError, ErrorSpec(503, "Unhealthy", "server_error", "service_unavailable")),
    (e.UpstreamTimeoutError, ErrorSpec(504, "Backend", "server_error", "upstream_timeout")),
    (e.UpstreamError, ErrorSpec(502, "Backend", "server_error", "upstream_error")),
    (e.BackendError, ErrorSpec(424, "Backend", "server_error", "backend_error")),
    (e.EmbedplexError, ErrorSpec(500, "Backend", "server_error", "internal_error")),
]

_OPENAI_PREFIXES = ("/v1/embeddings", "/embeddings", "/v1/models", "/models")


def dialect_for(path: str) -> Dialect:
    return Dialect.OPENAI if path.startswith(_OPENAI_PREFIXES) else Dialect.TEI


def spec_for(exc: e.EmbedplexError) -> ErrorSpec:
    for cls, spec in ERROR_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, e.InvalidRequestError) and exc.malformed:
                return ErrorSpec(400, spec.tei_type, spec.openai_type, exc.code)
            return spec
    raise AssertionError("EmbedplexError is the last row")  # pragma: no cover


def error_response(
    exc: e.EmbedplexError, path: str, headers: dict[str, str] | None = None
) -> Response:
    spec = spec_for(exc)
    dialect = dialect_for(path)
    body: object
    if dialect is Dialect.OPENAI:
        body = {
            "error": {
                "message": exc.message,
                "type": spec.openai_type,
                "param": exc.param,
                "code": spec.openai_code,
            }
        }
    else:
        body = {"error": exc.message, "error_type": spec.tei_type}
    out = dict(headers or {})
    retry_after = getattr(exc, "retry_after", None)  # a 429, or a 503 that knows when
    if retry_after is not None:
        out["retry-after"] = str(max(1, math.ceil(min(86400.0, retry_after))))  # <= a day
    return JsonResponse(orjson.dumps(body), spec.status_for(dialect), out)


def status_error(status: int, message: str) -> e.EmbedplexError:
    """Turn a framework status (404 route, 405 method, 400 body) into our tree."""
    if status == 413:
        return e.BodyTooLargeError(message)
    if status == 404:
        return _RouteNotFound(message)
    if status == 405:
        return _MethodNotAllowed(message)
    if status == 401:
        return e.AuthenticationError(message)
    if status == 403:
        return e.ForbiddenError(message)
    if 400 <= status < 500:
        return e.InvalidRequestError(message, malformed=status == 400)
    return e.EmbedplexError(message)


def invalid_body(errors: Sequence[Mapping[str, object]]) -> e.InvalidRequestError:
    """A schema's validation errors as one error: 400 when the bytes are not JSON, else 422.

    JSON that is not valid UTF-8, or that escapes a lone surrogate (``"\\ud800"``, which no
    UTF-8 text can hold), is not JSON to the parser: 400 on every route alike.
    """
    first = errors[0] if errors else {}
    if any(err.get("type") == "json_invalid" for err in errors):
        ctx = first.get("ctx")
        reason = ctx.get("error", "decode error") if isinstance(ctx, Mapping) else "decode error"
        return e.InvalidRequestError(f"invalid JSON body: {reason}", malformed=True)
    loc = first.get("loc", ())
    where = [str(p) for p in loc if p != "body"] if isinstance(loc, tuple | list) else []
    msg = str(first.get("msg", "invalid request"))
    text = f"{'.'.join(where)}: {msg}" if where else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more errors)"
    return e.InvalidRequestError(text, param=where[0] if where else None)


class TeiErrorBody(BaseModel):
    """The error body of TEI and native routes."""

    error: str = Field(description="What went wrong, for a person.")
    error_type: str = Field(description="TEI's error type: Validation, Overloaded, Backend...")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorBody(BaseModel):
    """The error body of OpenAI routes."""

    error: OpenAIErrorDetail


def _error_statuses(dialect: Dialect) -> list[int]:
    """Every status the table can answer in ``dialect``, and 400 (a body that is not JSON)."""
    return sorted({400} | {spec.status_for(dialect) for _, spec in ERROR_TABLE})


def error_responses(dialect: Dialect) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for every error a route of ``dialect`` can answer.

    Any route can answer any of them: the pipeline's stages (401 key, 413 body, 503 drain)
    run before every route, and the one table maps every error the same way. Derived from
    the table, so a row added there is documented on every route at once.
    """
    model = OpenAIErrorBody if dialect is Dialect.OPENAI else TeiErrorBody
    # The media type is explicit: FastAPI would give an error the route's own (text/plain on
    # /metrics), but every error is JSON.
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    out: dict[int | str, dict[str, Any]] = {
        status: {
            "model": model,
            "description": HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": schema}},
        }
        for status in _error_statuses(dialect)
    }
    out[429]["headers"] = {
        "Retry-After": {
            "description": "Seconds to wait before retrying (rate limits, overload).",
            "schema": {"type": "string"},
        }
    }
    out[503]["headers"] = {
        "Retry-After": {
            "description": "Seconds to wait before retrying, when known (a wait that timed out "
            "before a model loaded or a tokenizer thread was free; too many connections).",
            "schema": {"type": "string"},
        }
    }
    out[405]["headers"] = {
        "Allow": {"description": "The methods the path accepts.", "schema": {"type": "string"}}
    }
    return out


# Shared by every router (``APIRouter(responses=...)``): one definition, not one per route.
TEI_ERROR_RESPONSES = error_responses(Dialect.TEI)
OPENAI_ERROR_RESPONSES = error_responses(Dialect.OPENAI)
