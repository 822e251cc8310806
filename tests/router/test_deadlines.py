"""Remote upstreams that die or stall: a caller's wait is bounded by its request deadline
(``request_timeout_s``, tightened by ``X-Request-Timeout``), retries stop when the deadline could
not be met, an upstream call whose callers all left is cancelled, and the 504 names real times.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from test_router_api import serve

from embedplex.config import Settings
from embedplex.providers.config import ProviderConfig, RouteConfig
from helpers import free_port
from upstream_fakes import FakeUpstream, provider


def settings(config: ProviderConfig, **kw: Any) -> Settings:
    return Settings(
        local_model=False,
        providers=[config],
        routes=[RouteConfig(model="remote", providers=[config.name])],
        **kw,
    )


async def test_a_dead_upstream_answers_by_the_callers_deadline() -> None:
    # Nothing listens there; the default retry policy (backoff from 100 ms, 8 attempts, the
    # breaker at 5 failures) kept callers about 5 s before this deadline existed.
    dead = ProviderConfig(
        name="dead", type="openai", endpoint=f"http://127.0.0.1:{free_port()}", model="m"
    )
    async with serve(settings(dead)) as (_, client):
        started = time.monotonic()
        short = await client.post(
            "/v1/embeddings",
            json={"input": "x", "model": "remote"},
            headers={"x-request-timeout": "0.8"},
        )
        waited = time.monotonic() - started
    # The retries stop when the next one could not finish in time: the caller hears the real
    # cause (502, connection refused) before its deadline; or the breaker opened (503), or the
    # deadline came first (504). Never the ~5 s of retries.
    assert short.status_code in (502, 503, 504), short.text
    message = short.json()["error"]["message"]
    assert message.startswith("dead: ") or "request deadline (0.8s" in message, message
    assert waited < 3.0


async def test_the_configured_default_deadline_applies_without_a_header(
    upstream: FakeUpstream,
) -> None:
    upstream.delay = 3.0  # stalls
    stalled = provider("a", upstream, timeout_s=10, retry_budget_s=45)
    async with serve(settings(stalled, request_timeout_s=0.5)) as (_, client):
        started = time.monotonic()
        answer = await client.post("/embed", json={"inputs": "x", "model": "remote"})
        waited = time.monotonic() - started
        loose = await client.post(
            "/embed", json={"inputs": "x", "model": "remote"}, headers={"x-request-timeout": "9"}
        )
    assert answer.status_code == 504
    assert "request deadline (0.5s, request_timeout_s)" in answer.json()["error"]
    assert waited < 3.5
    assert "(0.5s, request_timeout_s)" in loose.json()["error"]  # a client only shortens it


async def test_a_stalling_upstream_gets_no_attempts_for_callers_who_left(
    upstream: FakeUpstream,
) -> None:
    upstream.delay = 3.0
    # Each attempt times out after 0.3 s, and the retry budget alone would allow 8 of them.
    stalled = provider("a", upstream, timeout_s=0.3, retry_budget_s=45, breaker_failures=50)
    async with serve(settings(stalled)) as (_, client):
        started = time.monotonic()
        answer = await client.post(
            "/v1/embeddings",
            json={"input": "x", "model": "remote"},
            headers={"x-request-timeout": "1"},
        )
        waited = time.monotonic() - started
        calls_when_answered = len(upstream.calls)
        await asyncio.sleep(1.0)
        calls_later = len(upstream.calls)
    assert answer.status_code == 504
    assert waited < 3.5
    assert 1 <= calls_when_answered <= 4
    assert calls_later == calls_when_answered  # nothing more piled on the stalled upstream


async def test_the_504_names_the_time_actually_spent(upstream: FakeUpstream) -> None:
    upstream.delay = 3.0
    stalled = provider("a", upstream, timeout_s=0.3, retry_budget_s=1.0, breaker_failures=50)
    async with serve(settings(stalled)) as (_, client):
        answer = await client.post("/v1/embeddings", json={"input": "x", "model": "remote"})
    assert answer.status_code == 504
    message = answer.json()["error"]["message"]
    found = re.search(r"no answer within ([0-9.]+)s \((\d+) attempts in ([0-9.]+)s", message)
    assert found is not None, message
    assert float(found[1]) >= 0.7  # the whole wait, not one attempt's 0.3 s or what was left
    assert "retry budget spent" in message


async def test_a_bad_timeout_header_is_a_400(upstream: FakeUpstream) -> None:
    async with serve(settings(provider("a", upstream))) as (_, client):
        for value in ("soon", "-1", "0", "nan", "inf"):
            answer = await client.post(
                "/v1/embeddings",
                json={"input": "x", "model": "remote"},
                headers={"x-request-timeout": value},
            )
            assert answer.status_code == 400, (value, answer.text)
            assert answer.json()["error"]["param"] == "X-Request-Timeout"
        sdk = await client.post(
            "/v1/embeddings",
            json={"input": "x", "model": "remote"},
            headers={"x-stainless-read-timeout": "junk"},  # not ours: ignored
        )
    assert sdk.status_code == 200


async def test_retries_end_with_the_shutdown_grace_period(upstream: FakeUpstream) -> None:
    from embedplex.core.deadline import drain_by

    upstream.delay = 3.0
    stalled = provider("a", upstream, timeout_s=0.3, retry_budget_s=45, breaker_failures=50)
    async with serve(settings(stalled)) as (_, client):
        drain_by(time.monotonic() + 0.8)  # what SIGTERM sets (serve/server.py)
        try:
            started = time.monotonic()
            answer = await client.post("/v1/embeddings", json={"input": "x", "model": "remote"})
            waited = time.monotonic() - started
        finally:
            drain_by(None)
    assert answer.status_code == 504
    assert "shutdown grace period spent" in answer.json()["error"]["message"]
    assert waited < 3.0


async def test_the_openai_sdks_read_timeout_shortens_the_deadline(upstream: FakeUpstream) -> None:
    upstream.delay = 3.0
    async with serve(settings(provider("a", upstream, timeout_s=10))) as (_, client):
        answer = await client.post(
            "/v1/embeddings",
            json={"input": "x", "model": "remote"},
            headers={"x-stainless-read-timeout": "0.5"},
        )
    assert answer.status_code == 504
    assert "(0.5s, X-Stainless-Read-Timeout)" in answer.json()["error"]["message"]


async def test_rerank_retries_stop_at_the_callers_deadline() -> None:
    """Remote rerank calls carry their callers' deadlines too: a retry that could not finish in
    time is not started, so the caller hears the real cause before its deadline (without the
    deadline the retries ran on and the caller got only a 504 when its deadline passed)."""
    dead = ProviderConfig(
        name="dead", type="openai", endpoint=f"http://127.0.0.1:{free_port()}", model="m"
    )
    config = Settings(
        local_model=False,
        providers=[dead],
        routes=[RouteConfig(model="rr", providers=["dead"], kind="rerank")],
    )
    async with serve(config) as (_, client):
        started = time.monotonic()
        answer = await client.post(
            "/v1/rerank",
            json={"query": "q", "documents": ["a", "b"], "model": "rr"},
            headers={"x-request-timeout": "0.8"},
        )
        waited = time.monotonic() - started
    assert answer.status_code in (502, 503), answer.text
    error = answer.json()["error"]
    assert (error if isinstance(error, str) else error["message"]).startswith("dead: "), error
    assert waited < 0.8
