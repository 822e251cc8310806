"""Run the app under uvicorn; SIGTERM drains (stop accepting, finish queued work, exit 0)."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.http_protocol import OneWriteHttpToolsProtocol

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). An
# inference thread needs the GIL back after each forward pass to pool and take its next batch;
# at 5 ms it waited behind the event loop's busy stretches (measured at 64 clients: a batch
# started 5.4 ms after it was handed over; 0.8 ms at 0.5 ms, +3-5% throughput).
GIL_SWITCH_INTERVAL_S = 0.0005


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
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
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
