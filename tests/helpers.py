"""Shared test helpers: fake-backed gateways, in-process apps, real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions


def fake_model(model_dir: Path, settings: Settings, backend: FakeBackend) -> LocalEmbeddingModel:
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    return LocalEmbeddingModel(
        spec,
        tokenizer,
        backend,
        LocalModelOptions.from_settings(settings, spec, run_tokens=backend.run_tokens),
    )


def fake_app(model_dir: Path, backend: FakeBackend, **overrides: object) -> FastAPI:
    settings = Settings(model_id=str(model_dir), **overrides)  # type: ignore[arg-type]
    return create_app(
        settings, gateway_factory=lambda s: Gateway([fake_model(model_dir, s, backend)])
    )


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run and models loaded, behind an in-process client."""
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(asyncio.shield(app.state.loader), 120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(
    app: ASGIApp, port: int | None = None, health_path: str = "/health/ready"
) -> Iterator[str]:
    """Run the app under a real uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + health_path, timeout=1).status_code < 500:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        server.should_exit = True
        raise TimeoutError("server did not become ready")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually(check: Callable[[], Awaitable[bool] | bool], seconds: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{check} never held")


def wait_ready(proc: subprocess.Popen[Any], base: str, timeout: float = 180) -> None:
    """Poll a server process's /health/ready until 200; fail with its output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pipe = proc.stdout or proc.stderr
            out = pipe.read() if pipe else ""
            text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
            raise AssertionError(f"server exited early:\n{text[-2000:]}")
        try:
            if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready in {timeout}s")


def stop(*procs: subprocess.Popen[Any], grace: float = 30, kill_wait: float = 10) -> None:
    """SIGTERM every process, then wait for each; kill one that outlives ``grace``.

    All are signalled before any is waited for, so that they shut down side by side rather than
    one grace period after another. Each one's stdout pipe, if any, is closed once it is gone,
    so that no test leaves an open pipe behind.
    """
    for proc in procs:
        proc.terminate()  # SIGTERM; nothing if it has already exited
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait)
        if proc.stdout:
            proc.stdout.close()


def serve_refused(env: dict[str, str], data_dir: Path, timeout: float = 60) -> Any:
    """``embedplex serve --port 0`` in a process of its own, with ``env`` on top of this one's
    (its ``EMBEDPLEX_*`` left out) and ``data_dir`` for the state store, for a start that must
    be refused: the finished ``subprocess.CompletedProcess`` (text)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    full |= env | {"EMBEDPLEX_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "embedplex", "serve", "--port", "0"],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
