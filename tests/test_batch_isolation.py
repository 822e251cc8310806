"""One input that breaks a forward pass fails its own request, not its batch-mates'
(``models/isolation.py``)."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedplex.config import Settings
from embedplex.core.errors import BackendError, FatalBackendError
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.isolation import isolating
from tiny_models import make_tiny_bert

GOOD = ["the cat", "a dog", "the quick fox", "hello world", "the red text", "a blue model"]
BAD = "the embedding"  # holds the word the patched backend below cannot take


def _failing_on(marker: int) -> Any:
    """A run that raises, as a backend does on an input it cannot take, when a row holds
    ``marker``; it counts its calls."""

    calls: list[int] = []

    def run(rows: list[list[int]]) -> list[int]:
        calls.append(len(rows))
        if any(marker in row for row in rows):
            raise RuntimeError("cannot take this input")
        return [sum(row) for row in rows]

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_only_the_rows_that_fail_alone_fail() -> None:
    rows = [[k, k + 1] for k in range(16)]
    rows[5] = [99, 1]
    run = _failing_on(99)
    out = isolating(run, rows)
    assert [isinstance(r, BackendError) for r in out] == [k == 5 for k in range(16)]
    good = [k for k in range(16) if k != 5]
    assert [out[k] for k in good] == [sum(rows[k]) for k in good]
    assert len(run.calls) == 1 + 2 * 4  # the batch, then both halves at each of 4 levels


def test_a_broken_model_costs_a_bounded_number_of_passes() -> None:
    """Every row fails: the search stops at its budget, and every row gets the error."""
    n = 128
    run = _failing_on(0)
    out = isolating(run, [[0]] * n)
    assert all(isinstance(r, BackendError) for r in out)
    assert len(run.calls) <= 1 + 4 * math.ceil(math.log2(n))


def test_our_own_errors_and_a_lone_row_are_not_split() -> None:
    def dead(rows: list[int]) -> list[int]:
        raise FatalBackendError("the backend is dead")

    with pytest.raises(FatalBackendError):
        isolating(dead, [1, 2, 3])
    with pytest.raises(RuntimeError):
        isolating(_failing_on(7), [[7]])


def test_a_backends_own_error_is_split_as_any_failure() -> None:
    """torch's out-of-memory comes as a BackendError: a smaller pass may fit, so it is split
    too, and a row that fails alone keeps the backend's own words."""

    def out_of_memory(rows: list[int]) -> list[int]:
        if len(rows) > 2 or 7 in rows:
            raise BackendError("out of memory on cuda: try smaller batches")
        return rows

    out = isolating(out_of_memory, [1, 2, 3, 7])
    assert out[:2] == [1, 2] and out[2] == 3
    assert isinstance(out[3], BackendError) and "out of memory" in str(out[3])


@pytest.mark.slow
async def test_a_bad_input_fails_its_request_alone(tmp_path: Path) -> None:
    """Callers batched with an input the backend cannot take get their vectors (the same as
    alone); the caller of that input gets 424 (BackendError)."""
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=11)
    settings = Settings(
        model_id=str(model_dir), cache_dir=tmp_path / "c", inference_streams=1, cache_max_bytes=0
    )
    model = LocalEmbeddingModel.load(settings)
    await model.start()
    try:
        alone = [(await model.embed(EmbedRequest(inputs=[t]))).vectors[0] for t in GOOD]
        marker = model.tokenizer.encode([BAD], truncate=True)[0].ids[2]
        embed, gate, sizes = model.backend.embed, threading.Event(), []
        loop, started = asyncio.get_running_loop(), asyncio.Event()

        def patched(batch: Any) -> Any:  # the first batch holds the thread until all queue
            sizes.append(len(batch.input_ids))
            if len(sizes) == 1:
                loop.call_soon_threadsafe(started.set)
                gate.wait(10)
            if (batch.input_ids == marker).any():
                raise RuntimeError("cannot take this input")
            return embed(batch)

        model.backend.embed = patched  # type: ignore[method-assign]
        first = asyncio.ensure_future(model.embed(EmbedRequest(inputs=[GOOD[0]])))
        await asyncio.wait_for(started.wait(), 10)
        rest = [
            asyncio.ensure_future(model.embed(EmbedRequest(inputs=[t])))
            for t in [*GOOD[1:3], BAD, *GOOD[3:]]
        ]
        await asyncio.sleep(0.1)  # all queued behind the held batch
        gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await model.close()
    assert sizes[1] == len(GOOD)  # the six others ran as one batch, which failed
    assert isinstance(results[3], BackendError)
    got = [r for k, r in enumerate(results) if k != 3]
    for vector, expected in zip(got, alone, strict=True):
        assert not isinstance(vector, BaseException), vector
        assert np.allclose(vector.vectors[0], expected, atol=1e-5)
