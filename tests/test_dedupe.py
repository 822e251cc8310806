"""Identical inputs queued or running at once share one slot and one result (models/dedupe.py).

A slow fake backend holds a first batch, so the callers that come next pile up in the queue
where the tests can see them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cache_helpers import cached_model, req, started
from embedplex.backends.fake import FakeBackend
from embedplex.backends.tokenizer import TruncationDirection
from embedplex.cache import EmbeddingCache
from embedplex.core.errors import BackendError
from embedplex.core.tenant import Priority, Tenant
from embedplex.core.types import EmbedResult
from embedplex.models.embedding import LocalEmbeddingModel
from helpers import eventually


async def _busy(model: LocalEmbeddingModel) -> asyncio.Task[EmbedResult]:
    """A request whose batch occupies the only inference stream until the fake's delay ends."""
    task = asyncio.create_task(model.embed(req("keeps the backend busy")))
    await eventually(lambda: model.batcher.in_flight == 1)
    return task


def _model(tiny_model_dir: Path, backend: FakeBackend, **kw: object) -> LocalEmbeddingModel:
    return cached_model(tiny_model_dir, backend, EmbeddingCache(0), inference_streams=1, **kw)


async def test_callers_of_one_text_share_one_slot_and_each_get_the_answer(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend(delay=0.3)
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        callers = [asyncio.create_task(model.embed(req("the same text"))) for _ in range(3)]
        await eventually(lambda: model._counts.dedupe_joined == 2)
        assert model.batcher.queued == 1  # three callers, one slot
        results = await asyncio.gather(*callers)
        await busy
        alone = await model.embed(req("the same text"))
    assert backend.batches[1][0] == 1
    for r in results:
        np.testing.assert_array_equal(r.vectors[0], alone.vectors[0])
        assert r.prompt_tokens == alone.prompt_tokens > 0  # each caller's own usage


async def test_identical_inputs_of_one_request_share_a_slot_and_keep_their_places(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend()
    async with started(_model(tiny_model_dir, backend)) as model:
        r = await model.embed(req("x", "y", "x", "z", "y"))
        one_by_one = [(await model.embed(req(t))).vectors[0] for t in ("x", "y", "z")]
    assert backend.batches[0][0] == 3
    x, y, z = one_by_one
    for got, want in zip(r.vectors, [x, y, x, z, y], strict=True):
        np.testing.assert_array_equal(got, want)
    assert r.prompt_tokens == 5 * 3  # usage counts every input, shared or not
    assert model._counts.dedupe_joined == 2  # the second x and y (embedplex_dedupe_joined)


async def test_a_caller_that_leaves_does_not_fail_the_others(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.3)
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        first = asyncio.create_task(model.embed(req("shared")))
        await eventually(lambda: model.batcher.queued == 1)
        second = asyncio.create_task(model.embed(req("shared")))
        await eventually(lambda: model._counts.dedupe_joined == 1)
        first.cancel()  # the caller whose item it is leaves first
        with pytest.raises(asyncio.CancelledError):
            await first
        # Queued again for the one who stays (the dropped item leaves the queue when it is cut).
        assert model._flights[("shared", True, False, model._tag)].item.waiting
        kept = await second
        await busy
        alone = await model.embed(req("shared", cache=False))
    np.testing.assert_array_equal(kept.vectors[0], alone.vectors[0])
    assert [b[0] for b in backend.batches[1:]] == [1, 1]  # "shared" once, then "alone"


async def test_the_work_is_dropped_once_every_caller_has_left(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.3)
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        callers = [asyncio.create_task(model.embed(req("nobody waits"))) for _ in range(2)]
        await eventually(lambda: model._counts.dedupe_joined == 1)
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        # Nobody can join work that is being dropped.
        assert [k[0] for k in model._flights] == ["keeps the backend busy"]
        await busy
        after = await model.embed(req("after"))
    assert after.vectors
    assert len(backend.batches) == 2  # the busy batch and "after": the dropped one never ran


async def test_a_failed_batch_reaches_every_caller_of_a_shared_input(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend(delay=0.3)
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        backend.fail_next = 1  # the next batch: the shared input's
        callers = [asyncio.create_task(model.embed(req("doomed"))) for _ in range(3)]
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        await busy
        assert not model._flights
        again = await model.embed(req("doomed"))  # a failure is never remembered
    assert all(isinstance(o, BackendError) for o in outcomes)
    assert again.vectors


async def test_different_parameters_never_share_a_slot(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.3)
    long_text = "a " * 300 + "b " * 300  # its two ends differ
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        variants = [
            req(long_text, truncate=True),
            req(long_text, truncate=True, truncation_direction=TruncationDirection.LEFT),
            req(long_text, truncate=True, prompt="query: "),
        ]
        results = await asyncio.gather(*(model.embed(r) for r in variants))
        await busy
    assert model._counts.dedupe_joined == 0
    assert sum(size for size, _ in backend.batches[1:]) == 3
    a, b, c = (r.vectors[0] for r in results)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


async def test_normalize_and_dimensions_share_a_slot_and_each_get_their_own_shape(
    tiny_model_dir: Path,
) -> None:
    """They are applied after pooling, per caller: sharing cannot change anyone's answer."""
    backend = FakeBackend(delay=0.3)
    async with started(_model(tiny_model_dir, backend)) as model:
        busy = await _busy(model)
        unit, raw, cut = await asyncio.gather(
            model.embed(req("one text")),
            model.embed(req("one text", normalize=False)),
            model.embed(req("one text", dimensions=8)),
        )
        await busy
    assert model._counts.dedupe_joined == 2
    np.testing.assert_allclose(unit.vectors[0], raw.vectors[0] / np.linalg.norm(raw.vectors[0]))
    want = raw.vectors[0][:8] / np.linalg.norm(raw.vectors[0][:8])
    np.testing.assert_allclose(cut.vectors[0], want, rtol=1e-6)


async def test_two_models_never_share_a_slot(tiny_model_dir: Path) -> None:
    cache = EmbeddingCache(0)
    backends = [FakeBackend(delay=0.2), FakeBackend(delay=0.2)]
    models = [cached_model(tiny_model_dir, b, cache, name=f"m{k}") for k, b in enumerate(backends)]
    async with started(models[0]), started(models[1]):
        await asyncio.gather(*(m.embed(req("same text")) for m in models))
    assert [len(b.batches) for b in backends] == [1, 1]
    assert cache.counts["m0"].dedupe_joined == cache.counts["m1"].dedupe_joined == 0


BULK = Tenant(key_id="bulk", priority=Priority.BATCH)
SEARCH = Tenant(key_id="search")
LONG = "a query much longer than the bulk texts around it in the queue"


async def test_an_interactive_caller_never_waits_behind_a_batch_backlog_it_joined(
    tiny_model_dir: Path,
) -> None:
    """A batch key's backlog holds a text an interactive key asks for: the interactive caller
    queues its own copy, served in its own lane first, and its key's next caller joins that
    (review: the joiner waited ~1.8 s behind the backlog against 36-131 ms for a new text)."""
    backend = FakeBackend(delay=0.2)
    model = _model(tiny_model_dir, backend, max_batch_requests=2)
    async with started(model):
        busy = await _busy(model)
        backlog = asyncio.create_task(
            model.embed(req("b1", "b2", "b3", "b4", "b5", LONG, tenant=BULK))
        )
        await eventually(lambda: model.batcher.queued == 6)
        first, second = (
            asyncio.create_task(model.embed(req(LONG, tenant=SEARCH))) for _ in range(2)
        )
        await eventually(lambda: model._counts.dedupe_joined == 1)  # the second joined the first
        assert model.batcher.queued == 7
        answers = await asyncio.gather(first, second)
        await asyncio.gather(busy, backlog)
    # Right after the busy batch: the interactive copy alone (the CPU queue does not fill a
    # batch with other keys' texts), before any of the backlog's batches.
    long_row = backend.batches[1]
    assert long_row[0] == 1 and long_row[1] > max(n for _, n in backend.batches[2:4])
    np.testing.assert_array_equal(answers[0].vectors[0], answers[1].vectors[0])
    np.testing.assert_allclose(answers[0].vectors[0], backlog.result().vectors[5], rtol=1e-6)


@pytest.mark.parametrize(("policy", "joins"), [("fair", 0), ("fifo", 1)])
async def test_a_queued_input_of_another_key_is_joined_only_where_it_comes_first(
    tiny_model_dir: Path, policy: str, joins: int
) -> None:
    """Under the fair queue another key's queued input is served at that key's turn, maybe
    after the caller's own; a plain (fifo) queue serves in arrival order, so there it is
    joined."""
    backend = FakeBackend(delay=0.2)
    async with started(_model(tiny_model_dir, backend, queue_policy=policy)) as model:
        busy = await _busy(model)
        theirs = asyncio.create_task(model.embed(req("t", tenant=Tenant(key_id="other"))))
        await eventually(lambda: model.batcher.queued == 1)
        mine = asyncio.create_task(model.embed(req("t", tenant=SEARCH)))
        # "t" queued a second time, or joined: either way the caller has decided.
        await eventually(lambda: model.batcher.queued + model._counts.dedupe_joined == 2)
        await asyncio.gather(busy, theirs, mine)
    assert model._counts.dedupe_joined == joins
    assert sum(size for size, _ in backend.batches) == 3 - joins  # "t" computed twice or once


async def test_a_running_input_whose_leader_left_answers_the_joiner_from_its_batch(
    tiny_model_dir: Path,
) -> None:
    """The leader leaves while 4 of its 8 texts run and 4 wait: the running ones still answer
    the joiner, the waiting ones are queued again for it; each text is computed once (review:
    12-13 inputs computed for 8, the joiner waiting 0.71-0.88 s)."""
    backend = FakeBackend(delay=0.3)
    texts = [f"text {k}" for k in range(8)]
    async with started(_model(tiny_model_dir, backend, max_batch_requests=4)) as model:
        leader = asyncio.create_task(model.embed(req(*texts)))
        await eventually(lambda: model.batcher.in_flight == 1 and model.batcher.queued == 4)
        joiner = asyncio.create_task(model.embed(req(*texts)))
        await eventually(lambda: model._counts.dedupe_joined == 8)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        got = await joiner
        alone = await model.embed(req(*texts, cache=False))
    assert [size for size, _ in backend.batches] == [4, 4, 4, 4]  # 8 once, then "alone"
    for a, b in zip(got.vectors, alone.vectors, strict=True):
        np.testing.assert_array_equal(a, b)
