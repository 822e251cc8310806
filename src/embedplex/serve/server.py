"""Run the app under uvicorn; SIGTERM drains (stop accepting, finish queued work, exit 0).

SIGTERM, in order (docs/reliability.md): readiness turns false at once; for
``shutdown_delay_s`` the listener still accepts and serves (load balancers see the failing
readiness and stop sending first); then the listener closes and the requests in flight get
``graceful_shutdown_s`` to finish. One still running then is answered with the JSON 503 of
``api/pipeline.py`` ``cut_off``. Calls to remote providers make no retry past the end of the
grace period (``core/deadline.py`` ``drain_by``). A model that fails to load stops the process
with exit status 1 and the reason on stderr, never an endless "loading".
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from embedplex.api.app import GatewayFactory, create_app
from embedplex.backends.onnx_cache import default_cache_dir, has_exports, unwritable
from embedplex.config import Settings
from embedplex.core.deadline import SHUTDOWN, drain_by
from embedplex.gateway.build import build_gateway
from embedplex.observability.logs import flush_logs
from embedplex.serve.edge import EdgeLimits, edge_protocol, edge_stats
from embedplex.serve.forwarded import ForwardedHeaders
from embedplex.serve.process_tuning import tune_process
from embedplex.serve.tls import TlsConfig, TlsFileError, server_context
from embedplex.state.store import StateStore, StoreOpenError, open_store

logger = logging.getLogger(__name__)

BAD_START = 2  # the exit status for a bad file, directory or store at start (a usage error)


class StartupError(Exception):
    """What stops ``serve`` before it listens: one line naming the file, directory or store."""


async def _opened(store: StateStore) -> None:
    """Nothing more than opening the store (which applies the migrations)."""


def check_start(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context, and the state store opened and migrated, before uvicorn starts: a bad
    one is a clear line and exit 2 here, not a traceback from the lifespan (exit 3)."""
    try:
        context = server_context(settings)
    except TlsFileError as exc:
        raise StartupError(str(exc)) from None
    try:
        asyncio.run(open_store(settings, _opened))  # opening applies the migrations
    except StoreOpenError as exc:
        raise StartupError(str(exc)) from None
    _check_onnx_cache(settings)
    return context


def _check_onnx_cache(settings: Settings) -> None:
    """ONNX models in this process need their cache directory writable, unless it holds exports
    already (a read-only volume filled beforehand serves those): refused here when it is
    unwritable and empty, since then every such model's load would fail; else a warning. (A
    Ray model's replicas export where they run.)"""
    if not any(m.backend == "onnx" and m.runtime == "local" for m in settings.local_models()):
        return
    cache_dir = settings.cache_dir or default_cache_dir()
    problem = unwritable(cache_dir)
    if problem is None:
        return
    if not has_exports(cache_dir):
        raise StartupError(problem)
    logger.warning("%s; only the exports already there can serve", problem)


LOAD_FAILED = 1  # the exit status when a model fails to load


class _DrainingServer(uvicorn.Server):
    """Marks the gateway as draining the moment a stop signal arrives (readiness goes false)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, *, stop_delay: float = 0.0) -> None:
        super().__init__(config)
        self._app = app
        self._stop_delay = stop_delay
        self._stop_at: float | None = None  # time.monotonic() when the delayed stop begins
        self.load_error: str | None = None
        app.state.on_load_failure = self._load_failed

    def _load_failed(self, reason: str) -> None:
        self.load_error = reason
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        gateway = self._app.state.gateway
        if SHUTDOWN.at is None:  # remote calls' retries must end within the drain
            grace = self.config.timeout_graceful_shutdown or 0
            drain_by(time.monotonic() + self._stop_delay + grace)
        if sig == signal.SIGTERM and self._stop_delay > 0 and not self.should_exit:
            # The pre-stop delay: readiness false, requests still served; on_tick then stops.
            gateway.stopping_soon = True
            if self._stop_at is None:
                self._stop_at = time.monotonic() + self._stop_delay
            return
        gateway.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, so the process would die by
        # SIGTERM; a finished drain is a clean stop and exits 0 (what orchestrators expect).
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != sig]

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self._app.state.gateway.draining = True
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings, *, gateway_factory: GatewayFactory = build_gateway) -> None:
    """``gateway_factory``: what loads the models (tests run a real process on a fake one)."""
    context = check_start(settings)
    tune_process()
    app = create_app(settings, gateway_factory=gateway_factory)
    app.state.telemetry.metrics.watch_edge(edge_stats)
    config = TlsConfig(
        app.entry(),
        context=context,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=round(settings.graceful_shutdown_s),
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # read by the connection itself (serve/forwarded.py)
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
    )
    # Connection limits, and uvicorn's proxy headers trusting what uvicorn would trust.
    limits = EdgeLimits.from_settings(settings)
    config.http = edge_protocol(limits, ForwardedHeaders(config.forwarded_allow_ips))
    server = _DrainingServer(config, app, stop_delay=settings.shutdown_delay_s)
    server.run()
    if server.load_error is not None:
        flush_logs()
        if settings.log_format != "json":  # JSON logs: the ERROR line is the record, no other
            print(f"embedplex: model loading failed: {server.load_error}", file=sys.stderr)
        sys.exit(LOAD_FAILED)
