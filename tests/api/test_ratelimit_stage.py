"""The RateLimit stage: per-key limits through the app, OpenAI's headers, release at finish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from test_pipeline import SeenItems, local_factory

from embedplex.api.app import create_app
from embedplex.api.pipeline import Pipeline
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from embedplex.core.spend import bounded_tokens
from embedplex.core.tenant import KeyLimits, Tenant
from embedplex.limits import LocalLimits, RateLimiter
from helpers import eventually, parse_metrics, running, served, value
from tenants import TenantByHeader, limited_app

HEADERS = ("limit", "remaining", "reset")


def limiter(app: FastAPI) -> RateLimiter:
    lim: RateLimiter = app.state.rate_limiter
    return lim


def embed(
    client: httpx.AsyncClient, key: str | None, text: str = "hi"
) -> Coroutine[Any, Any, httpx.Response]:
    headers = {"x-test-tenant": key} if key else {}
    return client.post("/v1/embeddings", json={"input": text}, headers=headers)


async def test_every_answer_of_a_limited_key_carries_the_headers_and_past_rpm_is_429(
    tiny_model_dir: Path,
) -> None:
    app = limited_app(tiny_model_dir, FakeBackend(), {"k": KeyLimits(rpm=2, tpm=10_000)})
    async with running(app) as client:
        answers = [await embed(client, "k") for _ in range(3)]
        anonymous = await embed(client, None)
        probe = await client.get("/health", headers={"x-test-tenant": "k"})
        metrics = parse_metrics((await client.get("/metrics")).text)
    ok1, ok2, refused = answers
    assert [a.status_code for a in answers] == [200, 200, 429]
    for answer in answers:
        for kind in ("requests", "tokens"):
            for h in HEADERS:
                assert f"x-ratelimit-{h}-{kind}" in answer.headers
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
    assert ok1.headers["x-ratelimit-limit-requests"] == "2"
    assert ok1.headers["x-ratelimit-limit-tokens"] == "10000"
    # Tokens are charged when a request finishes: the second sees what the first used.
    used = ok1.json()["usage"]["prompt_tokens"]
    assert used > 0
    assert ok1.headers["x-ratelimit-remaining-tokens"] == "10000"
    assert int(ok2.headers["x-ratelimit-remaining-tokens"]) in (10_000 - used, 10_000 - used + 1)
    # One request every 30 s: the refusal says to come back in about that.
    assert 25 <= int(refused.headers["retry-after"]) <= 30
    assert 25_000 <= int(refused.headers["retry-after-ms"]) <= 30_000
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in refused.json()["error"]["message"]
    assert anonymous.status_code == 200 and "x-ratelimit-limit-requests" not in anonymous.headers
    assert probe.status_code == 200 and "x-ratelimit-limit-requests" not in probe.headers
    assert value(metrics, "embedplex_rate_limited_total", key_id="k", reason="rpm") == 1
    assert value(metrics, "embedplex_rate_limit_backend", backend="local") == 1
    assert value(metrics, "embedplex_rate_limit_backend", backend="redis") == 0


async def test_tokens_per_minute_admits_one_overspend_then_refuses(tiny_model_dir: Path) -> None:
    app = limited_app(
        tiny_model_dir, FakeBackend(), {"k": KeyLimits(tpm=5), "other": KeyLimits(tpm=5)}
    )
    long_text = "the quick brown fox jumps over the lazy dog " * 3
    async with running(app) as client:
        first = await embed(client, "k", long_text)
        second = await embed(client, "k", "hi")
        other = await embed(client, "other", "hi")
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert first.status_code == 200
    assert first.json()["usage"]["prompt_tokens"] > 5  # more than the whole minute: allowed once
    assert second.status_code == 429
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "tokens per minute" in second.json()["error"]["message"]
    assert other.status_code == 200  # another key's budget is its own
    assert value(metrics, "embedplex_rate_limited_total", key_id="k", reason="tpm") == 1


async def test_concurrency_slot_is_held_until_the_answer_and_freed_on_errors(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend(delay=0.3)
    app = limited_app(tiny_model_dir, backend, {"k": KeyLimits(max_concurrent=1)})
    async with running(app) as client:
        slow = asyncio.create_task(embed(client, "k"))
        await eventually(lambda: limiter(app).local.in_flight("k") == 1)
        refused = await embed(client, "k")
        assert (await slow).status_code == 200
        assert limiter(app).local.in_flight("k") == 0
        backend.delay = 0.0
        backend.fail_next = 1
        failed = await embed(client, "k")
        after_failure = await embed(client, "k")
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert refused.status_code == 429
    assert "concurrent requests" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert failed.status_code >= 400
    assert after_failure.status_code == 200
    assert value(metrics, "embedplex_rate_limited_total", key_id="k", reason="concurrency") == 1


async def test_a_cancelled_request_gives_its_slot_back(tiny_model_dir: Path) -> None:
    app = limited_app(tiny_model_dir, FakeBackend(delay=0.5), {"k": KeyLimits(max_concurrent=1)})
    async with running(app) as client:
        task = asyncio.create_task(embed(client, "k"))
        await eventually(lambda: limiter(app).local.in_flight("k") == 1)
        task.cancel()
        # The pipeline answers a cancelled request (the server cancels only at the end of its
        # shutdown grace period) with the documented JSON 503 and ends normally.
        try:
            answer = await task
        except asyncio.CancelledError:
            pass
        else:
            assert answer.status_code == 503, answer.text
        await eventually(lambda: limiter(app).local.in_flight("k") == 0)
        assert (await embed(client, "k")).status_code == 200


def test_a_client_that_hangs_up_gives_its_slot_back(tiny_model_dir: Path) -> None:
    """A real server and a real socket closed while the request is in the backend."""
    app = limited_app(tiny_model_dir, FakeBackend(delay=0.5), {"k": KeyLimits(max_concurrent=1)})
    with served(app) as url:
        port = int(url.rsplit(":", 1)[1])
        body = b'{"input": "hi"}'
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nx-test-tenant: k\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            asyncio.run(eventually(lambda: limiter(app).local.in_flight("k") == 1))
        asyncio.run(eventually(lambda: limiter(app).local.in_flight("k") == 0))
        again = httpx.post(
            url + "/v1/embeddings", json={"input": "hi"}, headers={"x-test-tenant": "k"}
        )
    assert again.status_code == 200


async def test_every_route_that_tokenizes_is_charged_its_tokens() -> None:
    """Embeddings, batch and rerank routes charge what they tokenized (a frozen clock: no
    refill, so the headers show the exact sum)."""
    settings = Settings.load(None, served_model_name="embedder")
    app = create_app(settings, gateway_factory=local_factory(FakeBackend(16), SeenItems()))
    tenants = {"k": Tenant(key_id="k", limits=KeyLimits(tpm=100_000))}
    pipeline = app.edge
    assert isinstance(pipeline, Pipeline)
    pipeline.stages.insert(2, TenantByHeader(tenants))
    limiter(app).local = LocalLimits(lambda: 5000.0)
    key = {"x-test-tenant": "k"}
    calls = [
        ("/v1/embeddings", {"input": ["a b c", "d"]}, lambda b: b["usage"]["prompt_tokens"]),
        ("/embed", {"inputs": "hello there"}, None),
        ("/rerank", {"query": "q", "texts": ["a b", "c"]}, None),
        ("/v1/rerank", {"query": "q", "documents": ["a b"]}, lambda b: b["usage"]["total_tokens"]),
        ("/api/rerank", {"query": "q", "documents": ["a b c"]}, None),
        ("/v1/embeddings/batch", {"requests": [{"id": "1", "input": "x y"}]}, None),
    ]
    async with running(app) as client:

        async def remaining() -> int:
            answer = await client.get("/v1/models", headers=key)
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        for path, body, usage in calls:
            before = await remaining()
            answer = await client.post(path, json=body, headers=key)
            assert answer.status_code == 200, (path, answer.text)
            charged = before - await remaining()
            assert charged > 0, path
            if usage is not None:
                assert charged == usage(answer.json()), path


def _post_and_leave_open(port: int, text: str) -> socket.socket:
    """An embeddings request of key ``k`` on a raw socket the caller closes (hangs up)."""
    body = json.dumps({"input": text}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nx-test-tenant: k\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_a_client_that_hangs_up_is_charged_the_tokens_that_ran_and_not_those_queued(
    tiny_model_dir: Path,
) -> None:
    """Abandoning requests buys no free compute: a real server, two requests of one key on
    sockets closed mid-request, one in the backend and one queued behind it. The first is
    charged its tokens, the second (dropped before it ran) nothing; a frozen clock (no refill)
    lets the headers show the exact charge."""
    backend = FakeBackend(delay=0.5)
    app = limited_app(tiny_model_dir, backend, {"k": KeyLimits(tpm=100_000)}, inference_streams=1)
    limiter(app).local = LocalLimits(lambda: 5000.0)
    ran, queued = "the quick brown fox jumps over the lazy dog", "a queued text never run"
    with served(app) as url:
        port = int(url.rsplit(":", 1)[1])
        key = {"x-test-tenant": "k"}

        def remaining() -> int:
            answer = httpx.get(url + "/v1/models", headers=key)
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        assert remaining() == 100_000
        # Refusals after admission but before any work (a bad body) are charged nothing.
        assert httpx.post(url + "/v1/embeddings", json={}, headers=key).status_code == 400
        assert remaining() == 100_000
        first = _post_and_leave_open(port, ran)
        asyncio.run(eventually(lambda: len(backend.batches) == 1))  # the first is running
        second = _post_and_leave_open(port, queued)
        asyncio.run(eventually(lambda: limiter(app).local.in_flight("k") == 2))
        second.close()
        first.close()
        asyncio.run(eventually(lambda: limiter(app).local.in_flight("k") == 0))
        charged = 100_000 - remaining()
        fresh = {**key, "cache-control": "no-cache"}  # computed again: a second batch
        again = httpx.post(url + "/v1/embeddings", json={"input": ran}, headers=fresh)
        tokens = again.json()["usage"]["prompt_tokens"]
        assert 100_000 - remaining() == charged + tokens  # an answer: its usage, once
    assert tokens > 0
    assert charged == tokens
    assert len(backend.batches) == 2  # the queued text never reached the backend


async def test_a_request_cancelled_in_the_backend_is_charged_its_tokens(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend(delay=0.5)
    app = limited_app(tiny_model_dir, backend, {"k": KeyLimits(tpm=100_000)})
    limiter(app).local = LocalLimits(lambda: 5000.0)
    texts = ["one two three", "four five"]
    async with running(app) as client:
        task = asyncio.create_task(
            client.post("/v1/embeddings", json={"input": texts}, headers={"x-test-tenant": "k"})
        )
        await eventually(lambda: len(backend.batches) == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await eventually(lambda: limiter(app).local.in_flight("k") == 0)
        backend.delay = 0.0
        answer = await client.post(
            "/v1/embeddings", json={"input": texts}, headers={"x-test-tenant": "k"}
        )
    tokens = answer.json()["usage"]["prompt_tokens"]
    left = int(answer.headers["x-ratelimit-remaining-tokens"])  # before this answer's charge
    assert left == 100_000 - tokens


async def test_a_charged_spend_notes_nothing_more() -> None:
    """uvicorn starts a pipelined request from the finishing one's task, whose context holds
    that request's ``Spend``: once charged it must keep nothing of the next request's items."""
    from types import SimpleNamespace

    from embedplex.core.spend import Spend

    running = SimpleNamespace(done=lambda: False)  # its batch still in the backend
    ran = SimpleNamespace(payload=SimpleNamespace(cost=7), started_at=1.0, future=running)
    spend = Spend()
    await spend.queue(7, lambda: [ran])
    assert spend.tokens() == 7
    spend.forget()  # charged
    await spend.queue(350, lambda: [ran] * 50)  # the next request, pipelined behind it
    assert spend.tokens() == 0
    assert spend._queued is None


async def test_a_request_whose_batch_failed_is_charged_nothing(tiny_model_dir: Path) -> None:
    """A failed batch (here the backend's error) did no work the key pays for; the next answer
    is charged its usage as always."""
    backend = FakeBackend()
    app = limited_app(tiny_model_dir, backend, {"k": KeyLimits(tpm=100_000)})
    limiter(app).local = LocalLimits(lambda: 5000.0)
    key = {"x-test-tenant": "k"}
    async with running(app) as client:

        async def remaining() -> int:
            answer = await client.get("/v1/models", headers=key)
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        backend.fail_next = 1
        failed = await client.post("/v1/embeddings", json={"input": "one two three"}, headers=key)
        assert failed.status_code == 424  # the backend failed (TEI's status for it)
        assert await remaining() == 100_000
        ok = await client.post("/v1/embeddings", json={"input": "four five"}, headers=key)
        assert ok.status_code == 200
        assert await remaining() == 100_000 - ok.json()["usage"]["prompt_tokens"]


def _burst(n: int, tag: str) -> list[str]:
    """``n`` distinct texts (identical ones in flight would share one computation)."""
    return [f"{tag}: text number {i} of a parallel burst" for i in range(n)]


async def _at_once(url: str, inputs: list[list[str]]) -> list[httpx.Response]:
    """One ``/v1/embeddings`` request of key ``k`` per entry of ``inputs``, all at once."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/embeddings", json={"input": i}, headers={"x-test-tenant": "k"})
                for i in inputs
            )
        )


def test_a_burst_of_parallel_requests_is_held_to_tokens_per_minute(tiny_model_dir: Path) -> None:
    """The review's repro against a real server: a ``tpm = 1000`` key sends 6 requests of 300
    inputs at once. Each reserves its tokens before it queues, so the first to do so overspends
    what was left and the other five get the key's 429 (they used to get six 200s)."""
    app = limited_app(tiny_model_dir, FakeBackend(delay=0.2), {"k": KeyLimits(tpm=1000)})
    with served(app) as url:
        answers = asyncio.run(_at_once(url, [_burst(300, f"request {r}") for r in range(6)]))
    assert sorted(a.status_code for a in answers) == [200] + [429] * 5
    (ok,) = [a for a in answers if a.status_code == 200]
    assert ok.json()["usage"]["prompt_tokens"] > 1000  # one request may overspend
    for refused in (a for a in answers if a.status_code == 429):
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
        assert refused.headers["x-ratelimit-limit-tokens"] == "1000"
        assert int(refused.headers["retry-after"]) >= 1
        assert int(refused.headers["retry-after-ms"]) >= 1
        assert len(refused.headers.get_list("x-ratelimit-remaining-tokens")) == 1


async def test_a_reservation_is_held_while_queued_and_given_back_unrun(
    tiny_model_dir: Path,
) -> None:
    """Two requests, one in the backend and one queued behind it: both hold their tokens'
    bound from the moment they queue. The queued one's client leaves before its batch runs:
    its reservation comes back whole; one whose batch fails gets it back too; the answered one
    is charged its usage, the estimate settled (a frozen clock: no refill)."""
    backend = FakeBackend(delay=0.5)
    app = limited_app(tiny_model_dir, backend, {"k": KeyLimits(tpm=100_000)}, inference_streams=1)
    limiter(app).local = LocalLimits(lambda: 5000.0)
    key = {"x-test-tenant": "k"}
    ran, queued = "the quick brown fox jumps over the lazy dog", "a queued text never run"
    async with running(app) as client:

        async def remaining() -> int:
            answer = await client.get("/v1/models", headers=key)
            return int(answer.headers["x-ratelimit-remaining-tokens"])

        first = asyncio.create_task(client.post("/v1/embeddings", json={"input": ran}, headers=key))
        await eventually(lambda: len(backend.batches) == 1)
        second = asyncio.create_task(
            client.post("/v1/embeddings", json={"input": queued}, headers=key)
        )
        # A deferred text reserves one token a character (its bound), at most the model's cap.
        cap = 32  # the tiny model's max_input_length
        ran_bound, queued_bound = (min(cap, bounded_tokens(len(t))) for t in (ran, queued))
        both = 100_000 - ran_bound - queued_bound
        for _ in range(200):
            if await remaining() == both:
                break
            await asyncio.sleep(0.01)
        assert await remaining() == both  # reserved before they ran
        second.cancel()  # its client leaves before its batch runs
        with contextlib.suppress(asyncio.CancelledError):
            await second
        assert await remaining() == 100_000 - ran_bound
        answer = await first
        assert answer.status_code == 200
        assert await remaining() == 100_000 - answer.json()["usage"]["prompt_tokens"]
        before = await remaining()
        backend.delay = 0.0
        backend.fail_next = 1
        failed = await client.post("/v1/embeddings", json={"input": queued}, headers=key)
        assert failed.status_code == 424
        assert await remaining() == before
    assert len(backend.batches) == 2  # the first request's and the failed one: not the queued


def test_a_burst_of_non_english_text_is_held_to_tokens_per_minute(tiny_model_dir: Path) -> None:
    """The review's repro: 12 parallel requests of 40 texts of 12 CJK characters (a token a
    character) on a ``tpm = 1000`` key. Queued untokenized, they reserved the English guess
    (5 tokens a text for 14 counted) and five were answered, 2,800 tokens. Each text now
    reserves its bound (a token a character, plus 2): the first request takes 560 tokens, the
    second overspends what was left, the others get the key's 429."""
    app = limited_app(tiny_model_dir, FakeBackend(delay=0.2), {"k": KeyLimits(tpm=1000)})

    def texts(r: int) -> list[str]:
        return [
            "".join(chr(0x4E00 + (r * 997 + i * 13 + j) % 20000) for j in range(12))
            for i in range(40)
        ]

    with served(app) as url:
        answers = asyncio.run(_at_once(url, [texts(r) for r in range(12)]))
    spent = [a.json()["usage"]["prompt_tokens"] for a in answers if a.status_code == 200]
    assert sorted(a.status_code for a in answers) == [200] * 2 + [429] * 10
    assert spent == [560, 560]
