"""Run the app under uvicorn; SIGTERM drains (stop accepting, finish queued work, exit 0)."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.serve.http_protocol import OneWriteHttpToolsProtocol
from embedplex.serve.process_tuning import tune_process
from embedplex.serve.tls import TlsConfig, server_context


class _DrainingServer(uvicorn.Server):
    """Marks the gateway as draining the moment a stop signal arrives (readiness goes false)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.gateway.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, so the process would die by
        # SIGTERM; a finished drain is a clean stop and exits 0 (what orchestrators expect).
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != sig]


def serve(settings: Settings) -> None:
    tune_process()
    app = create_app(settings)
    config = TlsConfig(
        app,
        context=server_context(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=round(settings.graceful_shutdown_s),
        lifespan="on",
        server_header=False,
        http=OneWriteHttpToolsProtocol,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
    )
    _DrainingServer(config, app).run()
