"""The admin API checks a provider completely before it changes anything (issue 14).

A bad definition, a key variable the operator did not list, or an endpoint in a network the
operator did not allow is a 422 that leaves no trace: the registry, the served models and
``GET /api/v1/providers`` are as before. Before this, several of these answered 500 and left
the provider half-added (one made ``GET /api/v1/providers`` fail until it was deleted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.config import Settings
from embedplex.providers.config import RouteConfig
from upstream_fakes import FakeUpstream, provider

SECRET = "admin-hardening-secret"
ADMIN = {"authorization": f"Bearer {SECRET}"}


@asynccontextmanager
async def serve(
    upstream: FakeUpstream, **kw: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with provider ``a`` (``kw["providers"]`` replaces it) served as ``served``."""
    kw.setdefault("providers", [provider("a", upstream)])
    settings = Settings(
        local_model=False,
        admin_secret=SECRET,
        routes=[RouteConfig(model="served", providers=["a"])],
        **kw,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


async def snapshot(app: FastAPI, client: httpx.AsyncClient) -> tuple[Any, ...]:
    listed = await client.get("/api/v1/providers", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    gw = app.state.gateway
    return (
        [p["name"] for p in listed.json()["data"]],
        sorted(m.name for m in gw.models),
        sorted(gw.router.runtimes),
    )


def good(upstream: FakeUpstream, **kw: Any) -> dict[str, Any]:
    return {"name": "new", "type": "openai", "endpoint": upstream.url, **kw}


BAD_DEFINITIONS: list[tuple[str, Any]] = [
    ("empty served name", lambda u: {"provider": good(u), "serve_as": ""}),
    ("served name with a space", lambda u: {"provider": good(u), "serve_as": "a b"}),
    ("served name clashes", lambda u: {"provider": good(u), "serve_as": "served"}),
    ("provider name clashes", lambda u: {"provider": good(u, name="a")}),
    ("empty provider name", lambda u: {"provider": good(u, name="")}),
    ("negative max_batch_size", lambda u: {"provider": good(u, max_batch_size=-1)}),
    ("huge max_batch_size", lambda u: {"provider": good(u, max_batch_size=10**30)}),
    ("huge max_concurrency", lambda u: {"provider": good(u, max_concurrency=10**12)}),
    ("huge timeout", lambda u: {"provider": good(u, timeout_s=1e300)}),
    ("min over max batch", lambda u: {"provider": good(u, min_batch_size=9, max_batch_size=2)}),
    ("unknown type", lambda u: {"provider": good(u, type="nope")}),
    ("tei without endpoint", lambda u: {"provider": {"name": "new", "type": "tei"}}),
    ("endpoint not a url", lambda u: {"provider": good(u, endpoint="not a url")}),
    ("endpoint ftp", lambda u: {"provider": good(u, endpoint="ftp://example.com/")}),
    ("endpoint with credentials", lambda u: {"provider": good(u, endpoint="http://u:p@1.1.1.1/")}),
    ("unknown field", lambda u: {"provider": good(u, shiny=True)}),
]


@pytest.mark.parametrize(("why", "make"), BAD_DEFINITIONS, ids=[b[0] for b in BAD_DEFINITIONS])
async def test_a_bad_definition_is_422_and_leaves_no_trace(
    upstream: FakeUpstream, why: str, make: Any
) -> None:
    async with serve(upstream, provider_allowed_networks=["127.0.0.0/8"]) as (app, client):
        before = await snapshot(app, client)
        r = await client.post("/api/v1/providers", json=make(upstream), headers=ADMIN)
        assert r.status_code == 422, (why, r.status_code, r.text)
        assert r.json()["error_type"] == "Validation"
        assert await snapshot(app, client) == before, why
        # And the same provider, well defined, still goes in afterwards.
        ok = await client.post(
            "/api/v1/providers", json={"provider": good(upstream)}, headers=ADMIN
        )
        assert ok.status_code == 201, ok.text


async def test_a_served_name_outside_the_allowed_models_leaves_no_trace(
    upstream: FakeUpstream,
) -> None:
    async with serve(
        upstream,
        provider_allowed_networks=["127.0.0.0/8"],
        allowed_embedding_models=["served", "team-*"],
    ) as (app, client):
        before = await snapshot(app, client)
        body = {"provider": good(upstream), "serve_as": "other"}
        r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert await snapshot(app, client) == before
        body = {"provider": good(upstream), "serve_as": "team-x"}
        assert (await client.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 201


async def test_a_key_may_come_only_from_a_listed_variable(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDPLEX_ADMIN_SECRET", "not-for-upstreams")
    monkeypatch.setenv("LISTED_KEY", "sk-listed")
    async with serve(
        upstream, provider_allowed_networks=["127.0.0.0/8"], provider_key_envs=["LISTED_KEY"]
    ) as (app, client):
        before = await snapshot(app, client)
        for env in ("EMBEDPLEX_ADMIN_SECRET", "HOME", "PATH"):
            body = {"provider": good(upstream, api_key_env=env)}
            r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
            assert r.status_code == 422, env
            assert "provider_key_envs" in r.json()["error"]
        assert await snapshot(app, client) == before
        body = {"provider": good(upstream, api_key_env="LISTED_KEY"), "serve_as": "new-model"}
        assert (await client.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 201
        r = await client.post("/v1/embeddings", json={"model": "new-model", "input": "hi"})
        assert r.status_code == 200
    assert upstream.calls[-1].headers.get("authorization") == "Bearer sk-listed"
    assert not any("not-for-upstreams" in str(c.headers) for c in upstream.calls)


REFUSED_ENDPOINTS = [
    "http://127.0.0.1:9/v1",  # loopback
    "http://localhost:9/v1",  # a name: resolved, and every address checked
    "http://10.0.0.7/v1",  # RFC 1918
    "http://192.168.1.1/v1",
    "http://172.16.0.1/v1",
    "http://100.64.0.1/v1",  # carrier-grade NAT
    "http://169.254.10.10/v1",  # link-local
    "http://[::1]:9/v1",
    "http://[fe80::1]/v1",
    "http://[fc00::1]/v1",  # unique local
    "http://0.0.0.0:9/v1",
]


@pytest.mark.parametrize("url", REFUSED_ENDPOINTS)
async def test_non_public_endpoints_are_refused_by_default(
    upstream: FakeUpstream, url: str
) -> None:
    async with serve(upstream) as (app, client):
        before = await snapshot(app, client)
        for field in ("endpoint", "rerank_endpoint"):
            fields = {field: url} if field == "endpoint" else {"rerank_endpoint": url}
            body = {"provider": {"name": "new", "type": "openai", **fields}}
            r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
            assert r.status_code == 422, (url, field, r.text)
            assert "provider_allowed_networks" in r.json()["error"]
        assert await snapshot(app, client) == before


METADATA = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://[::ffff:169.254.169.254]/",  # the same address, IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]/",  # and through NAT64
    "http://169.254.170.2/v2/credentials",
]


@pytest.mark.parametrize("url", METADATA)
async def test_the_metadata_address_is_never_allowed(upstream: FakeUpstream, url: str) -> None:
    everything = ["0.0.0.0/0", "::/0", "169.254.0.0/16", "fd00::/8"]
    async with serve(upstream, provider_allowed_networks=everything) as (app, client):
        before = await snapshot(app, client)
        body = {"provider": {"name": "new", "type": "openai", "endpoint": url}}
        r = await client.post("/api/v1/providers", json=body, headers=ADMIN)
        assert r.status_code == 422, (url, r.text)
        assert "metadata" in r.json()["error"]
        assert await snapshot(app, client) == before


async def test_allowed_networks_open_exactly_what_they_list(upstream: FakeUpstream) -> None:
    async with serve(upstream, provider_allowed_networks=["10.0.0.0/8"]) as (_, client):
        body = {"provider": good(upstream)}  # 127.0.0.1: not listed
        assert (await client.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 422
        body = {"provider": {"name": "lan", "type": "openai", "endpoint": "http://10.9.9.9/v1"}}
        assert (await client.post("/api/v1/providers", json=body, headers=ADMIN)).status_code == 201
