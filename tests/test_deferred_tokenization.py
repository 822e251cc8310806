"""Short texts queue untokenized and are tokenized with their batch in the inference thread."""

from __future__ import annotations

import asyncio
from pathlib import Path

from embedplex.backends.fake import FakeBackend
from helpers import fake_app, running


async def test_a_bad_input_fails_alone_and_good_neighbours_are_served(
    tiny_model_dir: Path,
) -> None:
    """One batch holds a too-long text of one request and good texts of others."""
    backend = FakeBackend(delay=0.3)
    app = fake_app(tiny_model_dir, backend, tokenize_inline_chars=4096, auto_truncate=False)
    too_long = "a " * 600  # short enough to be deferred, more tokens than the model takes
    async with running(app) as client:
        first = asyncio.create_task(client.post("/embed", json={"inputs": "keeps the backend"}))
        await asyncio.sleep(0.1)  # the backend is busy: what comes next queues together
        replies = await asyncio.gather(
            client.post("/embed", json={"inputs": ["fine", too_long]}),
            client.post("/embed", json={"inputs": "also fine"}),
            client.post("/v1/embeddings", json={"input": "and this one"}),
        )
        assert (await first).status_code == 200
    bad, good, also_good = replies
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("input 1 has ")
    assert good.status_code == 200
    assert also_good.status_code == 200
    assert also_good.json()["usage"]["prompt_tokens"] > 0
    # The three requests after the first ran as one batch of four texts.
    assert [size for size, _ in backend.batches] == [1, 3]


async def test_usage_and_vectors_match_tokenizing_before_queueing(tiny_model_dir: Path) -> None:
    texts = ["hello world", "a somewhat longer sentence, with punctuation!", "東京"]
    answers = []
    for inline in (4096, 0):  # deferred to the batch, or tokenized in the pool first
        app = fake_app(tiny_model_dir, FakeBackend(), tokenize_inline_chars=inline)
        async with running(app) as client:
            r = await client.post("/v1/embeddings", json={"input": texts})
            assert r.status_code == 200
            answers.append(r.json())
    assert answers[0]["usage"] == answers[1]["usage"]
    assert [d["embedding"] for d in answers[0]["data"]] == [
        d["embedding"] for d in answers[1]["data"]
    ]


async def test_a_batch_underrated_before_tokenizing_runs_in_pieces_within_the_budget(
    tiny_model_dir: Path,
) -> None:
    """Deferred costs are estimates: the real padded size decides the passes, by the same budget."""
    backend = FakeBackend(delay=0.3)
    backend.run_tokens = 40  # the budget in force: 40 padded tokens per batch
    app = fake_app(tiny_model_dir, backend, inference_streams=1)
    # Each estimated 6 tokens, really 12 (a token per 2 characters); distinct, since identical
    # texts in flight would share one slot (models/dedupe.py).
    texts = [" ".join(letter * 10) for letter in "abcd"]
    async with running(app) as client:
        first = asyncio.create_task(client.post("/embed", json={"inputs": "keeps it busy"}))
        await asyncio.sleep(0.1)
        # Four estimated at 6 x 4 = 24 queue as one batch; really 12 x 4 = 48 > 40.
        replies = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
        alone = [await client.post("/embed", json={"inputs": t}) for t in texts]
        assert (await first).status_code == 200
    assert [r.status_code for r in replies] == [200] * 4
    assert backend.batches[1:3] == [(3, 12), (1, 12)]  # 36 and 12 padded tokens: each fits
    assert [r.json() for r in replies] == [r.json() for r in alone]
