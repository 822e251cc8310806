"""The serving process's malloc, GIL and thread priority settings."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from embedplex.api.app import create_app
from embedplex.backends.base import TokenBatch
from embedplex.backends.fake import FakeBackend
from embedplex.backends.pooling import Floats
from embedplex.config import Settings
from embedplex.gateway import Gateway
from embedplex.serve.process_tuning import GC_GEN0_THRESHOLD, worker_pool
from helpers import fake_model, running

# In a fresh interpreter: allocates 1 MiB, frees it, allocates it again, and prints how many
# more blocks glibc serves by mmap while the second one is held.
PROBE = """
import ctypes, sys
from embedplex.serve.process_tuning import tune_process
if sys.argv[1] == "tuned":
    tune_process()
    print(sys.getswitchinterval())
    import gc; print(gc.get_threshold()[0])
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(1 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_blocks_stay_mmapped_after_one_is_freed() -> None:
    # By default glibc raises its threshold to a freed mmapped block's size: the second 1 MiB
    # comes from the heap. Tuned, it is mapped again (and returned to the OS when freed).
    assert probe("default") == ["0"]
    interval, gen0, mapped = probe("tuned")
    assert float(interval) == pytest.approx(0.0005)
    assert int(gen0) == GC_GEN0_THRESHOLD
    assert mapped == "1"


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class NiceRecordingBackend(FakeBackend):
    """Notes the CPU priority of the thread each forward pass runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.nice: list[int] = []

    def embed(self, batch: TokenBatch) -> Floats:
        self.nice.append(thread_nice())
        return super().embed(batch)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values")
def test_a_lowered_thread_and_the_threads_it_starts_run_below_the_caller() -> None:
    base = thread_nice()
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = thread_nice()

    def work() -> None:
        seen["worker"] = thread_nice()
        started = threading.Thread(target=child)
        started.start()
        started.join()

    with worker_pool(1, "test", 3) as pool:
        pool.submit(work).result(10)
    assert seen == {"worker": base + 3, "child": base + 3}
    assert thread_nice() == base  # the caller keeps its own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values")
@pytest.mark.parametrize("nice", [0, 4])
async def test_the_server_runs_loading_and_inference_below_the_event_loop(
    tiny_model_dir: Path, nice: int
) -> None:
    base = thread_nice()
    backend = NiceRecordingBackend()
    loaded_at: list[int] = []

    def factory(settings: Settings) -> Gateway:
        loaded_at.append(thread_nice())
        return Gateway([fake_model(tiny_model_dir, settings, backend)])

    settings = Settings(model_id=str(tiny_model_dir), inference_nice=nice)
    async with running(create_app(settings, gateway_factory=factory)) as client:
        response = await client.post("/v1/embeddings", json={"input": "hello"})
        assert response.status_code == 200
    assert loaded_at == [base + nice]
    assert backend.nice == [base + nice]
    assert thread_nice() == base  # the event loop's thread is left alone
