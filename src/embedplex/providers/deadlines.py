"""The routed requests' deadlines on one loop timer, instead of an ``asyncio.timeout`` each.

``asyncio.timeout_at`` per request made a ``Timeout``, a loop timer (a libuv timer under
uvloop) and its cancellation for every routed request: measured under load, about 5% of the
router process's CPU. Nearly every request is answered long before its deadline, so here a
request costs a heap entry: one timer for the whole loop is armed for the earliest live
deadline, entries of answered requests are dropped lazily from the top of the heap, and the
timer cancels the task of each request whose deadline passed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# A deadline within this of the loop's clock counts as passed (the loop's timers may fire up to
# a clock tick early: uvloop's clock is in milliseconds).
_SLACK_S = 0.001


class DeadlineExpired(Exception):
    """The awaited work was cancelled because its deadline passed."""


class _Entry:
    """One registered wait: its deadline, its task until it is over (None after), whether the
    timer cancelled it, and the task's pending cancels when it began (``Task.cancelling``)."""

    __slots__ = ("at", "cancelling", "fired", "task")

    def __init__(self, at: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.at = at
        self.task: asyncio.Task[object] | None = task  # None once the request is over
        self.fired = False
        self.cancelling = cancelling


class DeadlineTimer:
    """Cancels registered tasks at their deadlines, with one timer per loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")

    async def run(
        self, at: float, work: Awaitable[T], expired: Callable[[], Exception] = DeadlineExpired
    ) -> T:
        """``work``, awaited in the current task; ``expired()`` is raised if ``at`` (loop
        clock) passes first (the work is cancelled)."""
        entry = self.enter(at)
        if entry is None:  # cannot happen in a request; no task to cancel: no deadline
            return await work
        try:
            return await work
        except asyncio.CancelledError:
            if timed_out(entry):
                raise expired() from None
            raise
        finally:
            entry.task = None

    def enter(self, at: float) -> _Entry | None:
        """Cancel the current task at ``at`` (loop clock) unless its entry's ``task`` is set
        to None first; None outside a task. ``run`` in the caller's own coroutine, for the
        hot path that cannot afford one more: on ``CancelledError`` ask ``timed_out(entry)``,
        and in ``finally`` set ``entry.task = None``."""
        task = asyncio.current_task()
        if task is None:
            return None
        # Cancels requested before ours are not ours to take back.
        entry = _Entry(at, task, task.cancelling())
        heap = self._heap
        while heap and heap[0][2].task is None:  # answered requests at the top: drop them
            heapq.heappop(heap)
        heapq.heappush(heap, (at, next(self._seq), entry))
        if at < self._armed_at:
            self._arm(at)
        return entry

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = at
        self._handle = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = float("inf")
        now = self._loop.time() + _SLACK_S
        heap = self._heap
        while heap:
            at, _, entry = heap[0]
            task = entry.task
            if task is not None and at > now:
                self._arm(at)
                return
            heapq.heappop(heap)
            if task is not None:
                entry.fired = True
                entry.task = None
                task.cancel()


def timed_out(entry: _Entry) -> bool:
    """On a ``CancelledError`` in ``entry``'s task: whether the cancel was the timer's (and
    then it is taken back: the caller raises its timeout instead)."""
    if not entry.fired:
        return False
    task = asyncio.current_task()
    return task is not None and task.uncancel() <= entry.cancelling


_timers: dict[asyncio.AbstractEventLoop, DeadlineTimer] = {}
_last: DeadlineTimer | None = None  # the last one asked for: nearly always the one wanted


def deadline_timer() -> DeadlineTimer:
    """The running loop's ``DeadlineTimer``."""
    global _last
    loop = asyncio.get_running_loop()
    timer = _last
    if timer is not None and timer._loop is loop:
        return timer
    timer = _timers.get(loop)
    if timer is None:
        if len(_timers) > 8:  # loops of finished tests: drop the closed ones
            for old in [k for k in _timers if k.is_closed()]:
                del _timers[old]
        timer = _timers[loop] = DeadlineTimer(loop)
    _last = timer
    return timer
