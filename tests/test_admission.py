"""Admission by fair share (``batching/admission.py``): requests in flight and queued inputs.

One key with many clients took every slot of a model and every other key's query got 429,
though the fair queue would have served it next (review: 64 slots, 100 clients of one key).
Past three quarters of a cap, a key holding its share is refused instead; a key alone still
uses the whole cap. And a local model checks queue room before it tokenizes a long request,
whose wait for a tokenizer thread is bounded by the request's deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from cache_helpers import cached_model, req, started
from embedplex.backends.fake import FakeBackend
from embedplex.batching import Batcher, BatchPolicy, FairLengthQueue, FifoQueue, Slots
from embedplex.cache import EmbeddingCache
from embedplex.core.errors import OverloadedError
from embedplex.core.tenant import KeyLimits, Tenant
from helpers import eventually, fake_app, running
from tenants import limited_app

BULK = Tenant(key_id="bulk")
SEARCH = Tenant(key_id="search")


def slots(cap: int, clock: list[float] | None = None) -> Slots:
    now = clock if clock is not None else [0.0]
    return Slots(cap, full=lambda n: f"{n} in flight", what="requests", clock=lambda: now[0])


def test_a_key_alone_takes_the_whole_cap_and_a_second_key_always_finds_room() -> None:
    clock = [0.0]
    s = slots(8, clock)
    for _ in range(8):
        s.take(BULK)  # alone: its share is the whole cap
    with pytest.raises(OverloadedError, match="8 in flight") as full:
        s.take(SEARCH)  # the cap itself: but search now shares it
    assert full.value.retry_after == 1
    s.release(BULK)
    s.release(BULK)
    with pytest.raises(OverloadedError, match="fair share") as share:
        s.take(BULK)  # a 7th past 3/4 of 8, and bulk holds more than 8 / 2
    assert share.value.retry_after == 1 and "API key bulk holds 6" in share.value.message
    s.release(BULK)
    s.release(BULK)  # 4 in flight: anyone may take a slot up to 3/4
    s.take(BULK)
    s.take(BULK)
    with pytest.raises(OverloadedError, match="fair share"):
        s.take(BULK)
    s.take(SEARCH)  # two slots stay for the other key
    s.take(SEARCH)
    assert s.total == 8
    # Once search has not asked for LINGER_S, bulk is alone again and may fill the cap.
    s.release(SEARCH)
    s.release(SEARCH)
    clock[0] += 59.0  # a query a minute keeps search's place (at 5 s, it lost it)
    with pytest.raises(OverloadedError, match="fair share"):
        s.take(BULK)
    clock[0] += 2.0
    s.take(BULK)
    s.take(BULK)
    assert s.total == 8 and s.held("bulk") == 8


@pytest.mark.parametrize(("weight", "refused"), [(3, True), (1, False)])
def test_shares_follow_the_keys_weights(weight: int, refused: bool) -> None:
    """Bulk's share beside a key of weight 3 is 16 x 1/4 = 4; beside weight 1, 8."""
    other = Tenant(key_id="other", weight=weight)
    s = slots(16)
    for _ in range(6):
        s.take(BULK)
        s.take(other)  # 12 of 16 in flight: 3/4
    if refused:
        with pytest.raises(OverloadedError, match="fair share"):
            s.take(BULK)
    else:
        s.take(BULK)
    for _ in range(2):
        s.take(other)  # within its share either way (12 or 8)
    assert s.held("other") == 8


class Gated:
    """A run function that holds its batch until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def __call__(self, payloads: list[str]) -> Sequence[str]:
        await self.gate.wait()
        return [p.upper() for p in payloads]


async def test_a_local_request_notes_its_key_once_admitted_or_not(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route admits a request (its key noted as asking for room), then the model takes its
    slot: one note, not two (each cost a clock read and a dict write per request). A caller
    that did not admit first (a direct call) is noted when it takes its slot."""
    async with started(cached_model(tiny_model_dir, FakeBackend(), EmbeddingCache(0))) as model:
        sharing = model._slots._sharing
        asked: list[str | None] = []
        real = sharing.asked

        def spy(key: str | None, weight: int) -> None:
            asked.append(key)
            real(key, weight)

        monkeypatch.setattr(sharing, "asked", spy)
        model.admit(BULK)  # as api.common.run_embed does before the model's work
        await model.embed(req("one", tenant=BULK))
        assert asked == ["bulk"]
        await model.embed(req("two", tenant=SEARCH))  # not admitted: noted as it takes a slot
        assert asked == ["bulk", "search"]
        model.admit(BULK)
        await model.embed(req("three", tenant=SEARCH))  # another key's admission is not its own
        assert asked == ["bulk", "search", "bulk", "search"]
        assert set(sharing._seen) == {"bulk", "search"}
        assert model._slots.total == 0


async def test_a_fifo_queue_keeps_no_shares() -> None:
    """Arrival order, whoever sent it: a key may fill a fifo queue (no per-key counts are
    kept, and counting them cost a pass over the queue per request under overload)."""
    run = Gated()
    policy = BatchPolicy(max_items=1, max_queued=8)
    async with Batcher("m", run, policy, queue=FifoQueue()) as b:
        plug = b.submit(["p"], [1], tenant=BULK)
        await asyncio.sleep(0.01)
        try:
            bulk = b.submit(["a"] * 5, [1] * 5, tenant=BULK)
            b.submit(["q"], [1], tenant=SEARCH)
            bulk += b.submit(["a"] * 2, [1] * 2, tenant=BULK)  # 8 of 8, 7 of them bulk's
        finally:
            run.gate.set()
        assert await plug[0].future == "P"
        assert [await i.future for i in bulk] == ["A"] * 7


async def test_a_key_past_its_share_of_the_queue_is_refused_and_others_find_room() -> None:
    run = Gated()
    policy = BatchPolicy(max_items=1, max_queued=8)
    async with Batcher("m", run, policy, queue=FairLengthQueue()) as b:
        plug = b.submit(["p"], [1], tenant=BULK)  # in flight: the queue is empty behind it
        await asyncio.sleep(0.01)
        try:
            bulk = b.submit(["a"] * 8, [1] * 8, tenant=BULK)  # alone: the whole queue
            with pytest.raises(OverloadedError, match="queue is full"):
                b.submit(["q"], [1], tenant=SEARCH)  # full: search now shares the queue
            for item in bulk[:3]:
                item.future.cancel()  # three of bulk's callers leave: 5 left
            (last,) = b.submit(["b"], [1], tenant=BULK)  # 6 of 8: not past 3/4
            with pytest.raises(OverloadedError, match="fair share") as share:
                b.submit(["c"], [1], tenant=BULK)  # past 3/4, and over 8 / 2 for bulk
            assert share.value.retry_after == 1
            (query,) = b.submit(["q"], [1], tenant=SEARCH)
            (more,) = b.submit(["r"], [1], tenant=SEARCH)  # search's share: 2 <= 4
            with pytest.raises(OverloadedError, match="queue is full"):
                b.submit(["t"], [1], tenant=SEARCH)
        finally:
            run.gate.set()
        assert await plug[0].future == "P"
        assert [await i.future for i in (last, query, more)] == ["B", "Q", "R"]


async def test_a_local_model_keeps_room_for_a_light_key_during_a_flood(
    tiny_model_dir: Path,
) -> None:
    """16 clients of one key keep every one of 8 slots taken; another key's single queries,
    one at a time, each find a slot (the first may meet the flood before it made room)."""
    keys = {"bulk": KeyLimits(), "search": KeyLimits()}
    app = limited_app(tiny_model_dir, FakeBackend(delay=0.03), keys, max_concurrent_requests=8)
    stop = asyncio.Event()
    served = {"bulk": 0}
    counter = iter(range(1_000_000))

    async def flood(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(
                "/v1/embeddings",
                json={"input": f"bulk text {next(counter)}"},
                headers={"x-test-tenant": "bulk"},
            )
            if r.status_code == 200:
                served["bulk"] += 1
            else:
                assert r.status_code == 429, r.text
                await asyncio.sleep(0.01)

    async with running(app) as client:
        model = app.state.gateway.services()[0]
        clients = [asyncio.create_task(flood(client)) for _ in range(16)]
        try:
            await eventually(lambda: model.stats()["active_requests"] == 8)  # alone: all 8
            answers = []
            for k in range(10):
                for _ in range(2):  # a refused query tries again once, soon after
                    r = await client.post(
                        "/v1/embeddings",
                        json={"input": f"query {k}"},
                        headers={"x-test-tenant": "search"},
                    )
                    answers.append(r.status_code)
                    if r.status_code == 200:
                        break
                    assert r.headers["retry-after"] == "1"
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert answers.count(200) == 10, answers
    assert answers.count(429) <= 1, answers
    assert served["bulk"] > 20  # the flood is served all the while


def _spy_tokenizer(model: object) -> list[int]:
    """The input counts of every ``encode`` call the model's tokenizer makes from now on."""
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    original = tokenizer.encode
    calls: list[int] = []

    def encode(texts: list[str], **kwargs: object) -> object:
        calls.append(len(texts))
        return original(texts, **kwargs)

    tokenizer.encode = encode
    return calls


async def test_a_full_queue_refuses_a_long_request_before_it_is_tokenized(
    tiny_model_dir: Path,
) -> None:
    """The queue's 429 came after the whole body was tokenized (2.4-2.6 s for 2 MB, up to
    30 s under load): "at once", as docs/configuration.md says, it now comes first."""
    backend = FakeBackend(delay=1.0)
    app = fake_app(
        tiny_model_dir, backend, max_queue_size=4, max_client_batch_size=4, inference_streams=1
    )
    long_texts = [f"word{k} " * 150 for k in range(3)]  # ~2,700 characters: the tokenizer pool
    async with running(app) as client:
        model = app.state.gateway.services()[0]
        plug = asyncio.ensure_future(client.post("/embed", json={"inputs": "plug"}))
        await eventually(lambda: len(backend.batches) > 0)  # the one stream is busy
        fill = asyncio.ensure_future(client.post("/embed", json={"inputs": list("abcd")}))
        await eventually(lambda: model.stats()["queued"] == 4)
        calls = _spy_tokenizer(model)
        refused = await client.post("/embed", json={"inputs": long_texts})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["error"]
        assert calls == []  # refused before any tokenizing
        assert (await plug).status_code == 200 and (await fill).status_code == 200


async def test_the_wait_for_a_tokenizer_thread_is_bounded_by_the_request_deadline(
    tiny_model_dir: Path,
) -> None:
    app = fake_app(tiny_model_dir, FakeBackend(), tokenization_workers=1)
    busy = threading.Event()
    async with running(app) as client:
        model = app.state.gateway.services()[0]
        model._token_pool.submit(busy.wait, 10)  # the only tokenizer thread is taken
        calls = _spy_tokenizer(model)
        started = time.perf_counter()
        try:
            late = await asyncio.wait_for(
                client.post(
                    "/embed",
                    json={"inputs": ["word " * 200]},
                    headers={"x-request-timeout": "0.3"},
                ),
                5,
            )
        finally:
            busy.set()
        took = time.perf_counter() - started
        await asyncio.sleep(0.1)  # the thread is free: a wait cancelled is never tokenized
        ok = await client.post("/embed", json={"inputs": ["word " * 200]})
    assert late.status_code == 503, late.text
    assert late.json()["error_type"] == "Overloaded"  # TEI's type of a queue timeout
    assert "request deadline (0.3s, X-Request-Timeout)" in late.json()["error"]
    assert late.headers["retry-after"] == "1"
    assert took < 2.0
    assert ok.status_code == 200 and calls == [1]  # the second request's text only
