"""The ASGI application: the pipeline in front, routes, error handlers, the gateway's lifespan.

The gateway is built in ``lifespan`` and read from ``app.state``. Models load in the background
so that liveness answers at once and readiness turns true when loading is done. A failed load is
never an endless "loading": the probes name it, and a real server exits non-zero.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedplex import __version__
from embedplex.api.common import ClientGoneError
from embedplex.api.docs import OPENAPI_URL, add_docs
from embedplex.api.errors import invalid_body, status_error
from embedplex.api.observe import RequestObserver
from embedplex.api.pacing import RefusalPacer
from embedplex.api.pipeline import Pipeline, client_gone, internal_error, refuse
from embedplex.api.routes.table import JSON_ROUTES, ROUTERS
from embedplex.api.stages import default_stages
from embedplex.config import Settings
from embedplex.core.errors import EmbedplexError
from embedplex.gateway import Gateway
from embedplex.gateway.build import build_gateway
from embedplex.limits import FailureThrottle, RateLimiter
from embedplex.observability import Telemetry
from embedplex.observability.logs import log_failure
from embedplex.observability.server import MetricsServer
from embedplex.serve.process_tuning import run_lowered
from embedplex.state.cache import KeyVerifier
from embedplex.state.keys import KeyStore
from embedplex.state.providers import ProviderStore, ProviderSync
from embedplex.state.store import StateStore
from embedplex.state.usage import UsageMeter

logger = logging.getLogger(__name__)

GatewayFactory = Callable[[Settings], Gateway]


class AppState(State):
    """``app.state`` whose ``gateway`` is read without a failed lookup first.

    Starlette's ``State`` keeps its keys in a dict that only ``__getattr__`` reads, and Python
    calls that only after the ordinary lookup has failed and made an AttributeError: the
    costliest line of the admission stage, and read again by every route (docs/architecture.md,
    "Per-request CPU"). A property is found at once; the key still lives in the same dict.
    """

    @property
    def gateway(self) -> Gateway:
        try:
            gw: Gateway = self._state["gateway"]
        except KeyError:
            raise AttributeError("'AppState' object has no attribute 'gateway'") from None
        return gw


class EmbedplexApp(FastAPI):
    """FastAPI whose every HTTP request enters through the pipeline (``edge``) first.

    The pipeline hands the requests it does not answer itself back to FastAPI's own machinery
    (``serve_routes``); lifespan events go straight to FastAPI.
    """

    edge: ASGIApp | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = AppState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        edge = self.edge
        if edge is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        await edge(scope, receive, send)  # the pipeline puts this app in the scope (``owner``)

    def entry(self) -> ASGIApp:
        """What a server should call: the pipeline itself, which puts this app in each scope
        and hands lifespan events on to it (one coroutine frame less per request than this
        app's ``__call__``); the app when it has no pipeline."""
        return self if self.edge is None else self.edge

    async def serve_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's routing, exception handlers and documentation routes."""
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, less the 422 FastAPI adds of itself to a route with a body or
        parameters whose ``responses`` list none: the OpenAI routes answer a body that fails
        validation with 400, as OpenAI does (``api/errors.py``), never with that 422."""
        if self.openapi_schema is None:
            schema = super().openapi()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    responses = operation.get("responses", {})
                    if _HTTP_VALIDATION_ERROR in str(responses.get("422", "")):
                        del responses["422"]
            schemas = schema.get("components", {}).get("schemas", {})
            for name in (_HTTP_VALIDATION_ERROR, "ValidationError"):
                schemas.pop(name, None)
        return self.openapi_schema or {}


_HTTP_VALIDATION_ERROR = "HTTPValidationError"


def create_app(
    settings: Settings | None = None,
    *,
    gateway_factory: GatewayFactory = build_gateway,
    telemetry: Telemetry | None = None,
) -> EmbedplexApp:
    """The app; ``telemetry`` defaults to one built from ``settings`` (tests pass their own)."""
    settings = settings or Settings.load()
    telemetry = telemetry or Telemetry.from_settings(settings)
    # The state store: managed keys and their usage (docs/keys.md). Opened in lifespan.
    store = StateStore.from_settings(settings)
    keys = KeyVerifier(
        KeyStore(store), poll_s=settings.state_poll_s, require=settings.require_api_key
    )
    usage = UsageMeter(store, flush_s=settings.usage_flush_s)
    provider_sync = ProviderSync(ProviderStore(store), telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway()
        # Before the first request: keys must be known before anything is served.
        await store.upgrade()
        await keys.start()
        usage.start()
        logger.info("state store: %s", store.describe())
        failed: list[BaseException] = []
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = MetricsServer.start(
                telemetry.metrics.registry,
                settings.metrics_host or settings.host,
                settings.metrics_port,
            )
            app.state.metrics_port = metrics_server.port
            # The address bound, not the one asked for: port 0 picks one, and a scraper (or
            # whoever checks what is exposed) needs to know which.
            logger.info("metrics: http://%s/metrics", metrics_server.address)

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
                placeholder = app.state.gateway  # a SIGTERM during loading marked this one
                gw.draining, gw.stopping_soon = placeholder.draining, placeholder.stopping_soon
                app.state.gateway = gw
                await provider_sync.apply(gw)  # providers other replicas added at run time
                logger.info("ready: %s", ", ".join(m.name for m in gw.models))
            except BaseException as exc:
                failed.append(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log_failure(logger, exc, "model loading failed")
                # Never an endless "loading": readiness and liveness name the reason, and a
                # real server (serve/server.py sets ``on_load_failure``) exits non-zero.
                reason = exc.message if isinstance(exc, EmbedplexError) else str(exc)
                app.state.gateway.load_error = reason or type(exc).__name__
                on_failure = getattr(app.state, "on_load_failure", None)
                if on_failure is not None:
                    on_failure(app.state.gateway.load_error)
                raise

        loader = asyncio.create_task(load())
        app.state.loader = loader
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await provider_sync.close()  # replaced and removed providers' drains
            gw = app.state.gateway
            await gw.close(drain=True)
            observer.close()  # every request is answered: the last refusal counts told
            if metrics_server is not None:
                metrics_server.stop()
            await limiter.aclose()
            await usage.close()
            await keys.close()
            await store.close()
            await telemetry.aclose()  # bounded: a down collector never holds the exit

    app = EmbedplexApp(
        title="embedplex",
        version=__version__,
        description="Embedding server and batching gateway (OpenAI and TEI compatible).",
        lifespan=lifespan,
        # docs_enabled = false: no /docs, /redoc or /openapi.json (404), nothing to map the API.
        # The pages are add_docs's, whose scripts come from this process, not from a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_URL if settings.docs_enabled else None,
    )
    if settings.docs_enabled:
        add_docs(app, OPENAPI_URL)
    app.state.settings = settings
    app.state.gateway = Gateway()
    app.state.telemetry = telemetry
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    limiter = RateLimiter.from_url(
        redis_url,
        timeout_s=settings.redis_timeout_s,
        probe_interval_s=settings.redis_probe_interval_s,
        observer=telemetry.metrics.rate_limits,
    )
    app.state.rate_limiter = limiter
    app.state.admin_failures = FailureThrottle()  # wrong admin secrets, per client address
    app.state.state_store = store
    app.state.keys = keys
    app.state.usage = usage
    app.state.provider_sync = provider_sync
    keys.listeners.append(lambda: provider_sync.apply(app.state.gateway))
    telemetry.metrics.watch(lambda: app.state.gateway)  # gauges read at scrape time
    for router in ROUTERS:
        app.include_router(router)
    paths = frozenset(str(getattr(r, "path", "")) for router in ROUTERS for r in router.routes)

    # Errors raised in the routes FastAPI serves: answered as the pipeline answers its own.
    @app.exception_handler(EmbedplexError)
    async def on_embedplex_error(request: Request, exc: EmbedplexError) -> Response:
        return refuse(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return refuse(request.scope, invalid_body(exc.errors()))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        response = refuse(request.scope, status_error(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # Starlette's Allow names only the first route of the path (GET and POST are two
            # routes here): name every method the path serves.
            response.headers["allow"] = ", ".join(allowed_methods(request.scope["path"]))
        return response

    @app.exception_handler(ClientGoneError)
    async def on_client_gone(request: Request, exc: ClientGoneError) -> Response:
        return client_gone(request.scope)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return internal_error(request.scope)

    def allowed_methods(path: str) -> list[str]:
        methods = {
            method
            for router in ROUTERS
            for route in router.routes
            if isinstance(route, APIRoute) and route.path_regex.match(path)
            for method in route.methods or ()
        }
        return sorted(methods)

    observer = RequestObserver(
        telemetry,
        paths=paths,
        log_requests=settings.log_requests,
        log_trace_ids=not settings.disable_spans,
        usage=usage,
    )
    edge: ASGIApp = Pipeline(
        app.serve_routes,
        stages=default_stages(settings, keys, limiter),
        routes=JSON_ROUTES,
        observer=observer,
        pacer=RefusalPacer(settings.overload_refusal_hold_ms / 1000),
        owner=app,
        whole_writes=not settings.cors_allow_origins,  # CORS adds its headers through send
    )
    if settings.cors_allow_origins:
        # A header policy around the pipeline: preflights are answered before authentication
        # (they carry no key), and refusals still carry the CORS headers a browser needs.
        edge = CORSMiddleware(
            edge,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.edge = edge
    return app
