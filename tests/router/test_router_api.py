"""The HTTP surface of the router: /v1/embeddings extensions, the batch API, status, admin."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.providers.config import RouteConfig
from upstream_fakes import FakeUpstream, Fault, provider, vector_for

SECRET = "s3cret-admin-secret"
ADMIN = {"authorization": f"Bearer {SECRET}"}


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield app, client


def router_settings(upstream: FakeUpstream, upstream2: FakeUpstream, **kw: Any) -> Settings:
    return Settings(
        local_model=False,
        admin_secret=SECRET,
        provider_key_envs=["NOPE_KEY"],
        provider_allowed_networks=["127.0.0.0/8"],  # the fake upstreams run on loopback
        providers=[
            provider("a", upstream, max_attempts=2),
            provider("b", upstream2, "voyage", max_attempts=1),
        ],
        routes=[
            RouteConfig(model="remote-x", providers=["a"]),
            RouteConfig(model="both", providers=["a", "b"], policy="all"),
        ],
        **kw,
    )


@pytest.fixture
async def client(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(router_settings(upstream, upstream2)) as (_, c):
        yield c


async def test_plain_openai_request_through_a_route_is_unchanged(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    r = await client.post("/v1/embeddings", json={"model": "remote-x", "input": ["hi", "yo"]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["model"] == "remote-x"
    assert r.headers["x-embedplex-provider"] == "a"
    for row, text in zip(body["data"], ["hi", "yo"], strict=True):
        np.testing.assert_array_equal(np.asarray(row["embedding"], np.float32), vector_for(text))
    assert upstream.calls[0].body["model"] == "a-model"


async def test_provider_fields_and_the_all_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"input": "hi", "provider": "b"})
    assert r.json()["provider"] == "b"
    r = await client.post(
        "/v1/embeddings",
        json={
            "input": ["hi"],
            "providers": ["a", "b"],
            "policy": "all",
            "encoding_format": "base64",
        },
    )
    body = r.json()
    assert set(body["providers"]) == {"a", "b"}
    for name in ("a", "b"):
        raw = base64.b64decode(body["providers"][name]["data"][0]["embedding"])
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), vector_for("hi"))
    assert body["data"] == body["providers"]["a"]["data"]
    r = await client.post("/v1/embeddings", json={"model": "both", "input": "hi"})
    assert set(r.json()["providers"]) == {"a", "b"}


async def test_unknown_provider_and_bad_policy(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"input": "hi", "provider": "nope"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    r = await client.post("/v1/embeddings", json={"input": "hi", "provider": "a", "policy": "x"})
    assert r.status_code == 400


async def test_upstream_429_reaches_the_caller_with_retry_after(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.script(*[Fault(status=429, retry_after="0.1")] * 2)
    r = await client.post("/v1/embeddings", json={"model": "remote-x", "input": "hi"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


async def test_upstream_failures_map_to_502_and_open_circuits_to_503(
    client: httpx.AsyncClient, upstream2: FakeUpstream
) -> None:
    upstream2.script(*[Fault(status=500)] * 5)
    codes = []
    for _ in range(6):
        r = await client.post("/v1/embeddings", json={"input": "hi", "provider": "b"})
        codes.append(r.status_code)
    assert codes == [502] * 5 + [503]
    assert len(upstream2.calls) == 5


async def test_batch_api_returns_results_and_errors_per_id(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    r = await client.post(
        "/v1/embeddings/batch",
        json={
            "requests": [
                {"id": "1", "input": ["hello", "there"], "providers": ["a"]},
                {"id": "2", "input": "world", "model": "remote-x", "dimensions": 4},
                {"id": "3", "input": "x", "providers": ["missing"]},
                {"id": "4", "input": "again", "provider": "a"},
            ]
        },
    )
    assert r.status_code == 200
    results = {res["id"]: res for res in r.json()["results"]}
    got = np.asarray(results["1"]["data"][1]["embedding"], np.float32)
    np.testing.assert_array_equal(got, vector_for("there"))
    assert len(results["2"]["data"][0]["embedding"]) == 4
    assert results["3"]["error"]["status"] == 404
    assert results["4"]["provider"] == "a"
    # Sub-requests with the same parameters shared one upstream call.
    assert sorted(len(c.texts) for c in upstream.calls) == [1, 3]


async def test_batch_api_validation(client: httpx.AsyncClient) -> None:
    dup = [{"id": "1", "input": "a", "provider": "a"}] * 2
    r = await client.post("/v1/embeddings/batch", json={"requests": dup})
    assert r.status_code == 400
    r = await client.post("/v1/embeddings/batch", json={"requests": []})
    assert r.status_code == 400


async def test_status_route_shows_queues_sizes_circuits_and_calls(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/embeddings", json={"model": "remote-x", "input": "hi"})
    assert (await client.get("/api/v1/status")).status_code == 401
    r = await client.get("/api/v1/status", headers=ADMIN)
    body = r.json()
    a = body["providers"]["a"]
    assert a["health"]["circuit"] == "closed"
    assert a["counters"]["upstream_calls"] == 1
    assert a["aimd"]["batch_size"] == a["max_batch_requests"]
    assert a["lanes"][0]["queued"] == 0
    assert body["models"]["remote-x"]["kind"] == "remote"


async def test_admin_api_adds_lists_and_removes_providers(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    new = {"name": "c", "type": "openai", "endpoint": upstream.url, "api_key_env": "NOPE_KEY"}
    r = await client.post("/api/v1/providers", json={"provider": new, "serve_as": "cee"})
    assert r.status_code == 401
    r = await client.post(
        "/api/v1/providers", json={"provider": new, "serve_as": "cee"}, headers=ADMIN
    )
    assert r.status_code == 201
    listed = (await client.get("/api/v1/providers", headers=ADMIN)).json()["data"]
    assert [p["name"] for p in listed] == ["a", "b", "c"]
    r = await client.post("/v1/embeddings", json={"model": "cee", "input": "hi"})
    assert r.headers["x-embedplex-provider"] == "c"
    r = await client.delete("/api/v1/providers/a", headers=ADMIN)
    assert r.status_code == 422  # route "both" needs it
    r = await client.delete("/api/v1/providers/c", headers=ADMIN)
    assert r.status_code == 200
    r = await client.post("/v1/embeddings", json={"model": "cee", "input": "hi"})
    assert r.status_code == 404


async def test_without_a_secret_the_admin_api_is_off(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    settings = router_settings(upstream, upstream2).model_copy(update={"admin_secret": None})
    async with serve(settings) as (_, client):
        for method, path in [
            ("GET", "/api/v1/providers"),
            ("GET", "/api/v1/status"),
            ("DELETE", "/api/v1/providers/a"),
        ]:
            r = await client.request(method, path, headers={"authorization": "Bearer x"})
            assert r.status_code == 403, path
            assert "admin API is off" in r.json()["error"]
        r = await client.post("/api/v1/providers", json={"provider": {}})
        assert r.status_code == 403
        listed = await client.post("/v1/embeddings", json={"model": "remote-x", "input": "hi"})
        assert listed.status_code == 200  # the data plane is untouched


async def test_openai_sdk_passes_routing_in_extra_body(client: httpx.AsyncClient) -> None:
    sdk = openai.AsyncOpenAI(
        api_key="unused", base_url="http://router/v1", http_client=client, max_retries=0
    )
    out = await sdk.embeddings.create(
        model="anything", input=["hi"], extra_body={"providers": ["b", "a"], "policy": "any"}
    )
    np.testing.assert_allclose(out.data[0].embedding, vector_for("hi"), rtol=1e-6)


async def test_tei_dialect_reaches_remote_models_too(client: httpx.AsyncClient) -> None:
    r = await client.post("/embed", json={"inputs": ["hi"], "model": "remote-x"})
    assert r.status_code == 200
    np.testing.assert_array_equal(np.asarray(r.json()[0], np.float32), vector_for("hi"))
    r = await client.post("/embed", json={"inputs": ["hi"], "model": "remote-x", "truncate": True})
    assert r.status_code == 422  # an openai-type provider cannot honour truncate
    assert r.json()["error_type"] == "Validation"


@pytest.mark.parametrize("admin_secret", [None, SECRET])
async def test_the_api_key_never_opens_the_admin_api(
    upstream: FakeUpstream, upstream2: FakeUpstream, admin_secret: str | None
) -> None:
    secret = SecretStr(admin_secret) if admin_secret else None
    settings = router_settings(upstream, upstream2).model_copy(
        update={"admin_secret": secret, "api_key": SecretStr("k")}
    )
    key = {"authorization": "Bearer k"}
    async with serve(settings) as (_, client):
        status = await client.get("/api/v1/status", headers=key)
        assert status.status_code == (403 if admin_secret is None else 401)
        change = await client.delete("/api/v1/providers/a", headers=key)
        assert change.status_code == status.status_code
        if admin_secret:
            assert (await client.get("/api/v1/status", headers=ADMIN)).status_code == 200
        r = await client.post(
            "/v1/embeddings", json={"model": "remote-x", "input": "hi"}, headers=key
        )
        assert r.status_code == 200


# What each provider type sends for a request's ``truncate`` (docs/router.md, What each
# adapter sends): None where the API has no field and nothing is sent.
_TRUNCATE_SENT = {
    "openai": ("truncate", {False: None}),
    "voyage": ("truncation", {True: True, False: False}),
    "cohere": ("truncate", {True: "END", False: "NONE"}),
    "tei": ("truncate", {True: True, False: False}),
}


async def test_truncate_on_v1_embeddings_reaches_each_provider_type_as_its_api_says(
    upstream: FakeUpstream,
) -> None:
    """``truncate: false`` is what OpenAI does (an over-long input is its 400), so an
    openai-type provider takes it and sends nothing; it answered 400 "does not support
    truncate", where the field was ignored before truncate reached providers. ``true`` it
    cannot honour: still refused, before any call."""
    settings = Settings(
        local_model=False,
        providers=[provider(kind, upstream, kind) for kind in _TRUNCATE_SENT],
        routes=[RouteConfig(model=f"via-{kind}", providers=[kind]) for kind in _TRUNCATE_SENT],
    )
    async with serve(settings) as (_, client):
        for kind, (field, sent) in _TRUNCATE_SENT.items():
            for truncate in (True, False):
                upstream.calls.clear()
                r = await client.post(
                    "/v1/embeddings",
                    json={"model": f"via-{kind}", "input": ["hi"], "truncate": truncate},
                )
                if truncate not in sent:
                    assert r.status_code == 400, (kind, truncate, r.text)
                    assert r.json()["error"]["param"] == "truncate"
                    assert f"provider {kind} ({kind}) does not support truncate" in r.text
                    assert upstream.calls == []
                    continue
                assert r.status_code == 200, (kind, truncate, r.text)
                np.testing.assert_array_equal(
                    np.asarray(r.json()["data"][0]["embedding"], np.float32), vector_for("hi")
                )
                (call,) = upstream.calls
                assert call.body.get(field) == sent[truncate], (kind, truncate, call.body)
                assert kind != "openai" or "truncate" not in call.body
        # Over OpenAI's length with truncate false: OpenAI's own refusal, a 400 to the caller.
        upstream.max_chars = 5
        r = await client.post(
            "/v1/embeddings",
            json={"model": "via-openai", "input": ["far too long"], "truncate": False},
        )
        assert r.status_code == 400, r.text
        assert "maximum context length" in r.text
