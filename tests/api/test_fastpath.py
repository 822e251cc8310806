"""The embed routes' hot path answers exactly as the FastAPI routes would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.api.fastpath import FastEmbedRoutes
from embedplex.backends.fake import FakeBackend
from embedplex.bench.inprocess import fake_gateway
from embedplex.config import Settings

CASES = [
    ("/v1/embeddings", b'{"input": "hello world", "model": "x"}'),
    ("/v1/embeddings", b'{"input": ["a", "b"], "encoding_format": "base64"}'),
    ("/v1/embeddings", b'{"input": "hello", "dimensions": 8}'),
    ("/v1/embeddings", b'{"input": "hello", "dimensions": -1}'),
    ("/v1/embeddings", b'{"input": "hello", "dimensions": 100000000000000000000000000}'),
    ("/v1/embeddings", b'{"input": []}'),
    ("/v1/embeddings", b'{"input": 5}'),
    ("/v1/embeddings", b'{"inpt": "x"}'),
    ("/v1/embeddings", b""),
    ("/embeddings", b'{"input": [[101, 7592, 102]]}'),
    ("/embed", b'{"inputs": "hello"}'),
    ("/embed", b'{"inputs": ["hello", "x"], "normalize": false, "truncate": true}'),
    ("/embed", b'{"inputs": "hello", "extra": 1}'),
    ("/embed", b'{"inputs": ""}'),
    ("/embed", b'{"inputs": "' + b"word " * 600 + b'"}'),
    ("/api/v1/embed", b'{"inputs": ["hello"]}'),
]
# Malformed JSON: same status and error shape; the decoder's wording differs.
MALFORMED = [b"{bad json", b'{"input": "\xff\xfe"}', b"nope"]


@asynccontextmanager
async def client(fast: bool) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(Settings.load(None), gateway_factory=fake_gateway(FakeBackend(16)))
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastEmbedRoutes]
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def _answers(fast: bool, cases: list[tuple[str, bytes]]) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []
    headers = {"content-type": "application/json"}
    async with client(fast) as c:
        for path, body in cases:
            r = await c.post(path, content=body, headers=headers)
            out.append((r.status_code, r.json() if r.content else None))
            assert "x-request-id" in r.headers
    return out


async def test_same_answers_as_fastapi() -> None:
    assert await _answers(True, CASES) == await _answers(False, CASES)


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_json_same_shape(body: bytes) -> None:
    [(fast_status, fast)] = await _answers(True, [("/v1/embeddings", body)])
    [(slow_status, slow)] = await _answers(False, [("/v1/embeddings", body)])
    assert fast_status == slow_status == 400
    assert isinstance(fast, dict)
    assert isinstance(slow, dict)
    assert fast["error"]["code"] == slow["error"]["code"] == "invalid_json"


async def test_routes_stay_documented_and_other_paths_pass_through() -> None:
    async with client(True) as c:
        spec = (await c.get("/openapi.json")).json()
        assert "/v1/embeddings" in spec["paths"]
        assert "/embed" in spec["paths"]
        assert (await c.get("/v1/embeddings")).status_code == 405
        assert (await c.post("/tokenize", json={"inputs": "hi"})).status_code == 200
