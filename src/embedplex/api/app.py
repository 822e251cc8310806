"""The ASGI application: routes, middleware, error handlers, and the gateway's lifespan.

The gateway is built in ``lifespan`` and read from ``app.state``. Models load in the background
so that liveness answers at once and readiness turns true when loading is done.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from embedplex import __version__
from embedplex.api.common import ClientGoneError
from embedplex.api.errors import error_response, status_error
from embedplex.api.fastpath import EmbedplexApp, FastEmbedRoutes, HotPath
from embedplex.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from embedplex.api.observe import ObservabilityMiddleware, RequestObserver, request_record
from embedplex.api.routes import (
    admin,
    batch,
    native,
    openai,
    probes,
    rerank,
    status,
    tei,
    tei_extras,
)
from embedplex.config import Settings
from embedplex.core.errors import EmbedplexError, InvalidRequestError
from embedplex.gateway import Gateway
from embedplex.gateway.build import build_gateway
from embedplex.observability import Telemetry
from embedplex.observability.server import MetricsServer
from embedplex.serve.process_tuning import run_lowered

logger = logging.getLogger(__name__)

GatewayFactory = Callable[[Settings], Gateway]


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
    gateway_factory: GatewayFactory = build_gateway,
    telemetry: Telemetry | None = None,
) -> FastAPI:
    """The app; ``telemetry`` defaults to one built from ``settings`` (tests pass their own)."""
    settings = settings or Settings.load()
    telemetry = telemetry or Telemetry.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway()
        failed: list[BaseException] = []
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = MetricsServer.start(
                telemetry.metrics.registry, settings.host, settings.metrics_port
            )
            app.state.metrics_port = metrics_server.port

        async def load() -> None:
            try:
                # Loaded in a thread at the inference threads' priority: ONNX Runtime's own
                # intra-op threads, started there, inherit it (process_tuning.py).
                gw = await run_lowered(lambda: gateway_factory(settings), settings.inference_nice)
                telemetry.instrument(gw.services())
                if gw.router is not None:
                    gw.router.instrument(telemetry)
                await gw.start()
                # What loading left (modules, the model, the tokenizer) lives as long as the
                # process: keep it out of the collector's sight. Otherwise every full
                # collection walks it and stalls the event loop (measured: ~60 ms pauses,
                # which set the p99 of every request caught behind them).
                gc.collect()
                gc.freeze()
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
            if metrics_server is not None:
                metrics_server.stop()
            telemetry.shutdown()

    app = EmbedplexApp(
        title="embedplex",
        version=__version__,
        description="Embedding server and batching gateway (OpenAI and TEI compatible).",
        lifespan=lifespan,
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.gateway = Gateway()
    app.state.telemetry = telemetry
    telemetry.metrics.watch(lambda: app.state.gateway)  # gauges read at scrape time
    routers = (
        openai.router,
        batch.router,
        tei.router,
        tei_extras.router,
        rerank.router,
        native.router,
        probes.router,
        status.router,
        admin.router,
    )
    for router in routers:
        app.include_router(router)
    paths = frozenset(str(getattr(r, "path", "")) for router in routers for r in router.routes)

    @app.exception_handler(EmbedplexError)
    async def on_embedplex_error(request: Request, exc: EmbedplexError) -> Response:
        request_record(request).error_type = exc.kind
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        request_record(request).error_type = InvalidRequestError.kind
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
        request_record(request).error_type = "internal"
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
    # Inside the request id (logged) but outside auth and limits (their refusals are counted).
    app.add_middleware(
        ObservabilityMiddleware,
        telemetry=telemetry,
        paths=paths,
        log_requests=settings.log_requests,
    )
    app.add_middleware(RequestIdMiddleware)
    if not settings.cors_allow_origins and telemetry.tracer is None:
        # The embed routes skip the stack above and do the same inline (api/fastpath.py).
        key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        app.hot_path = HotPath(
            observer=RequestObserver(telemetry, log_requests=settings.log_requests),
            on_invalid=validation_error_response,
            limit=settings.payload_limit,
            api_key=key,
        )
    return app
