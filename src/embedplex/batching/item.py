"""The unit of work the batcher moves: one input of one caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from embedplex.core.tenant import Priority

P = TypeVar("P")
R = TypeVar("R")


class Progress:
    """One request's progress clock, shared by all its inputs: the instant its queued inputs
    time out, ``queue_timeout`` after the request was queued or after one of its inputs last
    started a batch, whichever is later (the batcher moves it on as it takes them).

    So the queue timeout bounds a wait without progress: a request's later inputs, which wait
    behind its own earlier ones, do not time out while those are being served.
    """

    __slots__ = ("deadline",)

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline


@dataclass(slots=True, eq=False)
class Item(Generic[P, R]):
    """One input waiting for its result.

    ``cost`` is what the item weighs against a batch budget: its token count for local models
    (batches are cut on padded size), 1 for remote providers. Times are ``time.perf_counter``
    instants; the batcher stamps them so callers can report queue and inference time.
    ``deadline`` is when it times out if its request makes no progress; ``progress``, when
    given, is its request's clock, which moves that on (``expires_at``).
    ``tenant_key``, ``priority`` and ``weight`` say whose input it is and its key's share, for a
    queue that schedules on them (``batching/fair.py``).
    """

    payload: P
    cost: int
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float
    started_at: float = 0.0
    finished_at: float = 0.0
    batch_size: int = field(default=0)
    # The caller's tracing context (opaque here), so a batch span can link to every request.
    trace: object | None = None
    tenant_key: str | None = None
    priority: Priority = Priority.INTERACTIVE
    weight: int = 1
    progress: Progress | None = None

    @property
    def expires_at(self) -> float:
        """When it fails with QueueTimeoutError if still queued. The queue reads ``deadline``
        (every input, every cut) and asks this only of an input past it (``queues.py``)."""
        progress = self.progress
        return self.deadline if progress is None else progress.deadline

    @property
    def waiting(self) -> bool:
        """False once the caller has gone (cancelled) or the item was answered."""
        return not self.future.done()
