"""Fixtures: the app over the real tokenizer and a ``FakeBackend``, in-process or on a port."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette

from embedplex.api.app import GatewayFactory, create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import DEFAULT_MODEL_ID, ModelSpec, load_spec, resolve_model_dir
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions
from embedplex.observability import Telemetry

# Re-exported for the tests of this package.
from helpers import eventually as eventually
from helpers import parse_metrics as parse_metrics
from helpers import value as value

MODEL = "test-model"


@cache
def _spec_and_tokenizer() -> tuple[ModelSpec, TextTokenizer]:
    path, sha = resolve_model_dir(DEFAULT_MODEL_ID)
    spec = load_spec(DEFAULT_MODEL_ID, path, sha=sha)
    tok = TextTokenizer.from_dir(path, max_length=spec.max_input_length, vocab_size=spec.vocab_size)
    return spec, tok


def fake_factory(backend: FakeBackend) -> GatewayFactory:
    """A gateway factory serving the real tokenizer in front of ``backend``."""

    def factory(settings: Settings) -> Gateway:
        spec, tok = _spec_and_tokenizer()
        options = LocalModelOptions.from_settings(settings, spec, run_tokens=backend.run_tokens)
        return Gateway([LocalEmbeddingModel(spec, tok, backend, options)])

    return factory


ADMIN_SECRET = "obs-admin-secret"


def settings(**overrides: Any) -> Settings:
    """The test server's settings; its admin API is on (``/api/v1/status`` is an admin route)."""
    return Settings(**{"served_model_name": MODEL, "admin_secret": ADMIN_SECRET, **overrides})


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient
    backend: FakeBackend

    @property
    def telemetry(self) -> Telemetry:
        t: Telemetry = self.app.state.telemetry
        return t

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics, parsed: (sample name, sorted labels) -> value."""
        r = await self.client.get("/metrics")
        assert r.status_code == 200
        return parse_metrics(r.text)


async def wait_ready(client: httpx.AsyncClient) -> None:
    async def ready() -> bool:
        return (await client.get("/health/ready")).status_code == 200

    await eventually(ready, 30)


@asynccontextmanager
async def serve(
    s: Settings | None = None,
    *,
    backend: FakeBackend | None = None,
    telemetry: Telemetry | None = None,
    factory: Callable[[FakeBackend], GatewayFactory] | None = None,
) -> AsyncIterator[Served]:
    """Run the app's lifespan in-process and talk to it over ASGI.

    ``factory(backend)`` builds the gateway factory (default: ``fake_factory``).
    """
    backend = backend or FakeBackend()
    s = s or settings()
    make = factory or fake_factory
    app = create_app(s, gateway_factory=make(backend), telemetry=telemetry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        # The admin secret rides in its own header: tests set Authorization for the API key.
        admin = {"x-admin-secret": ADMIN_SECRET}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=admin
        ) as client:
            await wait_ready(client)
            yield Served(app, client, backend)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve() as srv:
        yield srv


@contextmanager
def live_server(app: Starlette, *, wait_ready: bool = True) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) in a thread; yield its URL once
    it listens and (``wait_ready``) its /health/ready answers 200."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "server died"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        while wait_ready and httpx.get(url + "/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
