"""The one request pipeline: every route passes the same chain, answers and counts alike."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import Request
from starlette.responses import Response

from embedplex.api.app import EmbedplexApp, create_app
from embedplex.api.pipeline import Exchange, Pipeline
from embedplex.api.routes.table import JSON_ROUTES, ROUTERS
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import DEFAULT_MODEL_ID, ModelKind, load_spec, resolve_model_dir
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.batching import Item, NullObserver
from embedplex.config import Settings
from embedplex.core.errors import RateLimitedError
from embedplex.core.tenant import ANONYMOUS, Priority, Tenant
from embedplex.gateway import Gateway
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions
from embedplex.models.rerank import LocalRerankModel
from embedplex.observability import Telemetry
from embedplex.providers.config import RouteConfig
from embedplex.providers.router import RemoteModel, Router
from helpers import eventually, parse_metrics
from upstream_fakes import provider, running_upstream

KEY = "sk-pipeline-test"
AUTH = {"authorization": f"Bearer {KEY}"}

# Every route kind: the JSON POST routes the pipeline serves itself, and FastAPI's.
ROUTES: list[tuple[str, str, object, int]] = [
    ("POST", "/v1/embeddings", {"input": "hi"}, 200),
    ("POST", "/embeddings", {"input": ["a", "b"]}, 200),
    ("POST", "/embed", {"inputs": "hi"}, 200),
    ("POST", "/api/v1/embed", {"inputs": ["hi"]}, 200),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"]}, 200),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a"]}, 200),
    ("POST", "/tokenize", {"inputs": "hi"}, 200),
    ("POST", "/v1/embeddings/batch", {"requests": [{"id": "1", "input": "hi"}]}, 200),
    ("POST", "/v2/rerank", {"query": "q", "documents": ["a"]}, 200),
    ("POST", "/embed_all", {"inputs": "hi"}, 200),
    ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}, 200),
    ("POST", "/decode", {"ids": [101, 102]}, 200),
    ("POST", "/", {"inputs": "hi"}, 200),
    ("POST", "/api/embed", {"input": "hi"}, 200),
    ("POST", "/api/embed/batch", {"texts": ["a", "b"]}, 200),
    ("POST", "/api/rerank", {"query": "q", "documents": ["a"]}, 200),
    ("GET", "/api/embedders", None, 200),
    ("GET", "/api/rerankers", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("GET", "/api/v1/providers", None, 403),  # no admin secret: the admin API is off
    ("POST", "/api/v1/providers", {"provider": {}}, 403),
    ("GET", "/api/v1/status", None, 403),
    ("GET", "/health", None, 200),
    ("GET", "/health/live", None, 200),
    ("GET", "/health/ready", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/info", None, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/nope", None, 404),
    ("GET", "/embed", None, 405),
]


class SeenItems(NullObserver):
    """A batch observer that keeps every item its batcher started."""

    def __init__(self) -> None:
        self.items: list[Item[Any, Any]] = []

    def on_batch_started(self, items: Sequence[Item[Any, Any]]) -> None:
        self.items.extend(items)


def local_factory(backend: FakeBackend, seen: SeenItems) -> Any:
    """An embedder and a reranker (the default model's tokenizer, ``backend`` for vectors and
    scores), and an empty provider router."""

    def factory(settings: Settings) -> Gateway:
        path, sha = resolve_model_dir(DEFAULT_MODEL_ID)
        spec = load_spec(DEFAULT_MODEL_ID, path, sha=sha)
        tok = TextTokenizer.from_dir(
            path, max_length=spec.max_input_length, vocab_size=spec.vocab_size
        )
        options = LocalModelOptions.from_settings(settings, spec, run_tokens=None)
        embedder = LocalEmbeddingModel(spec, tok, backend, options, observers=[seen])
        reranker = LocalRerankModel(
            dataclasses.replace(spec, kind=ModelKind.RERANKER),
            tok,
            FakeBackend(backend.dim, delay=backend.delay, kind=ModelKind.RERANKER),
            dataclasses.replace(options, name="reranker"),
            observers=[seen],
        )
        return Gateway([embedder, reranker], router=Router([]))

    return factory


@asynccontextmanager
async def serve(
    settings: Settings | None = None,
    *,
    backend: FakeBackend | None = None,
    seen: SeenItems | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = settings or Settings.load(None, served_model_name="embedder")
    factory = local_factory(backend or FakeBackend(16), seen or SeenItems())
    app = create_app(settings, gateway_factory=factory, telemetry=telemetry)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def pipeline_of(app: FastAPI) -> Pipeline:
    assert isinstance(app, EmbedplexApp)
    assert isinstance(app.edge, Pipeline)
    return app.edge


class Spy:
    """A stage inserted by a test: notes every request it sees, and the tenant so far."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, Tenant]] = []

    def enter(self, ex: Exchange) -> None:
        self.seen.append((ex.method, ex.path, ex.state["request_id"], ex.tenant))


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: object, **kw: Any
) -> httpx.Response:
    return await client.request(method, path, json=body, **kw)


async def test_every_route_passes_the_one_chain() -> None:
    async with serve() as (app, client):
        spy = Spy()
        pipeline_of(app).stages.append(spy)  # last: after request id, limits, auth, admission
        for i, (method, path, body, status) in enumerate(ROUTES):
            r = await call(client, method, path, body, headers={"x-request-id": f"req-{i}"})
            assert r.status_code == status, (path, r.text)
            assert r.headers["x-request-id"] == f"req-{i}", path
    assert spy.seen == [
        (method, path, f"req-{i}", ANONYMOUS) for i, (method, path, _, _) in enumerate(ROUTES)
    ]


class DenyMarked:
    """A stage that refuses requests carrying ``x-deny`` (as a per-key rate limit would)."""

    def enter(self, ex: Exchange) -> None:
        if ex.header(b"x-deny") is not None:
            raise RateLimitedError("denied by the test stage", retry_after=7)


async def test_a_stage_added_once_applies_to_every_route() -> None:
    async with serve() as (app, client):
        pipeline_of(app).stages.append(DenyMarked())
        for method, path, body, _ in ROUTES:
            r = await call(client, method, path, body, headers={"x-deny": "1"})
            assert r.status_code == 429, path
            assert r.headers["retry-after"] == "7"
            assert "x-request-id" in r.headers
            text = r.json()["error"]
            message = text["message"] if isinstance(text, dict) else text
            assert message == "denied by the test stage"
        # Without the header, the stage lets them through.
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 200


async def test_a_stage_may_wait() -> None:
    """An asynchronous stage (a key store, a shared limiter) is awaited in its turn."""

    class Slow:
        def __init__(self) -> None:
            self.done = 0

        async def _wait(self) -> None:
            await asyncio.sleep(0)
            self.done += 1

        def enter(self, ex: Exchange) -> Any:
            return self._wait()

    async with serve() as (app, client):
        slow = Slow()
        pipeline_of(app).stages.append(slow)
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 200
        assert (await client.get("/info")).status_code == 200
    assert slow.done == 2


def failures(metrics: dict[Any, float], route: str, error_type: str, model: str = "-") -> float:
    key = (
        "embedplex_request_failures_total",
        tuple(sorted({"route": route, "model": model, "error_type": error_type}.items())),
    )
    return metrics.get(key, 0.0)


async def test_auth_refusal_and_413_look_and_count_the_same_everywhere() -> None:
    settings = Settings.load(None, api_key=KEY, payload_limit=1024)
    big = b'{"inputs": "' + b"x" * 2000 + b'"}'
    async with serve(settings) as (_, client):
        # The same refusal, by a JSON route (/embed) and by a FastAPI route (/info): TEI shape.
        fast = await client.post("/embed", json={"inputs": "x"})
        other = await client.get("/info")
        assert fast.status_code == other.status_code == 401
        assert (
            fast.json()
            == other.json()
            == {
                "error": "missing or invalid API key",
                "error_type": "Unauthorized",
            }
        )
        wrong = await client.post(
            "/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer nope"}
        )
        models = await client.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == models.status_code == 401
        assert wrong.json() == models.json()
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        # Bodies over the limit: by Content-Length on both kinds, and while streaming.
        fast_big = await client.post("/embed", content=big, headers=AUTH)
        other_big = await client.request("GET", "/info", content=big, headers=AUTH)

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it comes
            for _ in range(10):
                yield b" " * 512

        streamed = await client.post("/embed", content=chunks(), headers=AUTH)
        for r in (fast_big, other_big, streamed):
            assert r.status_code == 413
            assert r.json() == {
                "error": "request body exceeds the 1024 byte limit",
                "error_type": "Validation",
            }
        assert (await client.post("/embed", json={"inputs": "x"}, headers=AUTH)).status_code == 200
        metrics = parse_metrics((await client.get("/metrics", headers=AUTH)).text)
    for route in ("/embed", "/info"):
        assert failures(metrics, route, "authentication") == 1, route
    assert failures(metrics, "/embed", "payload_too_large") == 2
    assert failures(metrics, "/info", "payload_too_large") == 1
    assert failures(metrics, "/embed", "validation") == 0


async def test_a_body_streamed_into_a_fastapi_route_is_limited_too() -> None:
    settings = Settings.load(None, payload_limit=1024)
    async with serve(settings) as (app, client):

        @app.post("/echo-test")  # not a JSON route of the pipeline: FastAPI reads the body
        async def echo(request: Request) -> Response:
            return Response(await request.body())

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 512

        small = await client.post("/echo-test", content=b"hello")
        streamed = await client.post("/echo-test", content=chunks())
    assert small.status_code == 200 and small.content == b"hello"
    assert streamed.status_code == 413
    assert streamed.json()["error_type"] == "Validation"
    assert "x-request-id" in streamed.headers


async def test_access_log_and_metrics_for_json_and_fastapi_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="embedplex.access")
    async with serve() as (_, client):
        await client.post("/embed", json={"inputs": "x"}, headers={"x-request-id": "a"})
        await client.get("/info", headers={"x-request-id": "b"})
        await client.get("/nope", headers={"x-request-id": "c"})
        await client.get("/health/ready")  # probes pass the chain but are not logged
        metrics = parse_metrics((await client.get("/metrics")).text)
    lines = [r.__dict__ for r in caplog.records if r.name == "embedplex.access"]
    assert [(x["request_id"], x["route"], x["status"], x["error_type"]) for x in lines] == [
        ("a", "/embed", 200, None),
        ("b", "/info", 200, None),
        ("c", "unmatched", 404, "not_found"),
    ]
    ok = "embedplex_request_success_total"
    assert metrics[(ok, (("model", "embedder"), ("route", "/embed")))] == 1
    assert metrics[(ok, (("model", "-"), ("route", "/info")))] == 1
    assert failures(metrics, "unmatched", "not_found") == 1


BAD_JSON = [b"{bad json", b'{"inputs": "\xff\xfe"}', b'{"query": "\\ud800", "x": "\\udfff"}', b""]


@pytest.mark.parametrize("path", sorted(JSON_ROUTES))
async def test_bad_json_is_400_on_every_json_route(path: str) -> None:
    async with serve(Settings.load(None, admin_secret="test-admin-secret")) as (_, client):
        for body in BAD_JSON:
            headers = {
                "content-type": "application/json",
                "authorization": "Bearer test-admin-secret",
            }
            r = await client.post(path, content=body, headers=headers)
            data = r.json()
            if path.startswith(("/v1/embeddings", "/embeddings")):
                # No body is a missing field (as FastAPI says): OpenAI's 400 all the same.
                assert r.status_code == 400, (path, body, r.text)
                code = "invalid_value" if body == b"" else "invalid_json"
                assert data["error"]["code"] == code
            else:
                expected = 422 if body == b"" else 400  # no body: a missing field
                assert r.status_code == expected, (path, body, r.text)
                assert data["error_type"] == "Validation"


async def test_a_body_in_a_content_coding_is_415_on_every_json_route() -> None:
    """A gzip body was read as JSON (a misleading 400), a br-labelled plain one was served."""
    import gzip

    plain = b'{"input": "hi", "inputs": "hi"}'
    async with serve() as (_, client):
        for path in ("/v1/embeddings", "/embed"):
            zipped = await client.post(
                path,
                content=gzip.compress(plain),
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            )
            labelled = await client.post(
                path,
                content=plain,
                headers={"content-type": "application/json", "content-encoding": "br"},
            )
            identity = await client.post(
                path,
                content=b'{"input": "hi"}' if path.startswith("/v1") else b'{"inputs": "hi"}',
                headers={"content-type": "application/json", "content-encoding": "Identity"},
            )
            assert zipped.status_code == labelled.status_code == 415, (path, zipped.text)
            assert identity.status_code == 200, (path, identity.text)
            if path.startswith("/v1"):
                assert zipped.json()["error"]["code"] == "unsupported_media_type"
            else:
                assert zipped.json()["error"].startswith("Content-Encoding 'gzip' is not supported")


async def test_a_bad_request_timeout_header_is_400_named_for_the_header() -> None:
    """Not ``invalid_json`` (the body is fine), in each dialect's shape; probes ignore it."""
    bad = {"x-request-timeout": "abc"}
    async with serve() as (_, client):
        openai = await client.post("/v1/embeddings", json={"input": "hi"}, headers=bad)
        tei = await client.post("/embed", json={"inputs": "hi"}, headers=bad)
        zero = await client.post(
            "/embed", json={"inputs": "hi"}, headers={"x-request-timeout": "0"}
        )
        ready = await client.get("/health/ready", headers={"x-request-timeout": "0"})
        live = await client.get("/health/live", headers=bad)
        fine = await client.post(
            "/embed", json={"inputs": "hi"}, headers={"x-request-timeout": "5"}
        )
    assert openai.status_code == tei.status_code == zero.status_code == 400
    assert openai.json()["error"]["code"] == "invalid_header"
    assert openai.json()["error"]["param"] == "X-Request-Timeout"
    assert tei.json() == {
        "error": "X-Request-Timeout must be a positive number of seconds",
        "error_type": "Validation",
    }
    assert ready.status_code == live.status_code == fine.status_code == 200


async def test_admin_guard_runs_before_the_body_is_read() -> None:
    async with serve(Settings.load(None, admin_secret="test-admin-secret")) as (_, client):
        anonymous = await client.post("/api/v1/providers", content=b"{bad json")
        wrong = await client.post(
            "/api/v1/providers", json={"provider": {}}, headers={"authorization": "Bearer x"}
        )
        allowed = await client.post(
            "/api/v1/providers",
            json={"provider": {}},
            headers={"authorization": "Bearer test-admin-secret"},
        )
    assert anonymous.status_code == wrong.status_code == 401
    assert allowed.status_code == 422  # past the guard, the body is checked


def test_json_routes_are_the_fastapi_post_routes() -> None:
    """The pipeline serves exactly the POST routes FastAPI documents, with the same handlers
    and body schemas; a route with a dependency names it as its guard."""
    posts = {
        route.path: route
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }
    assert set(posts) == set(JSON_ROUTES)
    for path, route in posts.items():
        served = JSON_ROUTES[path]
        assert served.handler is route.endpoint, path
        assert route.body_field is not None
        assert served.schema is route.body_field.field_info.annotation, path
        guards = [d.call for d in route.dependant.dependencies]
        assert guards == ([served.guard] if served.guard else []), path


def test_an_empty_api_key_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="empty"):
        create_app(Settings.load(None, api_key=""))


def test_an_empty_admin_secret_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="admin_secret is set but empty"):
        Settings.load(None, admin_secret="")


@pytest.mark.parametrize(("key", "tenant_key"), [(None, None), (KEY, "static")])
async def test_the_tenant_reaches_the_local_batchers_items(
    key: str | None, tenant_key: str | None
) -> None:
    seen = SeenItems()
    settings = Settings.load(None, served_model_name="embedder", api_key=key)
    async with serve(settings, seen=seen) as (_, client):
        assert (
            await client.post("/v1/embeddings", json={"input": ["a", "b"]}, headers=AUTH)
        ).status_code == 200
        assert (await client.post("/embed", json={"inputs": "c"}, headers=AUTH)).status_code == 200
        r = await client.post("/rerank", json={"query": "q", "texts": ["d", "e"]}, headers=AUTH)
        assert r.status_code == 200
    assert len(seen.items) == 5
    assert {(i.tenant_key, i.priority) for i in seen.items} == {(tenant_key, Priority.INTERACTIVE)}


class RemoteSpy(NullObserver):
    def __init__(self) -> None:
        self.items: list[Item[Any, Any]] = []

    def on_batch_started(self, items: Sequence[Item[Any, Any]]) -> None:
        self.items.extend(items)


async def test_the_tenant_reaches_the_remote_lanes_items() -> None:
    spy = RemoteSpy()
    with running_upstream() as upstream:
        config = provider("up", upstream)

        def factory(settings: Settings) -> Gateway:
            router = Router([config], observers=[spy], probe_interval=3600, idle_ttl=3600)
            return Gateway([RemoteModel(router, route)], router=router)

        route = RouteConfig(model="remote", providers=["up"])
        settings = Settings.load(
            None, local_model=False, api_key=KEY, routes=[route], providers=[config]
        )
        app = create_app(settings, gateway_factory=factory)
        async with app.router.lifespan_context(app):
            await app.state.loader
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post(
                    "/v1/embeddings", json={"model": "remote", "input": ["a", "b"]}, headers=AUTH
                )
                assert r.status_code == 200, r.text
                batch = await client.post(
                    "/v1/embeddings/batch",
                    json={"requests": [{"id": "x", "input": "c", "provider": "up"}]},
                    headers=AUTH,
                )
                assert batch.status_code == 200, batch.text
    assert len(spy.items) == 3
    assert {(i.tenant_key, i.priority) for i in spy.items} == {("static", Priority.INTERACTIVE)}


async def test_a_client_that_leaves_is_499_and_its_work_is_dropped() -> None:
    seen = SeenItems()
    backend = FakeBackend(16, delay=0.3)
    one_stream = Settings.load(None, served_model_name="embedder", inference_streams=1)
    async with serve(one_stream, backend=backend, seen=seen) as (app, client):
        busy = asyncio.create_task(client.post("/embed", json={"inputs": "first"}))
        await eventually(lambda: bool(backend.batches))  # the backend is busy with the first
        sent: list[dict[str, Any]] = []
        left = asyncio.Event()
        messages = [{"type": "http.request", "body": b'{"inputs": "second"}', "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/embed",
            "raw_path": b"/embed",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        second = asyncio.create_task(app(scope, receive, send))
        await eventually(lambda: app.state.gateway.stats()["embedder"]["queued"] == 1)
        left.set()
        await second
        assert (await busy).status_code == 200
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert sent[0]["status"] == 499
    assert failures(metrics, "/embed", "client_gone", model="embedder") == 1
    assert [i.payload.text for i in seen.items] == ["first"]  # the second input never ran
    assert len(backend.batches) == 1


async def test_tracing_keeps_the_one_chain_and_spans_every_kind_of_route() -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_settings(Settings.load(None), span_exporter=exporter)
    async with serve(telemetry=telemetry) as (app, client):
        assert isinstance(pipeline_of(app), Pipeline)
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 200
        assert (await client.get("/info")).status_code == 200
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"POST /embed", "GET /info"} <= names


async def test_cors_wraps_the_pipeline() -> None:
    settings = Settings.load(None, api_key=KEY, cors_allow_origins=["https://a.example"])
    async with serve(settings) as (_, client):
        origin = {"origin": "https://a.example"}
        preflight = await client.options(
            "/embed", headers={**origin, "access-control-request-method": "POST"}
        )
        refused = await client.post("/embed", json={"inputs": "x"}, headers=origin)
        ok = await client.post("/embed", json={"inputs": "x"}, headers={**origin, **AUTH})
    assert preflight.status_code == 200  # answered before authentication: it carries no key
    assert refused.status_code == 401
    for r in (refused, ok):
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert "x-request-id" in r.headers
    assert ok.status_code == 200
