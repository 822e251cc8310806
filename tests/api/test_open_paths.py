"""What is open without a key: probes always; /metrics only when public or on its own port;
the docs routes unless turned off (issue 14)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_pipeline import serve

from embedplex.config import Settings
from helpers import free_port

KEY = "sk-open-paths"
AUTH = {"authorization": f"Bearer {KEY}"}
PROBES = ["/health", "/health/live", "/health/ready"]
DOCS = ["/docs", "/redoc", "/openapi.json", "/swagger-ui"]


def settings(**kw: Any) -> Settings:
    return Settings.load(None, served_model_name="embedder", **kw)


async def test_metrics_follow_the_api_key() -> None:
    async with serve(settings(api_key=KEY)) as (_, client):
        anonymous = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"authorization": "Bearer nope"})
        ok = await client.get("/metrics", headers=AUTH)
        for path in PROBES + DOCS:
            assert (await client.get(path)).status_code in (200, 307), path
    assert anonymous.status_code == wrong.status_code == 401
    assert "embedplex_" not in anonymous.text
    assert ok.status_code == 200 and "embedplex_request" in ok.text


async def test_metrics_public_opens_them_again() -> None:
    async with serve(settings(api_key=KEY, metrics_public=True)) as (_, client):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 401


async def test_without_a_key_metrics_stay_open() -> None:
    async with serve(settings()) as (_, client):
        assert (await client.get("/metrics")).status_code == 200


async def test_with_a_metrics_port_metrics_are_served_only_there() -> None:
    port = free_port()
    async with serve(settings(metrics_port=port)) as (_, client):
        main = await client.get("/metrics")
        async with httpx.AsyncClient() as other:
            separate = await other.get(f"http://127.0.0.1:{port}/metrics")
    assert main.status_code == 404
    assert "metrics port" in main.json()["error"]
    assert separate.status_code == 200 and "embedplex_" in separate.text


@pytest.mark.parametrize("key", [None, KEY])
async def test_docs_can_be_turned_off_and_probes_stay_open(key: str | None) -> None:
    async with serve(settings(docs_enabled=False, api_key=key)) as (_, client):
        for path in DOCS:
            r = await client.get(path, headers=AUTH)
            assert r.status_code == 404, path
        for path in PROBES:
            assert (await client.get(path)).status_code == 200, path
        assert (await client.post("/embed", json={"inputs": "x"}, headers=AUTH)).status_code == 200
