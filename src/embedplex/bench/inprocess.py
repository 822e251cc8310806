"""An in-process embedplex app on 127.0.0.1 with the fake backend: for tests and demos.

No model weights are loaded: the default model's tokenizer and spec, the ``FakeBackend`` for
vectors. ``running_server`` serves it with uvicorn on a free port inside the running loop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import load_spec, resolve_model_dir, tokenizer_for
from embedplex.cache import EmbeddingCache
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions


def fake_gateway(backend: FakeBackend) -> Callable[[Settings], Gateway]:
    """A gateway factory serving the default model's tokenizer with ``backend``."""

    def factory(settings: Settings) -> Gateway:
        path, sha = resolve_model_dir(settings.model_id, hub_timeout_s=settings.hub_timeout_s)
        spec = load_spec(settings.model_id, path, sha=sha)
        tokenizer = tokenizer_for(spec)
        options = LocalModelOptions.from_settings(settings, spec, run_tokens=backend.run_tokens)
        cache = EmbeddingCache.from_settings(settings)  # as served: the configured cache
        model = LocalEmbeddingModel(spec, tokenizer, backend, options, cache=cache)
        return Gateway([model], cache=cache)

    return factory


@asynccontextmanager
async def running_server(backend: FakeBackend, **settings: Any) -> AsyncIterator[str]:
    """Serve the app on a free 127.0.0.1 port; yield its base URL."""
    app = create_app(Settings.load(None, **settings), gateway_factory=fake_gateway(backend))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(30):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
                await asyncio.sleep(0.02)
            await app.state.loader
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(30):
            await task
        sock.close()
