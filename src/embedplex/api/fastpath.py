"""The embedding routes' hot path: pure ASGI in front of FastAPI for ``POST`` embed calls.

FastAPI's per-request machinery (route matching over every route, dependency solving, an
exit stack, two layers of exception wrapping, ``json.loads`` then validation of a dict) cost
more main-thread time per single-text request than the rest of the server together, and on two
cores that time is taken from inference. This middleware serves the same handlers with the same
schemas, validated straight from the JSON bytes by pydantic-core, and the same error shapes;
FastAPI keeps the routes for OpenAPI and ``/docs`` and still serves every other path. It is
installed innermost, so request id, body limit, API key and CORS middleware run as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedplex.api import openai, tei
from embedplex.api.common import ClientGoneError
from embedplex.api.errors import error_response
from embedplex.api.observe import scope_record
from embedplex.errors import EmbedplexError, InvalidRequestError

Handler = Callable[[Any, Request], Awaitable[Response]]
InvalidHandler = Callable[[RequestValidationError, str], Response]

ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/embeddings": (openai.EmbeddingsRequest, openai.create_embeddings),
    "/embeddings": (openai.EmbeddingsRequest, openai.create_embeddings),
    "/embed": (tei.EmbedBody, tei.embed),
    "/api/v1/embed": (tei.NativeEmbedBody, tei.native_embed),
}


class FastEmbedRoutes:
    """Serve ``routes`` (path -> (body schema, handler)) for POST; pass anything else on."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        on_invalid: InvalidHandler,
        routes: dict[str, tuple[type[BaseModel], Handler]] | None = None,
    ) -> None:
        self.app = app
        self.on_invalid = on_invalid
        self.routes = ROUTES if routes is None else routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        schema, handler = route
        path: str = scope["path"]
        body = b""
        try:
            body = await _read_body(receive)
            if not body.strip():  # as FastAPI words it: no body is a missing field
                raise RequestValidationError(
                    [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
                )
            parsed = schema.model_validate_json(body)
            response = await handler(parsed, Request(scope, receive))
        except ValidationError as exc:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
            scope_record(scope).error_type = InvalidRequestError.kind
            response = self.on_invalid(RequestValidationError(errors, body=body), path)
        except RequestValidationError as exc:
            scope_record(scope).error_type = InvalidRequestError.kind
            response = self.on_invalid(exc, path)
        except EmbedplexError as exc:
            scope_record(scope).error_type = exc.kind
            response = error_response(exc, path)
        except ClientGoneError:
            response = Response(status_code=499)
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected before the body was complete
            raise ClientGoneError
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
