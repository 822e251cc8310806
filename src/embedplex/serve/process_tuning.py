"""How a serving process shares the CPU and memory: the GIL switch interval and malloc's mmap
threshold (once, before it loads a model), and worker threads that run below the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import sys
import threading
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). An
# inference thread needs the GIL back after each forward pass to pool and take its next batch;
# at 5 ms it waited behind the event loop's busy stretches (measured at 64 clients: a batch
# started 5.4 ms after it was handed over; 0.8 ms at 0.5 ms, +3-5% throughput).
GIL_SWITCH_INTERVAL_S = 0.0005

# glibc serves allocations from this size up with their own mmap, returned on free. By default
# the threshold rises to the size of every such block freed, so after a few batches the forward
# passes' multi-MB outputs come from per-thread heaps instead, which fragment under mixed lengths.
# Side by side, four minutes of 5-256-token load on two inference streams each: 514 -> 524 MB by
# default, 482 MB flat with the threshold fixed (and 225 vs 266 MB at idle), same throughput.
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


# The cyclic garbage collector's youngest generation runs when tracked allocations minus
# deallocations pass this count (CPython's default: 700; 3.13 raised it to 2,000). With 64
# requests in flight, the objects they hold (frames, futures, dicts, the HTTP cycle's) pass 700
# again and again, so the event loop ran a young collection every few dozen requests, each one
# walking every live young object and promoting it, and an older one every tenth time: measured
# in process, 5-10% of the loop's CPU per request (docs/architecture.md, "Per-request CPU").
# Nearly all of those objects are freed by their reference counts before a collection at this
# threshold comes; what a cycle keeps waits a little longer to be freed.
GC_GEN0_THRESHOLD = 10_000


def tune_process() -> None:
    """The GIL switch interval, the collector's young threshold and a fixed mmap threshold
    (glibc only; env settings win)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        fix_mmap_threshold(MMAP_THRESHOLD_BYTES)


def fix_mmap_threshold(size: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, size)``; False where the C library has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, size))
    if not ok:
        logger.warning("could not fix the malloc mmap threshold; RSS may creep under mixed load")
    return ok


# The event loop answers every request and every 429 itself, between the inference threads'
# forward passes on the same cores. At equal priority a loop woken by a request waited for a core
# behind them; with the inference threads niced the scheduler hands it one at once. Side by side
# (two servers, 128 clients against an admission limit of 64): refusal p99 14.3/18.3 ms against
# 24.6/24.9, accepted throughput the same; 64 clients: 451/457 against 439/440 req/s.
def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux, where each thread has its own
    nice value; threads it starts later inherit it). Elsewhere, or if refused, nothing."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        logger.warning("could not lower a worker thread's priority: %s", exc)


def worker_pool(workers: int, name: str, nice: int) -> ThreadPoolExecutor:
    """A thread pool whose threads, as they start, lower themselves ``nice`` below the thread
    that started them (the one whose ``submit`` needed a new worker)."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_thread_priority, initargs=(nice,)
    )


async def run_lowered(fn: Callable[[], T], nice: int) -> T:
    """``fn()`` in a daemon thread of its own, ``nice`` below the caller: threads that ``fn``
    starts (ONNX Runtime's intra-op pool, when it loads a model) keep that priority.

    A daemon thread, not a pool's: a pool's threads are joined when the interpreter exits, so
    a ``fn`` blocked for good (``ray.init`` retrying an address, ``serve.status()`` once the
    cluster is gone) kept the process alive after Ctrl-C. Awaiting this can be cancelled;
    ``fn`` then runs on, for nobody, until it returns or the process ends."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if future.done():  # the caller went away
            return
        if ok:
            future.set_result(typing.cast(T, value))
        else:
            future.set_exception(typing.cast(BaseException, value))

    def run() -> None:
        lower_thread_priority(nice)
        try:
            result: tuple[bool, object] = (True, fn())
        except BaseException as exc:
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(deliver, *result)

    threading.Thread(target=run, name="load", daemon=True).start()
    return await future
