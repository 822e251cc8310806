"""The process's core gate: several models under load never run more passes than the layout."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from embedplex.backends.fake import FakeBackend
from embedplex.backends.passes import CoreGate
from embedplex.config import ModelConfig, Settings
from embedplex.core.types import EmbedRequest
from embedplex.models.layout import InferenceLayout, core_gate, inference_layout
from test_gateway_models import local


def test_passes_hold_their_threads_and_wait_in_order() -> None:
    gate = CoreGate(2)
    log: list[str] = []
    release = {name: threading.Event() for name in ("p1", "p2", "big", "p3")}
    entered = {name: threading.Event() for name in release}

    def run(name: str, threads: int) -> None:
        with gate.forward(threads) as alone:
            log.append(f"{name}{' alone' if alone else ''}")
            entered[name].set()
            release[name].wait(10)

    def start(name: str, threads: int) -> threading.Thread:
        t = threading.Thread(target=run, args=(name, threads))
        t.start()
        return t

    threads = [start("p1", 1)]
    assert entered["p1"].wait(10)
    threads.append(start("p2", 1))
    assert entered["p2"].wait(10)
    threads.append(start("big", 2))  # needs both cores: waits for p1 and p2
    while not gate._waiting:
        pass
    threads.append(start("p3", 1))  # arrives after big: must not overtake it
    while len(gate._waiting) < 2:
        pass
    release["p1"].set()
    assert not entered["big"].wait(0.05) and not entered["p3"].is_set()
    release["p2"].set()
    assert entered["big"].wait(10)
    assert not entered["p3"].wait(0.05)
    release["big"].set()
    assert entered["p3"].wait(10)
    release["p3"].set()
    for t in threads:
        t.join(10)
    assert log == ["p1 alone", "p2", "big alone", "p3 alone"]
    assert gate.running == 0


def test_the_gate_fits_every_layout_and_the_cores() -> None:
    one = inference_layout(Settings(), cores=2)
    assert one == InferenceLayout(2, 1, 2)
    assert core_gate([one], cores=2).capacity == 2  # one model: its 2 streams never wait
    assert core_gate([one, one], cores=2).capacity == 2  # two models: still 2 passes at once
    assert core_gate([InferenceLayout(3, 2)], cores=2).capacity == 6  # explicit layout kept
    assert core_gate([], cores=4).capacity == 4


class Counting:
    """The real gate, counting the passes inside it (what the cores actually run)."""

    def __init__(self, gate: CoreGate) -> None:
        self.gate = gate
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    @contextmanager
    def forward(self, threads: int) -> Iterator[bool]:
        with self.gate.forward(threads) as alone:
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                yield alone
            finally:
                with self._lock:
                    self.now -= 1


async def test_two_models_under_load_never_run_more_passes_than_the_layout(
    tiny_model_dir: Path,
) -> None:
    settings = Settings(inference_streams=2, inference_threads=1, max_batch_requests=2)
    configs = [ModelConfig(name=n, model_id=str(tiny_model_dir)).resolved(settings) for n in "ab"]
    layouts = [inference_layout(settings, cores=2, model=c) for c in configs]
    counting = Counting(core_gate(layouts, cores=2))
    models = [
        local(tiny_model_dir, settings, c, FakeBackend(delay=0.005, gate=counting)) for c in configs
    ]
    assert [m.options.streams for m in models] == [2, 2]  # 4 batches in flight could run
    for m in models:
        await m.start()
    try:
        requests = [
            # Distinct texts: identical ones in flight would share a slot (models/dedupe.py).
            models[i % 2].embed(EmbedRequest(inputs=[f"hello {i} {k}" for k in range(i % 5 + 1)]))
            for i in range(80)
        ]
        results = await asyncio.gather(*requests)
    finally:
        for m in models:
            await m.close()
    assert len(results) == 80
    assert min(len(m.backend.batches) for m in models) >= 20  # both models under load
    assert counting.peak <= 2  # the layout: 2 passes of 1 thread on 2 cores, across both models
    assert counting.now == 0
