"""The OpenAI dialect as the official ``openai`` SDK sees it: its error classes, and models.

OpenAI answers 400 ``invalid_request_error`` for every request it finds invalid (a wrong value,
an input over the context length, too many inputs); the SDK raises ``BadRequestError`` for a 400
alone, so that is what callers catch. TEI's routes keep TEI's 422 (for every Validation error,
too many inputs included, as TEI answers since 1.9).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from embedplex.backends.fake import FakeBackend
from helpers import fake_app, running

NAME = "sentence-transformers/all-MiniLM-L6-v2"  # a served name with a '/' in it
LONG = " ".join(["cat"] * 40)  # 42 tokens; the tiny model takes 32


def sdk(client: httpx.AsyncClient, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url="http://test/v1", http_client=client, max_retries=0
    )


@pytest.fixture
async def client(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = fake_app(
        tiny_model_dir,
        FakeBackend(16),
        served_model_name=NAME,
        auto_truncate=False,
        max_client_batch_size=4,
        payload_limit=4096,
    )
    async with running(app) as c:
        yield c


@pytest.mark.parametrize(
    ("kwargs", "code", "param"),
    [
        ({"input": "x", "dimensions": 5000}, "invalid_value", "dimensions"),
        ({"input": [[2, 99999]]}, "invalid_value", "input"),
        ({"input": LONG}, "context_length_exceeded", "input"),
        ({"input": ["a"] * 5}, "payload_too_large", "input"),
        # Schema errors: wrong types and values the body's schema refuses.
        ({"input": "x", "encoding_format": "int8"}, "invalid_value", "encoding_format"),
        ({"input": None}, "invalid_value", "input"),
        ({"input": "x", "extra_body": {"priority": "urgent"}}, "invalid_value", "priority"),
    ],
    ids=["dimensions", "token-id", "too-long", "too-many", "schema", "null-input", "priority"],
)
async def test_invalid_requests_are_the_sdks_bad_request_error(
    client: httpx.AsyncClient, kwargs: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(client).embeddings.create(model="m", **kwargs)
    error = info.value
    assert error.status_code == 400
    assert (error.type, error.code, error.param) == ("invalid_request_error", code, param)


async def test_the_long_input_message_asks_for_what_the_route_takes(
    client: httpx.AsyncClient,
) -> None:
    """On a --no-auto-truncate server the 400 says "set truncate to true": /v1/embeddings
    takes that field now (it was ignored, so the advice could not be followed there)."""
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(client).embeddings.create(model="m", input=LONG)
    assert "set truncate to true or shorten it" in refused.value.message
    done = await sdk(client).embeddings.create(model="m", input=LONG, extra_body={"truncate": True})
    assert done.usage.prompt_tokens == 32  # cut to the tiny model's length


async def test_the_tei_routes_keep_teis_statuses(client: httpx.AsyncClient) -> None:
    long = await client.post("/embed", json={"inputs": LONG})
    many = await client.post("/embed", json={"inputs": ["a"] * 5})
    dims = await client.post("/embed", json={"inputs": "x", "dimensions": 5000})
    assert (long.status_code, many.status_code, dims.status_code) == (422, 422, 422)
    assert "batch size 5 > maximum allowed batch size" in many.json()["error"]
    assert long.json()["error_type"] == many.json()["error_type"] == "Validation"


async def test_a_body_over_the_payload_limit_is_still_413(client: httpx.AsyncClient) -> None:
    """Refused before it is parsed, on every route alike (the SDK's bare APIStatusError)."""
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(client).embeddings.create(model="m", input=["x" * 5000])
    assert info.value.status_code == 413
    assert info.value.code == "payload_too_large"


async def test_a_batch_items_errors_carry_openais_status(client: httpx.AsyncClient) -> None:
    items = [{"id": "ok", "input": "x"}, {"id": "bad", "input": "x", "dimensions": 5000}]
    r = await client.post("/v1/embeddings/batch", json={"requests": items})
    assert r.status_code == 200, r.text
    ok, bad = r.json()["results"]
    assert "data" in ok
    assert bad["error"]["status"] == 400 and bad["error"]["code"] == "invalid_value"


async def test_models_retrieve_gives_the_listed_object(client: httpx.AsyncClient) -> None:
    listed = await sdk(client).models.list()
    got = await sdk(client).models.retrieve(NAME)  # the '/' is part of the id
    assert got.model_dump() == listed.data[0].model_dump()
    assert (got.id, got.object, got.owned_by) == (NAME, "model", "embedplex")
    direct = await client.get(f"/v1/models/{NAME}")
    alias = await client.get(f"/models/{NAME}")
    assert direct.json() == alias.json() == (await client.get("/v1/models")).json()["data"][0]


@pytest.mark.parametrize("name", ["text-embedding-3-small", "sentence-transformers", "x/y/z", ""])
async def test_models_retrieve_of_a_name_not_served_is_model_not_found(
    client: httpx.AsyncClient, name: str
) -> None:
    """No stand-in here: the caller asks what is served, not for an embedding."""
    r = await client.get(f"/v1/models/{name}")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": f"model {name!r} is not served here",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    if name:
        with pytest.raises(openai.NotFoundError) as info:
            await sdk(client).models.retrieve(name)
        assert info.value.code == "model_not_found"


async def test_models_retrieve_needs_the_key_and_a_loaded_server(tiny_model_dir: Path) -> None:
    app = fake_app(tiny_model_dir, FakeBackend(16), served_model_name="m", api_key=SecretStr("k"))
    async with running(app) as client:
        with pytest.raises(openai.AuthenticationError):
            await sdk(client, "wrong").models.retrieve("m")
        assert (await sdk(client, "k").models.retrieve("m")).id == "m"
    loading = fake_app(tiny_model_dir, FakeBackend(16), served_model_name="m")
    transport = httpx.ASGITransport(app=loading)  # lifespan not run: nothing loaded
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/v1/models/m")
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"


async def test_the_openapi_document_gives_the_openai_routes_statuses(
    client: httpx.AsyncClient,
) -> None:
    """400 documented, and no 422 (FastAPI's own, for a route with a body) where none comes."""
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path, method in [
        ("/v1/embeddings", "post"),
        ("/v1/embeddings/batch", "post"),
        ("/v1/models/{model_id}", "get"),
    ]:
        responses = paths[path][method]["responses"]
        assert "400" in responses and "413" in responses and "422" not in responses, path
    assert "422" in paths["/embed"]["post"]["responses"]  # TEI's
