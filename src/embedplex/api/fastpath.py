"""The embedding routes' hot path: ``POST`` embed calls served without FastAPI's machinery.

On two cores every microsecond of Python per request is taken from inference (and an ONNX
Runtime forward pass split over both cores waits for whichever half the event loop delayed).
FastAPI's per-request machinery (route matching, dependency solving, ``json.loads`` then
validation of a dict) and one middleware layer per concern cost more main-thread time per
single-text request than the route itself, so the embed routes are served in two layers:

- ``HotPath``: the app's first stop (``EmbedplexApp.__call__``). For the embed routes it does
  inline, in the middleware stack's order, what that stack would do: request id, API key, body
  limit, the route, metrics and the request log line. It stands aside when CORS or tracing is on
  (they stay in the middleware stack) and for every other path and method.
- ``FastEmbedRoutes``: innermost in the middleware stack, for when ``HotPath`` stands aside; it
  skips FastAPI's routing and validates straight from the JSON bytes.

Both serve the same handlers with the same schemas and error shapes as the FastAPI routes, which
stay registered for OpenAPI and ``/docs`` (tests/api/test_fastpath.py compares all three).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedplex.api.common import ClientGoneError
from embedplex.api.errors import error_response
from embedplex.api.middleware import body_too_large, check_api_key, content_length, take_request_id
from embedplex.api.observe import RequestObserver, RequestRecord, scope_record
from embedplex.api.routes import openai, tei
from embedplex.core.errors import EmbedplexError, InvalidRequestError

logger = logging.getLogger(__name__)

Handler = Callable[[Any, Request], Awaitable[Response]]
InvalidHandler = Callable[[RequestValidationError, str], Response]
Routes = dict[str, tuple[type[BaseModel], Handler]]

ROUTES: Routes = {
    "/v1/embeddings": (openai.EmbeddingsRequest, openai.create_embeddings),
    "/embeddings": (openai.EmbeddingsRequest, openai.create_embeddings),
    "/embed": (tei.EmbedBody, tei.embed),
    "/api/v1/embed": (tei.NativeEmbedBody, tei.native_embed),
}


async def answer(
    route: tuple[type[BaseModel], Handler],
    scope: Scope,
    receive: Receive,
    body: bytes,
    on_invalid: InvalidHandler,
) -> Response:
    """Validate ``body`` against the route's schema and run its handler; errors as responses."""
    schema, handler = route
    path: str = scope["path"]
    try:
        if not body.strip():  # as FastAPI words it: no body is a missing field
            raise RequestValidationError(
                [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
            )
        parsed = schema.model_validate_json(body)
        return await handler(parsed, Request(scope, receive))
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        scope_record(scope).error_type = InvalidRequestError.kind
        return on_invalid(RequestValidationError(errors, body=body), path)
    except RequestValidationError as exc:
        scope_record(scope).error_type = InvalidRequestError.kind
        return on_invalid(exc, path)
    except EmbedplexError as exc:
        scope_record(scope).error_type = exc.kind
        return error_response(exc, path)
    except ClientGoneError:
        return Response(status_code=499)


class FastEmbedRoutes:
    """Serve ``routes`` (path -> (body schema, handler)) for POST; pass anything else on."""

    def __init__(
        self, app: ASGIApp, *, on_invalid: InvalidHandler, routes: Routes | None = None
    ) -> None:
        self.app = app
        self.on_invalid = on_invalid
        self.routes = ROUTES if routes is None else routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except ClientGoneError:
            response = Response(status_code=499)
        else:
            response = await answer(route, scope, receive, body, self.on_invalid)
        await response(scope, receive, send)


class HotPath:
    """The embed routes end to end: request id, API key, body limit, route, metrics, log."""

    def __init__(
        self,
        *,
        observer: RequestObserver,
        on_invalid: InvalidHandler,
        limit: int,
        api_key: bytes | None,
        routes: Routes | None = None,
    ) -> None:
        self.observer = observer
        self.on_invalid = on_invalid
        self.limit = limit
        self.api_key = api_key
        self.routes = ROUTES if routes is None else routes

    def route(self, scope: Scope) -> tuple[type[BaseModel], Handler] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        return self.routes.get(scope["path"])

    async def __call__(
        self, route: tuple[type[BaseModel], Handler], scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        rid = take_request_id(scope)
        record = scope["state"]["record"] = RequestRecord()
        path: str = scope["path"]
        try:
            if self.api_key is not None:
                check_api_key(scope, self.api_key)
            length = content_length(scope)
            if length is not None and length > self.limit:
                raise body_too_large(self.limit)
            body = await read_body(receive, self.limit)
            response = await answer(route, scope, receive, body, self.on_invalid)
        except EmbedplexError as exc:
            record.error_type = exc.kind
            response = error_response(exc, path)
        except ClientGoneError:
            response = Response(status_code=499)
        except Exception:
            logger.exception("unhandled error on %s", path)
            record.error_type = "internal"
            response = error_response(EmbedplexError("internal server error"), path)
        response.raw_headers.append((b"x-request-id", rid))
        try:
            await response(scope, receive, send)
        finally:
            self.observer.finish(scope, path, response.status_code, start, record)


class EmbedplexApp(FastAPI):
    """FastAPI with the embed routes' ``HotPath`` in front of its middleware stack."""

    hot_path: HotPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot_path
        route = hot.route(scope) if hot is not None else None
        if hot is None or route is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what Starlette would set: handlers reach app.state through it
        await hot(route, scope, receive, send)


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; PayloadTooLargeError past ``limit`` bytes."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected before the body was complete
            raise ClientGoneError
        chunk = message.get("body", b"")
        seen += len(chunk)
        if limit is not None and seen > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
