"""How a local model uses the cores: batches run at once (streams) x intra-op threads each.

On a small CPU, two batches at once with one thread each beat one batch on every core: a
single-threaded forward pass never waits at an operator's barrier for a core the event loop has
taken, and one stream's Python work (tokenizing, pooling) overlaps the other's forward pass.
Measured on 2 cores (all-MiniLM-L6-v2, 14-token texts, batch 32, offline): 2 x 1 about 1,070
texts/s against 1 x 2 about 850; served at 64 clients about +15% (docs/architecture.md).

A pass alone is another matter: on some CPUs (the AMD EPYC hosts here) a batch of one takes 1.3x
as long on one thread as on two, a 128-token text 1.8x. So with more than one stream the ONNX
backend keeps a second session on ``solo_threads`` (every core) for a pass that starts while no
other is in flight: at low load a request gets the whole CPU.

Several models in one process share the cores on purpose: each model keeps its own streams, but
every CPU forward pass of every model goes through one ``CoreGate`` (``core_gate``) whose
capacity is the cores (or more, when an explicit layout asks for more): a pass holds its
``threads`` of them, so two models under load together run at most as many passes at once as
one model would, and a pass is "alone" (solo session) only when no pass of any model is in
flight. With one model the gate never makes a pass wait: its streams x threads fit the capacity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from embedplex.backends.passes import CoreGate
from embedplex.config import Settings
from embedplex.core.cores import process_cores
from embedplex.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class InferenceLayout:
    streams: int  # batches in flight at once, each from its own inference thread
    threads: int  # intra-op threads of each forward pass
    solo_threads: int | None = None  # a pass with no other in flight, when more than ``threads``

    def __str__(self) -> str:
        solo = f" (alone: {self.solo_threads})" if self.solo_threads else ""
        return f"{self.streams}x{self.threads}{solo}"


def inference_layout(
    settings: Settings, cores: int | None = None, *, model: ModelConfig | None = None
) -> InferenceLayout:
    """A model's layout, defaults filled in for this machine (``cores``: the cores this process
    may use, ``core/cores.py``: its CPUs, capped by a container's CPU limit).

    ``model``: a resolved ``[[models]]`` table (its backend, device and streams); default: the
    flat settings' model. Threads per pass are process-wide settings.
    """
    cores = cores or process_cores()
    model = model or settings.flat_model()
    onnx_cpu = _onnx_on_cpu(model)
    streams = model.inference_streams
    if streams is None:
        streams = 2 if cores >= 2 and onnx_cpu else 1
    threads = settings.inference_threads or max(1, cores // streams)
    solo = settings.inference_solo_threads or (cores if streams > 1 else threads)
    return InferenceLayout(streams, threads, solo if onnx_cpu and solo > threads else None)


def core_gate(layouts: Iterable[InferenceLayout], cores: int | None = None) -> CoreGate:
    """The one gate of a process whose local models have ``layouts``.

    Capacity: the cores, or the largest streams x threads a layout asks for explicitly (so one
    model never waits at the gate, whatever its settings).
    """
    cores = cores or process_cores()
    return CoreGate(max([cores, *(layout.streams * layout.threads for layout in layouts)]))


def _onnx_on_cpu(model: ModelConfig) -> bool:
    """Whether the model runs on ONNX Runtime's CPU provider (GPUs and torch keep one stream)."""
    if model.backend != "onnx" or model.device == "cuda":
        return False
    from embedplex.backends.onnx_providers import session_providers

    return session_providers(model.device or "auto")[0] == "CPUExecutionProvider"
