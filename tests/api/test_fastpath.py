"""The embed routes' hot path answers exactly as the FastAPI routes would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

from embedplex.api.app import create_app
from embedplex.api.fastpath import EmbedplexApp, FastEmbedRoutes
from embedplex.backends.fake import FakeBackend
from embedplex.bench.inprocess import fake_gateway
from embedplex.config import Settings
from embedplex.observability import Telemetry
from embedplex.observability.metrics import Metrics

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


Mode = Literal["hot", "inner", "fastapi"]
MODES: tuple[Mode, ...] = ("hot", "inner", "fastapi")


@asynccontextmanager
async def client(mode: Mode, settings: Settings | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its hot path ("hot"), with only the inner fast routes ("inner"), or with
    neither, FastAPI's own routing ("fastapi")."""
    settings = settings or Settings.load(None)
    app = create_app(settings, gateway_factory=fake_gateway(FakeBackend(16)))
    assert isinstance(app, EmbedplexApp)
    assert app.hot_path is not None
    if mode != "hot":
        app.hot_path = None
    if mode == "fastapi":
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastEmbedRoutes]
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def _answers(
    mode: Mode,
    cases: list[tuple[str, bytes]],
    settings: Settings | None = None,
    headers: dict[str, str] | None = None,
) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []
    headers = {"content-type": "application/json", **(headers or {})}
    async with client(mode, settings) as c:
        for path, body in cases:
            r = await c.post(path, content=body, headers=headers)
            out.append((r.status_code, r.json() if r.content else None))
            assert "x-request-id" in r.headers
    return out


async def test_same_answers_as_fastapi() -> None:
    expected = await _answers("fastapi", CASES)
    assert {status for status, _ in expected} >= {200, 422}
    for mode in ("hot", "inner"):
        assert await _answers(mode, CASES) == expected, mode


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_json_same_shape(body: bytes) -> None:
    answers = [(await _answers(mode, [("/v1/embeddings", body)]))[0] for mode in MODES]
    for status, payload in answers:
        assert status == 400
        assert isinstance(payload, dict)
        assert payload["error"]["code"] == "invalid_json"


async def test_api_key_and_body_limit_as_the_middleware_does() -> None:
    """The hot path does inline what the middleware stack does: same order, same answers."""
    settings = Settings.load(None, api_key="sekret", payload_limit=1024)
    small = b'{"input": "hello"}'
    big = b'{"input": "' + b"x" * 2000 + b'"}'
    cases = [("/v1/embeddings", small), ("/embed", big)]
    for key, statuses in ((None, [401, 401]), ("wrong", [401, 401]), ("sekret", [200, 413])):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        got = {mode: await _answers(mode, cases, settings, headers) for mode in ("hot", "fastapi")}
        assert got["hot"] == got["fastapi"]
        assert [status for status, _ in got["hot"]] == statuses


async def test_request_id_is_echoed_and_requests_are_counted() -> None:
    async with client("hot") as c:
        r = await c.post("/v1/embeddings", json={"input": "hi"}, headers={"x-request-id": "abc"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "abc"
        await c.post("/v1/embeddings", json={"input": []})
        metrics = (await c.get("/metrics")).text
    lines = [line for line in metrics.splitlines() if 'route="/v1/embeddings"' in line]
    ok = [line for line in lines if line.startswith("embedplex_request_success_total{")]
    failed = [line for line in lines if line.startswith("embedplex_request_failures_total{")]
    assert [line.rsplit(" ", 1)[1] for line in ok] == ["1.0"]
    assert len(failed) == 1
    assert 'error_type="empty"' in failed[0]
    assert failed[0].endswith(" 1.0")


def test_cors_and_tracing_keep_the_middleware_stack() -> None:
    factory = fake_gateway(FakeBackend(16))
    plain = create_app(Settings.load(None), gateway_factory=factory)
    cors = create_app(
        Settings.load(None, cors_allow_origins=["https://a.example"]), gateway_factory=factory
    )
    traced = create_app(
        Settings.load(None),
        gateway_factory=factory,
        telemetry=Telemetry(Metrics(), TracerProvider()),
    )
    assert [getattr(app, "hot_path", None) is not None for app in (plain, cors, traced)] == [
        True,
        False,
        False,
    ]


async def test_routes_stay_documented_and_other_paths_pass_through() -> None:
    async with client("hot") as c:
        spec = (await c.get("/openapi.json")).json()
        assert "/v1/embeddings" in spec["paths"]
        assert "/embed" in spec["paths"]
        assert (await c.get("/v1/embeddings")).status_code == 405
        assert (await c.post("/tokenize", json={"inputs": "hi"})).status_code == 200
