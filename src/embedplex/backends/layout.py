"""How a local model uses the cores: batches run at once (streams) x intra-op threads each.

On a small CPU, two batches at once with one thread each beat one batch on every core: a
single-threaded forward pass never waits at an operator's barrier for a core the event loop has
taken, and one stream's Python work (tokenizing, pooling) overlaps the other's forward pass.
Measured on 2 cores (all-MiniLM-L6-v2, 14-token texts, batch 32, offline): 2 x 1 about 1,070
texts/s against 1 x 2 about 850; served at 64 clients about +15% (docs/architecture.md). A
batch of one is as fast on one thread as on two, so latency at low load is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from embedplex.config import Settings


@dataclass(frozen=True, slots=True)
class InferenceLayout:
    streams: int  # batches in flight at once, each from its own inference thread
    threads: int  # intra-op threads of each forward pass

    def __str__(self) -> str:
        return f"{self.streams}x{self.threads}"


def inference_layout(settings: Settings, cores: int | None = None) -> InferenceLayout:
    """The settings' layout, defaults filled in for this machine (``cores``: os.cpu_count())."""
    cores = cores or os.cpu_count() or 1
    streams = settings.inference_streams
    if streams is None:
        streams = 2 if cores >= 2 and _onnx_on_cpu(settings) else 1
    threads = settings.inference_threads or max(1, cores // streams)
    return InferenceLayout(streams, threads)


def _onnx_on_cpu(settings: Settings) -> bool:
    """Whether the model runs on ONNX Runtime's CPU provider (GPUs and torch keep one stream)."""
    if settings.backend != "onnx" or settings.device == "cuda":
        return False
    from embedplex.backends.onnx import session_providers

    return session_providers(settings.device)[0] == "CPUExecutionProvider"
