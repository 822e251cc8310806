"""``embedplex bench offline``: one stream times its passes; several run at once."""

from __future__ import annotations

import threading
from pathlib import Path

from embedplex.backends.base import TokenBatch
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import load_spec
from embedplex.backends.pooling import Floats
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.bench.offline import run_offline
from embedplex.bench.workload import TokenSpec


class Overlap(FakeBackend):
    """A fake backend that records how many passes ran at once."""

    def __init__(self) -> None:
        super().__init__(delay=0.01)
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self._count = threading.Lock()

    def embed(self, batch: TokenBatch) -> Floats:
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())
        try:
            return super().embed(batch)
        finally:
            with self._count:
                self.running -= 1


def _tokenizer(model_dir: Path) -> TextTokenizer:
    spec = load_spec(str(model_dir), model_dir)
    return TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )


def test_streams_run_batches_at_once(tiny_model_dir: Path) -> None:
    backend = Overlap()
    result = run_offline(
        backend,
        _tokenizer(tiny_model_dir),
        tokens=TokenSpec(14, 14),
        batch=4,
        min_time=0.2,
        streams=2,
        threads=1,
    )
    assert backend.most == 2 and len(backend.threads) >= 2
    assert result.layout == "2x1" and result.streams == 2
    assert result.batches >= 6  # at least min_batches per stream
    # Passes of 4 texts that sleep 10 ms: one stream can never pass 400 texts/s, two can.
    assert 400 < result.texts_per_s <= 800


def test_one_stream_runs_in_the_caller(tiny_model_dir: Path) -> None:
    backend = Overlap()
    result = run_offline(
        backend, _tokenizer(tiny_model_dir), tokens=TokenSpec(14, 14), batch=4, min_time=0.2
    )
    assert backend.most == 1 and backend.threads == {threading.get_ident()}
    assert result.layout == "1x?"
    assert 0 < result.texts_per_s <= 400
