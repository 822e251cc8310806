"""End to end: ``examples/router.toml`` in front of an embedplex serving the real default model.

Both servers run as ``embedplex serve`` subprocesses on free ports of 127.0.0.1. The router's
vectors must equal the upstream's bit for bit, and 1,000 single-text requests from 100
concurrent callers must reach the upstream in at most 25 calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.providers.config import RouteConfig
from helpers import free_port, stop, wait_ready
from upstream_fakes import FakeUpstream, provider, vector_for

pytest.importorskip("aiohttp")
# The load side is examples/router_load.py itself, so the documented check is what is tested.
sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import router_load

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "router.toml"
ADMIN_SECRET = "e2e-admin-secret-x"  # router_load reads /api/v1/status with it


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("EMBEDPLEX_CONFIG", None)
    code = "import sys; from embedplex.cli.main import main; sys.argv[0] = 'embedplex'; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    up_port, router_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("router") / "router.toml"
    config.write_text(
        EXAMPLE.read_text().replace("http://127.0.0.1:8081", f"http://127.0.0.1:{up_port}")
    )
    procs = [spawn("--port", str(up_port))]
    procs.append(
        spawn("--config", str(config), "--port", str(router_port), "--admin-secret", ADMIN_SECRET)
    )
    up, router = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{router_port}"
    try:
        wait_ready(procs[0], up)
        wait_ready(procs[1], router)
        yield up, router
    finally:
        stop(*procs)


def vectors(url: str, texts: list[str], **extra: Any) -> np.ndarray:
    r = httpx.post(url + "/v1/embeddings", json={"input": texts, **extra}, timeout=60)
    r.raise_for_status()
    return np.asarray([row["embedding"] for row in r.json()["data"]], dtype=np.float32)


def test_router_vectors_equal_direct_vectors(servers: tuple[str, str]) -> None:
    up, router = servers
    texts = ["hello", "The quick brown fox jumps over the lazy dog.", "embedplex " * 40]
    direct = vectors(up, texts)
    routed = vectors(router, texts, model="remote-minilm")
    assert direct.shape == (3, 384)
    np.testing.assert_array_equal(routed, direct)


def test_1000_requests_from_100_callers_take_at_most_25_upstream_calls(
    servers: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDPLEX_ADMIN_SECRET", ADMIN_SECRET)
    up, router = servers
    routed = asyncio.run(router_load.run(router, "remote-minilm", requests=1000, callers=100))
    direct = asyncio.run(router_load.run(up, None, requests=1000, callers=100))
    # Timings are reported, not asserted: they belong to the benchmark (run with -s to see).
    print(f"\nrouter: {routed}\ndirect: {direct}")
    assert routed["requests"] == direct["requests"] == 1000
    assert routed["upstream_calls"]["local-8081"] <= 25


async def test_local_model_and_providers_side_by_side(upstream: FakeUpstream) -> None:
    settings = Settings(
        providers=[provider("fake", upstream)],
        routes=[RouteConfig(model="remote-x", providers=["fake"])],
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            names = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
            assert names == {settings.model_name, "remote-x"}
            local = await client.post(
                "/v1/embeddings", json={"model": settings.model_name, "input": "hi"}
            )
            remote = await client.post("/v1/embeddings", json={"model": "remote-x", "input": "hi"})
    assert len(local.json()["data"][0]["embedding"]) == 384
    assert "x-embedplex-provider" not in local.headers
    got = np.asarray(remote.json()["data"][0]["embedding"], np.float32)
    np.testing.assert_array_equal(got, vector_for("hi"))
