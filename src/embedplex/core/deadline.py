"""A request's deadline: how long its caller will wait, carried to the remote providers.

The pipeline's ``RequestDeadline`` stage (``api/stages.py``) sets it for every request: the
configured ``request_timeout_s``, tightened by the client's ``X-Request-Timeout`` header (or the
read timeout the openai SDK announces in ``X-Stainless-Read-Timeout``). It travels in a context
variable, so a route need not pass it on: a remote model's wait is bounded by it
(``providers/router.py``), each queued text carries it to its batch, and an upstream call makes
no attempt that the latest of its batch's callers would no longer wait for
(``providers/http.py``). A Ray model's call to a replica is bounded by it too
(``models/ray.py``). A local model reads it only while a long request waits for a tokenizer
thread; once queued, the queue timeout (a request waits at most that long without any of its
inputs starting: docs/reliability.md) and the inference watchdog bound it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class Deadline(NamedTuple):
    """``at``: a ``time.monotonic()`` instant (asyncio's loop clock on every platform we run
    on); ``seconds``: the budget it was set with and ``source`` where it came from, for the
    504's message. A tuple: one is made for every request, refusals included."""

    at: float
    seconds: float
    source: str

    @classmethod
    def after(cls, seconds: float, source: str) -> Deadline:
        return cls(time.monotonic() + seconds, seconds, source)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def describe(self) -> str:
        """For messages: "the request deadline (2s, X-Request-Timeout)"."""
        return f"the request deadline ({self.seconds:g}s, {self.source})"


class _Shutdown:
    """When the process will stop serving (SIGTERM: the pre-stop delay plus the grace period),
    as a ``time.monotonic()`` instant; None while it runs normally. Process-wide: a signal
    handler sets it, every upstream call reads it, so retry budgets are cut to fit the drain."""

    at: float | None = None


SHUTDOWN = _Shutdown()


def drain_by(at: float | None) -> None:
    """Set (SIGTERM) or clear (tests) the instant the drain must be over."""
    SHUTDOWN.at = at


async def within(work: Awaitable[T], seconds: float, timed_out: Callable[[], BaseException]) -> T:
    """``work``'s result if it comes within ``seconds``, else ``work`` cancelled and
    ``timed_out()`` raised; a TimeoutError of ``work``'s own passes through as it is."""
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            return await work
    except TimeoutError:
        if not scope.expired():
            raise
        raise timed_out() from None


REQUEST_DEADLINE: ContextVar[Deadline | None] = ContextVar("embedplex_deadline", default=None)
# The latest deadline among the callers of the upstream call running in this task (set by a
# provider's batch function, read by the HTTP transport); None: no caller set one.
BATCH_DEADLINE: ContextVar[float | None] = ContextVar("embedplex_batch_deadline", default=None)


def bound_batch(deadlines: list[float | None]) -> None:
    """Bound the upstream call of this task by its most patient caller (``BATCH_DEADLINE``);
    a caller without a deadline leaves it unbounded."""
    if deadlines and None not in deadlines:
        BATCH_DEADLINE.set(max(d for d in deadlines if d is not None))
