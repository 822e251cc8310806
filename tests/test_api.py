"""The HTTP layer with a fake backend: shapes of both dialects, errors, headers, limits."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import numpy as np
import pytest

from embedplex.api.app import AppState
from embedplex.backends.fake import FakeBackend
from embedplex.gateway import Gateway
from helpers import fake_app, running

JSON = {"content-type": "application/json"}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(dim=16)


async def test_openai_embeddings_float_shape(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        r = await client.post(
            "/v1/embeddings", json={"input": ["hello world", "cat"], "model": "x"}
        )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == str(tiny_model_dir)
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    vec = np.array(body["data"][0]["embedding"])
    assert vec.shape == (16,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    # [CLS] hello world [SEP] + [CLS] cat [SEP]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    for header in ("x-queue-time", "x-tokenization-time", "x-inference-time", "x-total-time"):
        assert float(r.headers[header]) >= 0


async def test_openai_base64_is_little_endian_float32(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        f = await client.post("/v1/embeddings", json={"input": "hello", "model": "m"})
        b = await client.post(
            "/v1/embeddings", json={"input": "hello", "model": "m", "encoding_format": "base64"}
        )
    decoded = np.frombuffer(base64.b64decode(b.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, f.json()["data"][0]["embedding"], atol=1e-7)


async def test_openai_null_encoding_format_is_float(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    """OpenAI takes an explicit null as float (LiteLLM and Dify send one), on both routes."""
    async with running(fake_app(tiny_model_dir, backend)) as client:
        f = await client.post("/v1/embeddings", json={"input": "hello", "model": "m"})
        n = await client.post(
            "/v1/embeddings", json={"input": "hello", "model": "m", "encoding_format": None}
        )
        batch = await client.post(
            "/v1/embeddings/batch",
            json={"requests": [{"id": "a", "input": "hello", "encoding_format": None}]},
        )
    assert n.status_code == batch.status_code == 200, (n.text, batch.text)
    assert n.json()["data"] == f.json()["data"]
    assert batch.json()["results"][0]["data"] == f.json()["data"]


async def test_openai_token_id_inputs(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        text = await client.post("/embed", json={"inputs": "hello world"})
        ids = await client.post("/v1/embeddings", json={"input": [2, 18, 19, 3], "model": "m"})
        nested = await client.post("/v1/embeddings", json={"input": [[2, 18, 19, 3], [2, 3]]})
        bad = await client.post("/v1/embeddings", json={"input": [2, 99999]})
    assert np.allclose(ids.json()["data"][0]["embedding"], text.json()[0], atol=1e-6)
    assert len(nested.json()["data"]) == 2
    assert bad.status_code == 400  # OpenAI's status for an invalid request
    assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_dimensions_truncate_then_normalize(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        full = (await client.post("/embed", json={"inputs": "hello", "normalize": False})).json()[0]
        cut = (await client.post("/embed", json={"inputs": "hello", "dimensions": 4})).json()[0]
        oai = await client.post("/v1/embeddings", json={"input": "hello", "dimensions": 4})
    expected = np.array(full[:4]) / np.linalg.norm(full[:4])
    assert np.allclose(cut, expected, atol=1e-6)
    assert np.allclose(oai.json()["data"][0]["embedding"], expected, atol=1e-6)


async def test_tei_embed_and_native_shapes(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        tei = await client.post("/embed", json={"inputs": ["a cat", "a dog"], "normalize": True})
        native = await client.post("/api/v1/embed", json={"inputs": ["a cat", "a dog"]})
    assert tei.status_code == 200
    assert len(tei.json()) == 2 and len(tei.json()[0]) == 16
    assert native.json() == {"body": tei.json()}


async def test_tokenize_info_health(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        tok = await client.post("/tokenize", json={"inputs": "Hello world"})
        info = await client.get("/info")
        health = await client.get("/health")
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
        models = await client.get("/v1/models")
    assert tok.json() == [
        [
            {"id": 2, "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": 18, "text": "Hello", "special": False, "start": 0, "stop": 5},
            {"id": 19, "text": "world", "special": False, "start": 6, "stop": 11},
            {"id": 3, "text": "[SEP]", "special": True, "start": None, "stop": None},
        ]
    ]
    data = info.json()
    assert data["model_type"] == {"embedding": {"pooling": "mean"}}
    assert data["max_input_length"] == 32
    assert data["max_client_batch_size"] == 2048
    assert health.status_code == live.status_code == ready.status_code == 200
    assert models.json()["data"][0]["id"] == str(tiny_model_dir)


async def test_a_large_tokenize_answer_is_built_off_the_event_loop(
    tiny_model_dir: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past TOKENS_ON_LOOP tokens the answer's JSON is built in a thread (the largest took
    ~140 ms of the loop), and it is the same answer, row by row, as one built on the loop."""
    from embedplex.api.routes import tei

    built: list[tuple[int, bool]] = []
    rows = tei._token_rows

    def spy(tokens: list[list[object]]) -> bytes:
        built.append((sum(map(len, tokens)), threading.current_thread() is main))
        return rows(tokens)  # type: ignore[arg-type]

    main = threading.current_thread()
    monkeypatch.setattr(tei, "_token_rows", spy)
    large = "a " * 3_000  # 3,002 tokens with [CLS] and [SEP]: over TOKENS_ON_LOOP
    async with running(fake_app(tiny_model_dir, backend)) as client:
        small = await client.post("/tokenize", json={"inputs": ["Hello world", "cat"]})
        big = await client.post("/tokenize", json={"inputs": ["Hello world", large]})
    assert small.status_code == big.status_code == 200
    assert built == [(4 + 3, True), (4 + 3_002, False)]
    assert tei.TOKENS_ON_LOOP < 3_006
    assert big.json()[0] == small.json()[0]
    second = big.json()[1]
    assert len(second) == 3_002
    assert second[0] == {"id": 2, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert second[-1] == {"id": 3, "text": "[SEP]", "special": True, "start": None, "stop": None}
    assert [t["start"] for t in second[1:-1]] == list(range(0, 6_000, 2))
    assert {t["text"] for t in second[1:-1]} == {"a"}


async def test_truncation(tiny_model_dir: Path, backend: FakeBackend) -> None:
    long_text = " ".join(["cat"] * 40)  # 42 tokens, max is 32
    async with running(fake_app(tiny_model_dir, backend, auto_truncate=False)) as client:
        refused = await client.post("/embed", json={"inputs": long_text})
        oai_refused = await client.post("/v1/embeddings", json={"input": long_text})
        right = await client.post("/embed", json={"inputs": long_text, "truncate": True})
        left = await client.post(
            "/embed", json={"inputs": long_text, "truncate": True, "truncation_direction": "Left"}
        )
    assert refused.status_code == 422
    assert refused.json()["error_type"] == "Validation"
    assert "32" in refused.json()["error"]
    assert oai_refused.status_code == 400  # OpenAI's status for it
    assert oai_refused.json()["error"]["code"] == "context_length_exceeded"
    assert right.status_code == left.status_code == 200
    assert backend.batches[-1][1] == 32 and backend.batches[-2][1] == 32


async def test_auto_truncate_is_on_by_default(tiny_model_dir: Path, backend: FakeBackend) -> None:
    """As in TEI 1.9: a request that does not say is truncated; ``truncate: false`` refuses."""
    long_text = " ".join(["dog"] * 40)  # 42 tokens, max is 32
    async with running(fake_app(tiny_model_dir, backend)) as client:
        r = await client.post("/v1/embeddings", json={"input": long_text})
        tei = await client.post("/embed", json={"inputs": long_text})
        explicit = await client.post("/embed", json={"inputs": long_text, "truncate": False})
    assert r.status_code == tei.status_code == 200
    assert backend.batches[0][1] == backend.batches[1][1] == 32
    assert explicit.status_code == 422
    assert explicit.json()["error_type"] == "Validation"


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/embed", b'{"inputs": ', 400, "JSON"),
        ("/embed", b'{"inputs": "\xff\xfe"}', 400, ""),
        ("/embed", b'{"inputs": 5}', 422, "inputs"),
        ("/embed", b'{"inputs": ["a", 5]}', 422, "inputs"),
        ("/embed", b'{"inputs": []}', 400, "empty"),
        ("/embed", b'{"inputs": "a", "dimensions": -1}', 422, "dimensions"),
        ("/embed", b'{"inputs": "a", "dimensions": 17}', 422, "dimensions"),
        ("/embed", b'{"inputs": "a", "dimensions": 1e400}', 422, "dimensions"),
        ("/embed", b'{"inputs": "a", "dimensions": 99999999999999999999999}', 422, "dimensions"),
        ("/embed", b'{"inputs": "a", "truncation_direction": "Up"}', 422, "truncation_direction"),
        ("/embed", b'{"inputs": "a", "prompt_name": "nope"}', 422, "prompt_name"),
        ("/embed", b"[1, 2]", 422, ""),
        ("/v1/embeddings", b'{"input": ', 400, "JSON"),
        # OpenAI answers 400 where TEI answers 422.
        ("/v1/embeddings", b'{"input": null}', 400, "input"),
        ("/v1/embeddings", b'{"input": "a", "encoding_format": "int8"}', 400, "encoding_format"),
        ("/v1/embeddings", b'{"input": [[]]}', 400, "token ids"),
        ("/v1/embeddings", b'{"input": [-1]}', 400, "vocabulary"),
        ("/tokenize", b'{"inputs": []}', 400, "empty"),
        # A lone surrogate is not text: invalid JSON (400) on every route alike.
        ("/embed", b'{"inputs": ["ok", "\\ud800"]}', 400, "JSON"),
        ("/tokenize", b'{"inputs": "\\udfff"}', 400, "JSON"),
        ("/rerank", b'{"query": "\\ud800", "texts": ["a"]}', 400, "JSON"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(
    tiny_model_dir: Path, backend: FakeBackend, path: str, body: bytes, status: int, fragment: str
) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        r = await client.post(path, content=body, headers=JSON)
    assert r.status_code == status, r.text
    data = r.json()
    if path.startswith("/v1"):
        message = data["error"]["message"]
        assert set(data["error"]) == {"message", "type", "param", "code"}
    else:
        message = data["error"]
        assert set(data) == {"error", "error_type"}
    assert fragment.lower() in message.lower()


# A field of another server's API, or a newer TEI's, in each TEI body (and its nested objects).
UNKNOWN = {"top_n": 3, "encoding_format": "float", "nested": {"a": [1, 2]}}
TEI_BODIES: list[tuple[str, dict[str, object], dict[str, object]]] = [
    ("/embed", {"inputs": ["a b", "c"], "normalize": False}, UNKNOWN),
    ("/api/v1/embed", {"inputs": "a b"}, UNKNOWN),
    ("/tokenize", {"inputs": "a b", "add_special_tokens": False}, UNKNOWN),
    ("/embed_all", {"inputs": "a b"}, UNKNOWN),
    ("/decode", {"ids": [18, 19]}, UNKNOWN),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}, UNKNOWN),
    (
        "/similarity",
        {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {}},
        {"inputs": {"top_k": 1}, "parameters": {"normalize": True}},
    ),
    ("/", {"inputs": "a b"}, UNKNOWN),
]


def merged(body: dict[str, object], extra: dict[str, object]) -> dict[str, object]:
    out = dict(body)
    for key, value in extra.items():
        inner = out.get(key)
        out[key] = (
            {**inner, **value} if isinstance(inner, dict) and isinstance(value, dict) else value
        )
    return out


@pytest.mark.parametrize(("path", "body", "extra"), TEI_BODIES)
async def test_tei_routes_ignore_fields_they_do_not_know(
    tiny_model_dir: Path,
    backend: FakeBackend,
    path: str,
    body: dict[str, object],
    extra: dict[str, object],
) -> None:
    """As TEI does (serde without deny_unknown_fields): LiteLLM's ``huggingface/`` provider
    sends ``top_n``, ``huggingface_hub`` ``encoding_format``; they were a 422 here."""
    async with running(fake_app(tiny_model_dir, backend)) as client:
        plain = await client.post(path, json=body)
        extended = await client.post(path, json=merged(body, extra))
    assert plain.status_code == 200, plain.text
    assert extended.status_code == 200, extended.text
    assert extended.json() == plain.json()


@pytest.mark.parametrize(
    ("path", "prefix", "item"),
    [
        ("/embed", b'{"inputs": [', b"{}"),
        ("/v1/embeddings", b'{"input": [', b"{}"),
        ("/tokenize", b'{"inputs": [', b"1"),
        ("/rerank", b'{"query": "q", "texts": [', b"{}"),
        ("/v1/rerank", b'{"query": "q", "documents": [', b"1"),
        ("/v1/embeddings/batch", b'{"requests": [', b"{}"),
        ("/decode", b'{"ids": [', b'"x"'),
    ],
)
async def test_a_body_of_many_wrong_items_is_one_error_not_one_per_item(
    tiny_model_dir: Path, backend: FakeBackend, path: str, prefix: bytes, item: bytes
) -> None:
    """Each alternative of a union collected an error per item: 660,000 wrong items in a 2 MB
    body took 7-10 s of the event loop and ~2.4 GB to describe. Lists stop at their first."""
    body = prefix + b",".join([item] * 200_000) + b"]}"
    async with running(fake_app(tiny_model_dir, backend)) as client:
        r = await client.post(path, content=body, headers=JSON)
    assert r.status_code == (400 if path.startswith("/v1/embeddings") else 422), r.text
    data = r.json()
    error = data["error"]
    message = error["message"] if isinstance(error, dict) else error  # OpenAI's or TEI's shape
    more = message.rpartition("(and ")[2].split(" ")[0] if "(and " in message else "0"
    assert int(more) < 8, message


async def test_a_batch_request_leaves_its_model_slots_for_other_callers(
    tiny_model_dir: Path,
) -> None:
    """A batch's sub-requests each hold a concurrency slot: all at once, 40 of them took all 8
    slots (32 items came back overloaded, and another caller got 429). Now a quarter of the
    slots at a time: every item is answered, and the other caller is served meanwhile."""
    app = fake_app(tiny_model_dir, FakeBackend(dim=16, delay=0.02), max_concurrent_requests=8)
    batch = {"requests": [{"id": str(k), "input": f"text {k}"} for k in range(40)]}
    async with running(app) as client:
        sent = asyncio.ensure_future(client.post("/v1/embeddings/batch", json=batch))
        await asyncio.sleep(0.05)  # the batch is under way
        other = await client.post("/embed", json={"inputs": "someone else"})
        answered = await sent
    assert other.status_code == 200, other.text
    assert answered.status_code == 200
    results = answered.json()["results"]
    assert [r["id"] for r in results] == [str(k) for k in range(40)]
    assert all("error" not in r for r in results), [r for r in results if "error" in r][:2]


async def test_client_batch_size_limit_is_422(tiny_model_dir: Path, backend: FakeBackend) -> None:
    app = fake_app(tiny_model_dir, backend, max_client_batch_size=4)
    async with running(app) as client:
        r = await client.post("/embed", json={"inputs": ["a"] * 5})
        ok = await client.post("/embed", json={"inputs": ["a"] * 4})
    assert r.status_code == 422  # TEI 1.9 (413 before)
    assert r.json() == {
        "error": "batch size 5 > maximum allowed batch size 4",
        "error_type": "Validation",
    }
    assert ok.status_code == 200


async def test_payload_limit_is_413_json(tiny_model_dir: Path, backend: FakeBackend) -> None:
    app = fake_app(tiny_model_dir, backend, payload_limit=2048)
    async with running(app) as client:
        big = await client.post("/v1/embeddings", json={"input": "cat " * 1000})

        async def chunks():  # no content-length: counted while streaming
            for _ in range(10):
                yield b" " * 512

        streamed = await client.post("/embed", content=chunks(), headers=JSON)
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "payload_too_large"
    assert streamed.status_code == 413
    assert streamed.json()["error_type"] == "Validation"


async def test_unknown_route_and_method(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        missing = await client.get("/nope")
        method = await client.get("/embed")
    assert missing.status_code == 404 and "error_type" in missing.json()
    assert method.status_code == 405


async def test_request_id_is_echoed_or_generated(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        given = await client.get("/health/live", headers={"x-request-id": "abc-123"})
        made = await client.get("/health/live")
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32


async def test_api_key(tiny_model_dir: Path, backend: FakeBackend) -> None:
    app = fake_app(tiny_model_dir, backend, api_key="s3cret")
    async with running(app) as client:
        none = await client.post("/v1/embeddings", json={"input": "a"})
        wrong = await client.post(
            "/embed", json={"inputs": "a"}, headers={"authorization": "Bearer nope"}
        )
        right = await client.post(
            "/embed", json={"inputs": "a"}, headers={"authorization": "Bearer s3cret"}
        )
        probe = await client.get("/health/ready")
    assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "Unauthorized"
    assert right.status_code == 200
    assert probe.status_code == 200


async def test_backend_failure_is_424_and_dead_backend_flips_readiness(
    tiny_model_dir: Path, backend: FakeBackend
) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        backend.fail_next = 1
        failed = await client.post("/embed", json={"inputs": "a"})
        again = await client.post("/embed", json={"inputs": "a"})
        backend.die()
        dead = await client.post("/embed", json={"inputs": "a"})
        ready = await client.get("/health/ready")
        health = await client.get("/health")
        after = await client.post("/v1/embeddings", json={"input": "a"})
    assert failed.status_code == 424 and failed.json()["error_type"] == "Backend"
    assert "injected" not in failed.text
    assert again.status_code == 200
    assert dead.status_code == 424
    assert ready.status_code == 503 and "dead" in ready.json()["status"]
    assert health.status_code == 503 and health.json()["error_type"] == "Unhealthy"
    assert after.status_code == 503


async def test_not_ready_while_loading(tiny_model_dir: Path) -> None:
    import threading

    from embedplex.api.app import create_app
    from embedplex.config import Settings
    from embedplex.gateway import Gateway

    release = threading.Event()

    def slow_factory(settings: Settings) -> Gateway:
        release.wait(10)
        return Gateway()

    app = create_app(Settings(model_id=str(tiny_model_dir)), gateway_factory=slow_factory)
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            live = await client.get("/health/live")
            ready = await client.get("/health/ready")
            embed = await client.post("/v1/embeddings", json={"input": "a"})
        release.set()
    assert live.status_code == 200
    assert ready.status_code == 503 and ready.json() == {"status": "loading"}
    assert embed.status_code == 503


async def test_openapi_and_swagger(tiny_model_dir: Path, backend: FakeBackend) -> None:
    async with running(fake_app(tiny_model_dir, backend)) as client:
        spec = await client.get("/openapi.json")
        docs = await client.get("/docs")
        alias = await client.get("/swagger-ui")
    paths = spec.json()["paths"]
    for path in ("/v1/embeddings", "/embed", "/tokenize", "/info", "/health", "/api/v1/embed"):
        assert path in paths
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert alias.status_code == 307 and alias.headers["location"] == "/docs"


def test_app_state_keeps_the_gateway_as_starlette_state_does() -> None:
    state = AppState()
    assert getattr(state, "gateway", None) is None  # unset: an AttributeError, as in State
    first, second = Gateway(), Gateway()
    state.gateway = first
    assert state.gateway is first
    state.gateway = second  # replaced once the models have loaded
    assert state.gateway is second and list(state) == ["gateway"]
