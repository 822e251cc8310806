"""Managed keys through the pipeline (fake backends): the admin API, 401s, 403s on every
kind of route, the static key beside managed ones, usage in metrics and the store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from embedplex.config import Settings
from helpers import running
from state_fixtures import pg_url, state_url  # noqa: F401  (fixtures)
from test_gateway_models import app_of, three

ADMIN = {"authorization": "Bearer keys-admin-secret"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def make_app(model_dir: Path, url: str, **overrides: Any) -> FastAPI:
    settings = Settings(state_url=url, admin_secret="keys-admin-secret", **overrides)
    return app_of(settings, three(model_dir))


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/v1/keys", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_keys_tenant_models_and_refusals_on_every_route(
    tiny_model_dir: Path,
    state_url: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(tiny_model_dir, state_url)
    async with running(app) as client:
        # No key exists yet: the quickstart needs none.
        assert (await client.post("/embed", json={"inputs": "hi"})).status_code == 200
        emb = await create(client, name="emb", models=["a"], rpm=60, priority="batch", weight=2)
        rr = await create(client, name="rr", models=["r*"])
        assert emb["key"].startswith(f"ep_{emb['id']}_")
        # From now on a key is required.
        missing = await client.post("/v1/embeddings", json={"input": "hi", "model": "a"})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await client.post("/embed", json={"inputs": "hi"}, headers=bearer("ep_x_y"))
        assert wrong.status_code == 401
        forged = emb["key"][:-3] + "abc"
        assert (
            await client.post("/embed", json={"inputs": "x"}, headers=bearer(forged))
        ).status_code == 401

        ok = await client.post(
            "/v1/embeddings", json={"input": ["a b"], "model": "a"}, headers=bearer(emb["key"])
        )
        assert ok.status_code == 200, ok.text
        caplog.set_level(logging.INFO, logger="embedplex.access")
        other = await client.post(
            "/v1/embeddings", json={"input": "hi", "model": "b"}, headers=bearer(emb["key"])
        )
        assert other.status_code == 403
        error = other.json()["error"]
        assert error["code"] == "model_not_allowed" and "'b'" in error["message"]
        assert emb["id"] in error["message"]
        # TEI dialect, the default model: "a" for an embed route, which rr may not use.
        tei = await client.post("/embed", json={"inputs": "hi"}, headers=bearer(rr["key"]))
        assert tei.status_code == 403 and tei.json()["error_type"] == "Forbidden"
        # Rerank routes: rr may, emb may not.
        body = {"query": "q", "texts": ["a", "b"]}
        assert (
            await client.post("/rerank", json=body, headers=bearer(rr["key"]))
        ).status_code == 200
        assert (
            await client.post("/rerank", json=body, headers=bearer(emb["key"]))
        ).status_code == 403
        v1 = {"model": "r", "query": "q", "documents": ["a"]}
        assert (
            await client.post("/v1/rerank", json=v1, headers=bearer(emb["key"]))
        ).status_code == 403
        # The batch route: per-item refusals.
        batch = await client.post(
            "/v1/embeddings/batch",
            json={
                "requests": [
                    {"id": "1", "input": "x", "model": "a"},
                    {"id": "2", "input": "y", "model": "b"},
                ]
            },
            headers=bearer(emb["key"]),
        )
        assert batch.status_code == 200, batch.text
        results = {r["id"]: r for r in batch.json()["results"]}
        assert results["1"]["object"] == "list"
        assert results["2"]["error"]["status"] == 403
        # Naming providers directly would bypass the list.
        adhoc = await client.post(
            "/v1/embeddings",
            json={"input": "x", "model": "a", "providers": ["up"]},
            headers=bearer(emb["key"]),
        )
        assert adhoc.status_code in (403, 422), adhoc.text

        # Key ids (never keys) in the log line and the metrics.
        lines = [r.getMessage() for r in caplog.records if r.name == "embedplex.access"]
        assert any(f"key={emb['id']}" in line for line in lines)
        assert not any(emb["key"] in line for line in lines)
        metrics = (
            await client.get("/metrics", headers=bearer(emb["key"]))
        ).text  # keys asked: /metrics too
        assert f'embedplex_key_requests_total{{key_id="{emb["id"]}"}}' in metrics
        assert f'embedplex_key_refusals_total{{key_id="{emb["id"]}"}}' in metrics
        assert emb["key"] not in metrics

        # Usage in the store after a flush.
        await app.state.usage.flush()
        usage = (await client.get("/api/v1/keys/usage?since=1h", headers=ADMIN)).json()["data"]
        mine = next(u for u in usage if u["key_id"] == emb["id"])
        assert mine["name"] == "emb" and mine["requests"] >= 5 and mine["refusals"] >= 3
        assert mine["inputs"] >= 1 and mine["tokens"] > 0

        # The list never shows a key; admin reads need the admin secret.
        listed = await client.get("/api/v1/keys", headers=ADMIN)
        assert listed.status_code == 200 and emb["key"] not in listed.text
        assert {k["name"] for k in listed.json()["data"]} == {"emb", "rr"}
        assert (await client.get("/api/v1/keys", headers=bearer(emb["key"]))).status_code == 401
        assert (await client.post("/api/v1/keys", json={"name": "z"})).status_code == 401

        # Rotate: the old key stops at once on this replica, the new one works.
        rotated = (
            await client.post("/api/v1/keys/rotate", json={"name": "emb"}, headers=ADMIN)
        ).json()
        assert rotated["id"] == emb["id"] and rotated["key"] != emb["key"]
        old = await client.post("/embed", json={"inputs": "x"}, headers=bearer(emb["key"]))
        assert old.status_code == 401
        new = await client.post("/embed", json={"inputs": "x"}, headers=bearer(rotated["key"]))
        assert new.status_code == 200
        # Revoke.
        assert (await client.delete("/api/v1/keys/emb", headers=ADMIN)).status_code == 200
        gone = await client.post("/embed", json={"inputs": "x"}, headers=bearer(rotated["key"]))
        # The words of an unknown key: a revoked row is refused before its hash is checked.
        assert gone.status_code == 401 and gone.json()["error"] == "invalid API key"
        assert (await client.delete("/api/v1/keys/emb", headers=ADMIN)).status_code == 404
        dup = await client.post("/api/v1/keys", json={"name": "rr"}, headers=ADMIN)
        assert dup.status_code == 422


async def test_static_key_beside_managed_keys_and_expiry(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    app = make_app(tiny_model_dir, url, api_key="static-secret")
    async with running(app) as client:
        # The static key alone, as before.
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 401
        r = await client.post("/embed", json={"inputs": "x"}, headers=bearer("static-secret"))
        assert r.status_code == 200
        short = await create(client, name="short", expires="1s")
        r = await client.post("/embed", json={"inputs": "x"}, headers=bearer(short["key"]))
        assert r.status_code == 200
        r = await client.post("/embed", json={"inputs": "x"}, headers=bearer("static-secret"))
        assert r.status_code == 200
        import asyncio

        await asyncio.sleep(1.2)
        r = await client.post("/embed", json={"inputs": "x"}, headers=bearer(short["key"]))
        assert r.status_code == 401 and "expired" in r.json()["error"]
        for expires in ("soon", "999999w", "36501d"):  # not a duration; past a date's range
            bad = await client.post(
                "/api/v1/keys", json={"name": "n", "expires": expires}, headers=ADMIN
            )
            assert bad.status_code == 422, bad.text


async def test_require_api_key_before_any_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = make_app(tiny_model_dir, f"sqlite:///{tmp_path / 's.db'}", require_api_key=True)
    async with running(app) as client:
        assert (await client.post("/embed", json={"inputs": "x"})).status_code == 401
        assert (await client.get("/health")).status_code == 200


async def test_key_admin_routes_need_an_admin_secret(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(state_url=f"sqlite:///{tmp_path / 's.db'}")
    async with running(app_of(settings, three(tiny_model_dir))) as client:
        listed = await client.get("/api/v1/keys")
        created = await client.post("/api/v1/keys", json={"name": "x"})
        rotated = await client.post("/api/v1/keys/rotate", json={"name": "x"})
    for r in (listed, created, rotated):
        assert r.status_code == 403 and "admin secret" in r.json()["error"], r.text


async def test_a_full_hash_queue_answers_429_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = make_app(tiny_model_dir, f"sqlite:///{tmp_path / 's.db'}")
    async with running(app) as client:
        known = await create(client, name="known")
        new = await create(client, name="new")
        ok = await client.post("/embed", json={"inputs": "x"}, headers=bearer(known["key"]))
        assert ok.status_code == 200
        # No room left in the queue for a hashing slot (a flood of new keys would fill it).
        app.state.keys._hash_waiters = 0
        tei = await client.post("/embed", json={"inputs": "x"}, headers=bearer(new["key"]))
        assert tei.status_code == 429 and tei.headers["retry-after"] == "1"
        assert tei.json()["error_type"] == "Overloaded"
        oai = await client.post(
            "/v1/embeddings", json={"input": "x", "model": "a"}, headers=bearer(new["key"])
        )
        assert oai.status_code == 429 and oai.json()["error"]["code"] == "overloaded"
        ok = await client.post("/embed", json={"inputs": "x"}, headers=bearer(known["key"]))
        assert ok.status_code == 200  # a key verified before is never queued


async def test_limits_past_the_columns_and_a_zero_lifetime_are_422(
    tiny_model_dir: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """On PostgreSQL (INTEGER columns) a limit past 2**31-1 was a 500; "0s" made a key that
    never expires."""
    app = make_app(tiny_model_dir, pg_url)
    async with running(app) as client:
        for field in ("rpm", "tpm", "max_concurrent"):
            r = await client.post(
                "/api/v1/keys", json={"name": "big", field: 3_000_000_000}, headers=ADMIN
            )
            assert r.status_code == 422, r.text
        most = await create(client, name="most", rpm=2**31 - 1, tpm=2**31 - 1)
        assert most["rpm"] == 2**31 - 1
        for zero in ("0s", "0d"):
            r = await client.post(
                "/api/v1/keys", json={"name": "z", "expires": zero}, headers=ADMIN
            )
            assert r.status_code == 422 and "more than 0" in r.text, r.text
        listed = (await client.get("/api/v1/keys", headers=ADMIN)).json()["data"]
        assert [k["name"] for k in listed] == ["most"]
