"""The ONNX backend's second session: a pass with no other in flight gets more threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedplex.backends.base import TokenBatch
from embedplex.backends.model_files import load_spec
from embedplex.backends.onnx import OnnxBackend
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.models.embedding import LocalEmbeddingModel
from tiny_models import make_tiny_bert

pytestmark = pytest.mark.slow


class Recording:
    """A session that notes who ran on it and, while ``hold`` is set, blocks its runs."""

    def __init__(self, name: str, session: Any, log: list[str]) -> None:
        self.name = name
        self.session = session
        self.log = log
        self.entered = threading.Event()
        self.hold: threading.Event | None = None

    def run(self, outputs: Any, feeds: Any) -> Any:
        self.log.append(self.name)
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        return self.session.run(outputs, feeds)


def tiny_backend(tmp_path: Path, solo_threads: int | None) -> tuple[OnnxBackend, TokenBatch]:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=3)
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    backend = OnnxBackend.load(
        spec,
        dtype="float32",
        device="cpu",
        cache_dir=tmp_path / "cache",
        threads=1,
        solo_threads=solo_threads,
    )
    texts = ["hello world", "a longer text about foxes and dogs", "x"]
    return backend, TokenBatch.collate(tokenizer.encode(texts, truncate=True))


def test_a_lone_pass_runs_on_the_solo_session_and_a_concurrent_one_does_not(
    tmp_path: Path,
) -> None:
    backend, batch = tiny_backend(tmp_path, solo_threads=2)
    log: list[str] = []
    main = Recording("main", backend._session, log)
    solo = Recording("solo", backend._solo, log)
    backend._session, backend._solo = main, solo

    alone = backend.embed(batch)
    assert log == ["solo"]

    # While one pass is in flight (held inside the solo session), the next takes the main one.
    solo.hold = threading.Event()
    first = threading.Thread(target=backend.embed, args=(batch,))
    first.start()
    assert solo.entered.wait(10)
    beside = backend.embed(batch)
    solo.hold.set()
    first.join(10)
    assert log == ["solo", "solo", "main"]
    # Both sessions hold the same model: the same vectors either way.
    np.testing.assert_allclose(alone, beside, rtol=1e-5, atol=1e-6)

    # Once the other pass is done, a lone pass goes back to the solo session.
    backend.embed(batch)
    assert log[-1] == "solo"


def test_without_solo_threads_there_is_one_session(tmp_path: Path) -> None:
    backend, batch = tiny_backend(tmp_path, solo_threads=None)
    assert backend._solo is None
    assert backend.embed(batch).shape == (3, 32)


def test_the_server_layout_builds_the_solo_session(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", seed=4)
    common = {"model_id": str(model_dir), "cache_dir": tmp_path / "c", "inference_streams": 2}
    with_solo = LocalEmbeddingModel.load(
        Settings(**common, inference_threads=1, inference_solo_threads=2)
    )
    without = LocalEmbeddingModel.load(
        Settings(**common, inference_threads=1, inference_solo_threads=1)
    )
    assert with_solo.backend._solo is not None
    assert without.backend._solo is None
