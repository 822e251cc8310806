"""A request's own priority (header and body) and the static key table (``[[api_keys]]``).

Both reach the batchers' items: what the fair queue schedules on (tests/test_fair_queue.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from test_pipeline import SeenItems, serve

from embedplex.config import Settings
from embedplex.core.tenant import Priority

BATCH, INTERACTIVE = Priority.BATCH, Priority.INTERACTIVE

SEARCH_KEY = "sk-search-0123456789abcdef"
NIGHTLY_KEY = "sk-nightly-0123456789abcdef"
STATIC = "sk-the-one-static-key"
KEYS = [
    {"id": "search", "key": SEARCH_KEY, "weight": 4},
    {"id": "nightly", "key": NIGHTLY_KEY, "priority": "batch"},
]

# Every embed and rerank body that takes ``priority``, with the rest of a valid request.
BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"input": ["a", "b"]}),
    ("/embed", {"inputs": "a"}),
    ("/api/v1/embed", {"inputs": ["a"]}),
    ("/api/embed", {"input": "a"}),
    ("/rerank", {"query": "q", "texts": ["a", "b"]}),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/api/rerank", {"query": "q", "documents": ["a"]}),
]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def keyed(**overrides: Any) -> Settings:
    return Settings.load(None, served_model_name="embedder", api_keys=KEYS, **overrides)


@pytest.mark.parametrize(("path", "body"), BODIES)
async def test_the_body_may_lower_a_requests_priority(path: str, body: dict[str, Any]) -> None:
    seen = SeenItems()
    async with serve(seen=seen) as (_, client):
        r = await client.post(path, json={**body, "priority": "batch"})
        assert r.status_code == 200, r.text
        lowered = list(seen.items)
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        r = await client.post(path, json={**body, "priority": "urgent"})
        assert r.status_code == (400 if path.startswith("/v1/embeddings") else 422), r.text
    assert lowered and {i.priority for i in lowered} == {BATCH}
    assert {i.priority for i in seen.items[len(lowered) :]} == {INTERACTIVE}


async def test_the_header_lowers_the_priority_on_every_route_kind() -> None:
    seen = SeenItems()
    header = {"x-embedplex-priority": "Batch"}
    async with serve(seen=seen) as (_, client):
        for path, body in BODIES:
            r = await client.post(path, json=body, headers=header)
            assert r.status_code == 200, (path, r.text)
        batch = await client.post(
            "/v1/embeddings/batch", json={"requests": [{"id": "1", "input": "x"}]}, headers=header
        )
        assert batch.status_code == 200, batch.text
    assert len(seen.items) >= len(BODIES) + 1
    assert {i.priority for i in seen.items} == {BATCH}


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/rerank"])
async def test_an_unknown_header_value_is_refused_in_the_routes_dialect(path: str) -> None:
    body = dict(BODIES)[path]
    async with serve() as (_, client):
        r = await client.post(path, json=body, headers={"x-embedplex-priority": "realtime"})
        health = await client.get("/health", headers={"x-embedplex-priority": "realtime"})
    assert r.status_code == (400 if path.startswith("/v1") else 422)  # OpenAI's 400, TEI's 422
    assert "X-Embedplex-Priority" in r.text
    assert health.status_code == 200  # probes ignore it


async def test_static_keys_are_tenants_with_their_priority_and_weight() -> None:
    seen = SeenItems()
    async with serve(keyed(api_key=STATIC), seen=seen) as (_, client):
        for key in (SEARCH_KEY, NIGHTLY_KEY, STATIC):
            r = await client.post("/v1/embeddings", json={"input": key[:9]}, headers=bearer(key))
            assert r.status_code == 200, r.text
        for headers in ({}, bearer("sk-search"), bearer(SEARCH_KEY + "x"), bearer("")):
            r = await client.post("/v1/embeddings", json={"input": "x"}, headers=headers)
            assert r.status_code == 401
            assert SEARCH_KEY not in r.text
        assert (await client.get("/health")).status_code == 200
    got = {(i.tenant_key, i.priority, i.weight) for i in seen.items}
    assert got == {
        ("search", INTERACTIVE, 4),
        ("nightly", BATCH, 1),
        ("static", INTERACTIVE, 1),
    }


async def test_a_request_never_raises_its_keys_priority() -> None:
    seen = SeenItems()
    async with serve(keyed(), seen=seen) as (_, client):
        nightly = bearer(NIGHTLY_KEY)
        r = await client.post(
            "/embed",
            json={"inputs": "a", "priority": "interactive"},
            headers={**nightly, "x-embedplex-priority": "interactive"},
        )
        assert r.status_code == 200, r.text
        r = await client.post(
            "/embed",
            json={"inputs": "b"},
            headers={**bearer(SEARCH_KEY), "x-embedplex-priority": "batch"},
        )
        assert r.status_code == 200, r.text
    assert [(i.tenant_key, i.priority) for i in seen.items] == [
        ("nightly", BATCH),
        ("search", BATCH),
    ]


def test_static_keys_are_checked_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="16 characters"):
        Settings.load(None, api_keys=[{"id": "a", "key": "short"}])
    with pytest.raises(ValidationError, match="unique"):
        Settings.load(None, api_keys=[{"id": "a", "key": SEARCH_KEY}, {"id": "a", "key": STATIC}])
    with pytest.raises(ValidationError, match="unique"):
        Settings.load(None, api_key=STATIC, api_keys=[{"id": "static", "key": SEARCH_KEY}])
    with pytest.raises(ValidationError, match="share one secret"):
        Settings.load(None, api_key=SEARCH_KEY, api_keys=[{"id": "a", "key": SEARCH_KEY}])
    with pytest.raises(ValidationError):
        Settings.load(None, api_keys=[{"id": "a", "key": SEARCH_KEY, "weight": 0}])
    with pytest.raises(ValidationError, match="admin_secret must differ"):
        Settings.load(None, admin_secret=SEARCH_KEY, api_keys=[{"id": "a", "key": SEARCH_KEY}])
    monkeypatch.setenv("EMBEDPLEX_API_KEYS", json.dumps(KEYS))
    settings = Settings.load(None)
    assert [(k.id, k.priority, k.weight) for k in settings.api_keys] == [
        ("search", INTERACTIVE, 4),
        ("nightly", BATCH, 1),
    ]
    printed = json.dumps(settings.redacted())
    assert SEARCH_KEY not in printed and NIGHTLY_KEY not in printed
    assert settings.redacted()["api_keys"][0] == {
        "id": "search",
        "key": "***",
        "priority": "interactive",
        "weight": 4,
    }


def test_queue_policy_is_a_setting_and_a_models_key() -> None:
    settings = Settings.load(
        None,
        queue_policy="fifo",
        models=[
            {"name": "a", "model_id": "x"},
            {"name": "b", "model_id": "y", "queue_policy": "fair"},
        ],
    )
    assert [m.queue_policy for m in settings.local_models()] == ["fifo", "fair"]
    assert Settings.load(None).flat_model().queue_policy == "fair"
    with pytest.raises(ValidationError):
        Settings.load(None, queue_policy="lottery")
