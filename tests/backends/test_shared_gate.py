"""Two ONNX models sharing the process's core gate: "alone" means alone in the process."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_solo_session import Recording

from embedplex.backends.base import TokenBatch
from embedplex.backends.model_files import load_spec
from embedplex.backends.onnx import OnnxBackend
from embedplex.backends.passes import CoreGate
from embedplex.backends.tokenizer import TextTokenizer
from tiny_models import make_tiny_bert

pytestmark = pytest.mark.slow


def backend(tmp_path: Path, seed: int, gate: CoreGate) -> tuple[OnnxBackend, TokenBatch]:
    model_dir = make_tiny_bert(tmp_path / f"tiny-{seed}", seed=seed)
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    loaded = OnnxBackend.load(
        spec,
        dtype="float32",
        device="cpu",
        cache_dir=tmp_path / "cache",
        threads=1,
        solo_threads=2,
        gate=gate,
    )
    return loaded, TokenBatch.collate(tokenizer.encode(["hello world", "x"], truncate=True))


def test_a_pass_beside_another_models_pass_is_not_alone(tmp_path: Path) -> None:
    gate = CoreGate(2)
    (a, batch_a), (b, batch_b) = backend(tmp_path, 1, gate), backend(tmp_path, 2, gate)
    log: list[str] = []
    a_solo = Recording("a-solo", a._solo, log)
    a._solo = a_solo
    b._session, b._solo = Recording("b-main", b._session, log), Recording("b-solo", b._solo, log)

    b.embed(batch_b)
    assert log == ["b-solo"]  # nothing else in flight anywhere: every core

    a_solo.hold = threading.Event()
    first = threading.Thread(target=a.embed, args=(batch_a,))
    first.start()
    assert a_solo.entered.wait(10)
    b.embed(batch_b)  # model a has a pass in flight: b takes its one-thread session
    a_solo.hold.set()
    first.join(10)
    assert log == ["b-solo", "a-solo", "b-main"]
    assert gate.running == 0
