"""Short texts queue untokenized and are tokenized with their batch in the inference thread."""

from __future__ import annotations

import asyncio
from pathlib import Path

from embedplex.backends.fake import FakeBackend
from embedplex.models.local import batch_budget, fitting_pieces
from helpers import fake_app, running


def test_fitting_pieces() -> None:
    assert fitting_pieces([], 100) == []
    assert fitting_pieces([5, 3, 4], None) == [[0, 1, 2]]
    assert fitting_pieces([5, 3, 4], 15) == [[0, 1, 2]]
    # Over budget: length-sorted pieces, each padded size (longest x rows) within the budget.
    lengths = [50, 10, 40, 10, 12, 60]
    pieces = fitting_pieces(lengths, 60)
    assert sorted(k for piece in pieces for k in piece) == list(range(len(lengths)))
    for piece in pieces:
        assert max(lengths[k] for k in piece) * len(piece) <= 60 or len(piece) == 1
    assert pieces[0] == [1, 3, 4]  # the three shortest together: 12 x 3 = 36


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


def test_batch_budget_is_one_forward_pass_of_the_backend() -> None:
    assert batch_budget(16384, None, 256) == 16384  # the backend runs any batch whole
    assert batch_budget(16384, 2048, 256) == 2048  # it runs 2,048 at a time: so does a batch
    assert batch_budget(1024, 2048, 256) == 1024  # the setting, when it is lower
    assert batch_budget(16384, 128, 256) == 256  # one input of the longest length always fits
