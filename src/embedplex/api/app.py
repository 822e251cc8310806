"""The ASGI application: routes, middleware, error handlers, and the gateway's lifespan.

The gateway is built in ``lifespan`` and read from ``app.state``. Models load in the background
so that liveness answers at once and readiness turns true when loading is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from embedplex import __version__
from embedplex.api import openai, probes, tei
from embedplex.api.common import ClientGoneError
from embedplex.api.errors import error_response, status_error
from embedplex.api.fastpath import FastEmbedRoutes
from embedplex.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from embedplex.config import Settings
from embedplex.errors import EmbedplexError, InvalidRequestError
from embedplex.gateway import Gateway

logger = logging.getLogger(__name__)

GatewayFactory = Callable[[Settings], Gateway]


def default_gateway(settings: Settings) -> Gateway:
    """Load the configured local model (blocking; run in a thread)."""
    from embedplex.local_model import LocalEmbeddingModel

    return Gateway([LocalEmbeddingModel.load(settings)])


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    malformed = any(err.get("type") == "json_invalid" for err in errors)
    if malformed:
        return f"invalid JSON body: {first.get('ctx', {}).get('error', 'decode error')}", None, True
    msg = str(first.get("msg", "invalid request"))
    where = ".".join(loc)
    text = f"{where}: {msg}" if where else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more errors)"
    return text, (loc[0] if loc else None), malformed


def validation_error_response(exc: RequestValidationError, path: str) -> Response:
    text, param, malformed = _validation_message(exc)
    return error_response(InvalidRequestError(text, param=param, malformed=malformed), path)


def create_app(
    settings: Settings | None = None,
    *,
    gateway_factory: GatewayFactory = default_gateway,
) -> FastAPI:
    settings = settings or Settings.load()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway()
        failed: list[BaseException] = []

        async def load() -> None:
            try:
                gw = await asyncio.to_thread(gateway_factory, settings)
                await gw.start()
                app.state.gateway = gw
                logger.info("ready: %s", ", ".join(m.name for m in gw.models))
            except BaseException as exc:
                failed.append(exc)
                logger.exception("model loading failed")
                raise

        loader = asyncio.create_task(load())
        app.state.loader = loader
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            gw = app.state.gateway
            await gw.close(drain=True)

    app = FastAPI(
        title="embedplex",
        version=__version__,
        description="Embedding server and batching gateway (OpenAI and TEI compatible).",
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.gateway = Gateway()
    for router in (openai.router, tei.router, probes.router):
        app.include_router(router)

    @app.exception_handler(EmbedplexError)
    async def on_embedplex_error(request: Request, exc: EmbedplexError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return validation_error_response(exc, request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(status_error(exc.status_code, str(exc.detail)), request.url.path)

    @app.exception_handler(ClientGoneError)
    async def on_client_gone(request: Request, exc: ClientGoneError) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(EmbedplexError("internal server error"), request.url.path)

    # Innermost: the embed routes' hot path (see api/fastpath.py); then the shared middleware.
    app.add_middleware(FastEmbedRoutes, on_invalid=validation_error_response)
    app.add_middleware(BodyLimitMiddleware, limit=settings.payload_limit)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestIdMiddleware)
    return app
