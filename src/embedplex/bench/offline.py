"""``embedplex bench offline``: the backend alone, in process; the ceiling a server is held to.

Each cell tokenizes its texts once, then times collate + forward + pooling (what the server's
batch loop does per batch) for at least ``min_time`` seconds and ``min_batches`` batches. With
``streams`` > 1, that many threads run batches at once (as the server's inference streams do)
and texts/s counts them all.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from embedplex.backends.base import Backend, TokenBatch
from embedplex.backends.tokenizer import Encoded, TextTokenizer
from embedplex.batching.cost import TokenBudget
from embedplex.bench.stats import markdown_table
from embedplex.bench.workload import TokenSpec, make_texts
from embedplex.models.layout import InferenceLayout

OFFLINE_COLUMNS = (
    "backend",
    "dtype",
    "layout",
    "tokens",
    "batch",
    "batches",
    "ms/batch p50",
    "texts/s",
)


@dataclass(frozen=True, kw_only=True)
class OfflineResult:
    backend: str
    dtype: str
    tokens: str
    padded_length: int
    batch: int
    batches: int
    ms_per_batch_p50: float
    texts_per_s: float
    streams: int = 1  # batches run at once
    threads: int = 0  # intra-op threads of each (0: not recorded)

    @property
    def layout(self) -> str:
        """``streams x threads``, as the server's inference layout prints."""
        if not self.threads:
            return f"{self.streams}x?"
        return str(InferenceLayout(self.streams, self.threads))

    def row(self) -> list[str]:
        return [
            self.backend,
            self.dtype,
            self.layout,
            self.tokens,
            str(self.batch),
            str(self.batches),
            f"{self.ms_per_batch_p50:,.2f}",
            f"{self.texts_per_s:,.1f}",
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_offline(
    backend: Backend,
    tokenizer: TextTokenizer,
    *,
    tokens: TokenSpec,
    batch: int,
    min_time: float = 2.0,
    min_batches: int = 3,
    max_time: float = 60.0,
    seed: int = 0,
    streams: int = 1,
    threads: int = 0,
) -> OfflineResult:
    """Time forward passes of ``batch`` texts of ``tokens`` tokens (bounded by ``max_time``),
    ``streams`` batches at once."""
    pool = 8  # distinct batches, cycled
    texts = make_texts(tokens, batch * pool, seed=seed)
    encoded = tokenizer.encode(texts, truncate=True)
    batches = [encoded[i * batch : (i + 1) * batch] for i in range(pool)]
    # A batch runs in the passes the server's cost model would cut it into (one pass limit
    # each, length-sorted), as the inference thread runs it.
    budget = TokenBudget(tokens=backend.run_tokens, items=batch)

    def run(chunk: list[Encoded]) -> None:
        budget.run_in_pieces(
            chunk,
            [len(e) for e in chunk],
            lambda rows: list(backend.embed(TokenBatch.collate(rows))),
        )

    run(batches[0])  # warm-up: first run allocates
    times: list[list[float]] = [[] for _ in range(streams)]
    start = time.perf_counter()

    def stream(k: int) -> None:
        mine = times[k]
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= max_time or (elapsed >= min_time and len(mine) >= min_batches):
                return
            chunk = batches[(len(mine) * streams + k) % pool]
            t0 = time.perf_counter()
            run(chunk)
            mine.append(time.perf_counter() - t0)

    if streams == 1:
        stream(0)
    else:
        workers = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    # Each stream's rate from the time inside its own passes, summed: they overlap throughout
    # but the last one to finish runs its final pass alone, so this errs high (a ceiling).
    rate = sum(batch * len(mine) / sum(mine) for mine in times if mine)
    done = [t for mine in times for t in mine]
    return OfflineResult(
        backend=backend.name,
        dtype=backend.dtype,
        tokens=str(tokens),
        padded_length=max(len(e) for e in encoded),
        batch=batch,
        batches=len(done),
        ms_per_batch_p50=statistics.median(done) * 1000,
        texts_per_s=rate,
        streams=streams,
        threads=threads,
    )


def offline_table(results: Sequence[OfflineResult]) -> str:
    return markdown_table(OFFLINE_COLUMNS, [r.row() for r in results])
