"""Adapters against a real HTTP fake: request shapes, retries, budgets, error mapping."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from embedplex.backends.tokenizer import TruncationDirection
from embedplex.core.errors import (
    InvalidRequestError,
    RateLimitedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from embedplex.providers import PROVIDER_TYPES, EmbedParams, HttpProvider
from embedplex.providers.endpoints import GuardedBackend, parse_networks
from embedplex.providers.http import MAX_REASON, Attempt, Outcome, parse_retry_after, sanitize
from embedplex.providers.wire import AiohttpTransport
from upstream_fakes import FakeUpstream, Fault, provider, vector_for


@pytest.fixture(params=["httpcore", "aiohttp"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """httpx's own transport, and the router's wire (``providers/wire.py``): the adapters,
    retries and error mapping must not tell them apart."""
    if request.param == "httpcore":
        transport: httpx.AsyncBaseTransport | None = None
    else:
        backend = GuardedBackend(parse_networks(["127.0.0.0/8"]))
        transport = AiohttpTransport(backend, limits=httpx.Limits(max_connections=16))
    async with httpx.AsyncClient(transport=transport) as c:
        yield c


async def adapter(
    upstream: FakeUpstream, client: httpx.AsyncClient, kind: str = "openai", **kw: Any
) -> tuple[HttpProvider, list[Attempt]]:
    config = provider("p", upstream, kind, **kw)
    p = PROVIDER_TYPES[kind](config, client)
    attempts: list[Attempt] = []
    p.bind(attempts.append, lambda: None)
    await p.start()
    return p, attempts


def assert_vectors(out: list[np.ndarray], texts: list[str], dims: int | None = None) -> None:
    for v, t in zip(out, texts, strict=True):
        want = vector_for(t)[:dims] if dims else vector_for(t)
        np.testing.assert_array_equal(v, want)


@pytest.mark.parametrize("kind", ["openai", "voyage", "cohere", "tei"])
async def test_each_adapter_round_trips_vectors_in_order(
    upstream: FakeUpstream, client: httpx.AsyncClient, kind: str
) -> None:
    p, attempts = await adapter(upstream, client, kind)
    texts = ["alpha", "beta", "gamma"]
    out = await p.embed(texts, EmbedParams(dimensions=4))
    assert_vectors(out.vectors, texts, dims=4)
    assert [a.outcome for a in attempts] == [Outcome.OK]
    body = upstream.calls[0].body
    assert {
        "openai": "dimensions",
        "voyage": "output_dimension",
        "cohere": "output_dimension",
        "tei": "dimensions",
    }[kind] in body


async def test_openai_float_encoding_and_usage(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "openai", encoding_format="float")
    out = await p.embed(["x", "y"], EmbedParams())
    assert upstream.calls[0].body["encoding_format"] == "float"
    assert upstream.calls[0].body["model"] == "p-model"
    assert out.tokens == 6
    assert_vectors(out.vectors, ["x", "y"])


async def test_input_types_are_translated_per_vendor(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    voyage, _ = await adapter(upstream, client, "voyage")
    cohere, _ = await adapter(upstream, client, "cohere")
    await voyage.embed(["q"], EmbedParams(input_type="search_query"))
    await cohere.embed(["q"], EmbedParams(input_type="query"))
    await cohere.embed(["d"], EmbedParams())  # cohere requires one: search_document
    assert upstream.calls[0].body["input_type"] == "query"
    assert upstream.calls[1].body["input_type"] == "search_query"
    assert upstream.calls[2].body["input_type"] == "search_document"
    assert upstream.calls[2].body["embedding_types"] == ["float"]


async def test_tei_reads_its_batch_limit_from_info(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.max_texts = 7
    p, _ = await adapter(upstream, client, "tei")
    assert p.limits.max_texts == 7
    await p.embed(["a"], EmbedParams(truncate=True, truncation_direction=TruncationDirection.LEFT))
    assert upstream.calls[0].body["truncation_direction"] == "Left"


async def test_unsupported_params_are_refused_before_any_call(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    p, _ = await adapter(upstream, client, "openai")
    with pytest.raises(InvalidRequestError):
        p.check(EmbedParams(input_type="query"))
    p.check(EmbedParams(dimensions=4))


async def test_500_then_success_is_retried(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(status=500), Fault(status=503))
    p, attempts = await adapter(upstream, client)
    out = await p.embed(["a"], EmbedParams())
    assert_vectors(out.vectors, ["a"])
    assert [a.outcome for a in attempts] == [Outcome.SERVER_ERROR] * 2 + [Outcome.OK]
    assert len(upstream.calls) == 3


async def test_connection_reset_is_retried(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(reset=True))
    p, attempts = await adapter(upstream, client)
    out = await p.embed(["a"], EmbedParams())
    assert_vectors(out.vectors, ["a"])
    assert [a.outcome for a in attempts] == [Outcome.CONNECT_ERROR, Outcome.OK]


async def test_429_honours_retry_after_then_succeeds(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(status=429, retry_after="0.3"))
    p, attempts = await adapter(upstream, client)
    start = time.monotonic()
    await p.embed(["a"], EmbedParams())
    assert time.monotonic() - start >= 0.3  # the backoff alone is at most 0.05 s
    assert [a.outcome for a in attempts] == [Outcome.RATE_LIMITED, Outcome.OK]


async def test_429_after_retries_passes_through_with_retry_after(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(*[Fault(status=429, retry_after="0.05")] * 3)
    p, _ = await adapter(upstream, client, max_attempts=3)
    with pytest.raises(RateLimitedError) as info:
        await p.embed(["a"], EmbedParams())
    assert info.value.retry_after == pytest.approx(0.05, abs=0.01)
    assert len(upstream.calls) == 3


async def test_retry_after_beyond_the_budget_gives_up_at_once(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(status=429, retry_after="30"))
    p, _ = await adapter(upstream, client, retry_budget_s=1.0)
    start = time.monotonic()
    with pytest.raises(RateLimitedError) as info:
        await p.embed(["a"], EmbedParams())
    assert time.monotonic() - start < 0.5
    assert info.value.retry_after == 30
    assert "retry budget" in info.value.message


async def test_per_attempt_timeout_and_cumulative_budget(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.delay = 1.0  # every call outlasts the 0.2 s attempt cap
    p, attempts = await adapter(upstream, client, timeout_s=0.2, retry_budget_s=0.7)
    start = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        await p.embed(["a"], EmbedParams())
    spent = time.monotonic() - start
    assert 0.6 <= spent < 1.0  # bounded by the budget, not by attempts x timeout
    assert all(a.outcome is Outcome.TIMEOUT for a in attempts)
    assert 3 <= len(attempts) <= 5


async def test_malformed_body_is_an_upstream_error_not_retried(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(malformed=True))
    p, attempts = await adapter(upstream, client)
    with pytest.raises(UpstreamError) as info:
        await p.embed(["a"], EmbedParams())
    assert "malformed" in info.value.message
    assert [a.outcome for a in attempts] == [Outcome.MALFORMED]


async def test_client_errors_are_not_retried(
    upstream: FakeUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Fault(status=400))
    p, _ = await adapter(upstream, client)
    with pytest.raises(UpstreamError) as info:
        await p.embed(["a"], EmbedParams())
    assert info.value.status == 400
    assert "injected 400" in info.value.message
    assert len(upstream.calls) == 1


async def test_refused_connection_maps_to_upstream_error(client: httpx.AsyncClient) -> None:
    config = provider("p", FakeUpstream(), "openai", max_attempts=2)  # port 0: nothing there
    p = PROVIDER_TYPES["openai"](
        config.model_copy(update={"endpoint": "http://127.0.0.1:9"}), client
    )
    with pytest.raises(UpstreamError) as info:
        await p.embed(["a"], EmbedParams())
    assert isinstance(info.value.__cause__, httpx.TransportError)


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0
    assert parse_retry_after(httpx.Headers({})) is None


async def test_upstream_error_bodies_reach_callers_short_clean_and_without_our_key(
    upstream: FakeUpstream, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that echoes our request headers (the key among them), terminal escapes and
    newlines in its error: the caller gets one short printable line, with no key in it."""
    monkeypatch.setenv("UPSTREAM_KEY", "sk-live-0123456789abcdef")
    upstream.script(Fault(status=400, echo_headers=True))
    p, _ = await adapter(upstream, client, api_key_env="UPSTREAM_KEY")
    with pytest.raises(UpstreamError) as info:
        await p.embed(["a"], EmbedParams())
    assert upstream.calls[0].headers["authorization"] == "Bearer sk-live-0123456789abcdef"
    message = info.value.message
    assert "sk-live" not in message and "0123456789abcdef" not in message
    assert message.isprintable()
    assert len(message) <= 300
    assert message.startswith("p: upstream answered 400: bad request")


@pytest.mark.parametrize(
    ("text", "secrets", "kept", "gone"),
    [
        ("key sk-abcdef rejected", ["sk-abcdef"], "key *** rejected", "sk-abcdef"),
        ("Authorization: Bearer tok123", [], "Bearer ***", "tok123"),
        ("{'x-api-key': 'abc123'}", [], "***", "abc123"),
        ("line\r\nnext\x1b[31m\x00end\u2028!", [], "line next [31m end !", "\x1b"),
    ],
)
def test_sanitize(text: str, secrets: list[str], kept: str, gone: str) -> None:
    out = sanitize(text, secrets)
    assert kept in out
    assert gone not in out
    assert out.isprintable()
    assert len(sanitize("y" * 10_000)) <= MAX_REASON
