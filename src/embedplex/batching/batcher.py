"""The batching engine shared by local models and remote providers.

One ``Batcher`` owns one queue. Callers ``submit`` inputs and await one future per input; a
single loop task cuts batches (by count and cost budget), flushes them as soon as a batch slot is
free (``max_wait == 0``, local models) or when the batch is full, by count or by cost, or its
oldest item has waited ``max_wait`` (remote providers), and runs at most ``max_concurrency``
batches at once. Results go back to each future in order; a failed batch fails every future in
it; callers that have gone are skipped; a request none of whose inputs has started a batch for
``queue_timeout`` gets ``QueueTimeoutError`` for those still queued (``item.Progress``). A run
may also fail single inputs: an exception in a result's place fails that input's future alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from embedplex.batching.admission import SHARE_AT, Sharing, past_share, share_refusal
from embedplex.batching.cost import padded_cost
from embedplex.batching.item import Item, Progress
from embedplex.batching.queues import BatchQueue, FifoQueue
from embedplex.core.deadline import within
from embedplex.core.errors import (
    BackendError,
    EmbedplexError,
    FatalBackendError,
    NotReadyError,
    OverloadedError,
    QueueTimeoutError,
)
from embedplex.core.tenant import ANONYMOUS, Priority, Tenant

P = TypeVar("P")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# A result may be an exception: that input fails alone (see the module docstring).
RunBatch = Callable[[list[P]], Awaitable[Sequence[R | BaseException]]]


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """How a batcher cuts and flushes.

    max_items: most items in one batch (AIMD may lower it at run time via ``set_max_items``).
    max_cost: budget per batch; padded tokens for local models (``cost.TokenBudget.decide``),
        a sum of costs for remote providers, None for no budget.
    max_wait: seconds a batch may wait to fill after its first item; 0 flushes at once.
    max_quiet: with ``max_wait``, a batch that waits to fill flushes early once no item has
        arrived for this many seconds (the burst that filled it is over); 0: it waits the
        whole ``max_wait``.
    max_concurrency: batches in flight at once.
    max_queued: items allowed to wait; past it, ``submit`` refuses at once.
    queue_timeout: seconds a request may wait without progress: an input still queued fails
        with QueueTimeoutError once this long has passed since its request was queued and since
        one of its inputs last started a batch (a big request's later inputs wait behind its
        earlier ones, and do not time out while those are served).
    run_timeout: seconds one run may take before it is declared hung (the watchdog): its
        callers get 503 at once and the batcher is marked dead (a thread cannot be killed, so
        the backend cannot be trusted again; liveness restarts the process). None: no watchdog.
    cancel_abandoned: cancel a run once every caller of its batch has left (a deadline, a
        disconnect): for runs that are coroutines (remote calls), whose work and retries
        would otherwise go on for nobody. Not for runs in threads, which cannot stop.
    """

    max_items: int
    max_cost: int | None = None
    max_wait: float = 0.0
    max_quiet: float = 0.0
    max_concurrency: int = 1
    max_queued: int = 1024
    queue_timeout: float = 30.0
    run_timeout: float | None = None
    cancel_abandoned: bool = False

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_concurrency < 1 or self.max_queued < 1:
            raise ValueError("max_items, max_concurrency and max_queued must be at least 1")
        if self.max_cost is not None and self.max_cost < 1:
            raise ValueError("max_cost must be at least 1 (None: no budget)")
        if self.max_wait < 0 or self.max_quiet < 0 or self.queue_timeout <= 0:
            raise ValueError("max_wait and max_quiet must be >= 0 and queue_timeout > 0")
        if self.run_timeout is not None and self.run_timeout <= 0:
            raise ValueError("run_timeout must be > 0 (None: no watchdog)")


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one finished batch looked like (for metrics and adaptive sizing)."""

    size: int
    tokens: int
    padded_tokens: int
    duration: float
    error: BaseException | None
    # The batch itself, for observers that need per-item data (tracing links); read-only.
    items: Sequence[Item[Any, Any]] = ()


class BatchObserver(Protocol):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def on_admitted(self, n: int) -> None: ...
    def on_refused(self, n: int) -> None: ...
    def on_expired(self, n: int) -> None: ...
    def on_dropped(self, n: int) -> None: ...
    def on_batch_started(self, items: Sequence[Item[Any, Any]]) -> None: ...
    def on_batch_done(self, stats: BatchStats) -> None: ...


class NullObserver:
    """An observer that ignores everything (a base for observers that need few hooks)."""

    def on_admitted(self, n: int) -> None:
        pass

    def on_refused(self, n: int) -> None:
        pass

    def on_expired(self, n: int) -> None:
        pass

    def on_dropped(self, n: int) -> None:
        pass

    def on_batch_started(self, items: Sequence[Item[Any, Any]]) -> None:
        pass

    def on_batch_done(self, stats: BatchStats) -> None:
        pass


class Batcher(Generic[P, R]):
    def __init__(
        self,
        name: str,
        run: RunBatch[P, R],
        policy: BatchPolicy,
        *,
        queue: BatchQueue | None = None,
        observers: Sequence[BatchObserver] = (),
        cost_of: Callable[[P], int] | None = None,
    ) -> None:
        """``cost_of``: a payload's cost once its batch has run, for the batch's stats, when the
        cost given at ``submit`` was an estimate (local models tokenize short texts in the
        batch)."""
        self.name = name
        self._cost_of = cost_of
        self.policy = policy
        self._run = run
        self._queue: BatchQueue = queue if queue is not None else FifoQueue()
        self._observers = list(observers)
        self._max_items = policy.max_items
        self._in_flight = 0
        self._last_arrival = 0.0  # time.perf_counter() of the latest submit
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.fatal: BaseException | None = None
        self.fatal_at: float | None = None  # time.monotonic() when it died
        self.batches_run = 0
        self._sharing = Sharing()  # the keys that asked lately for room in the queue

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name=f"batcher:{self.name}")
            self._loop_task.add_done_callback(self._loop_ended)

    async def close(self, *, drain: bool = True, grace: float | None = None) -> None:
        """Stop taking work; with ``drain`` finish what is queued, else fail it."""
        self._closing = True
        if not drain:
            self._fail_all(NotReadyError("the server is shutting down"))
        self._wakeup.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), grace)
            except TimeoutError:
                self._loop_task.cancel()
                self._fail_all(NotReadyError("the server is shutting down"))
            except Exception:
                pass  # the loop had died: _loop_ended logged it and answered its callers
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> Batcher[P, R]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop that died of a bug would leave every caller waiting for its queue timeout:
        mark the batcher dead and answer them now."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logger.error("the batching loop of %s died", self.name, exc_info=exc)
        self._die(FatalBackendError(f"{self.name}'s batching loop failed ({type(exc).__name__})"))

    def _die(self, fatal: FatalBackendError) -> None:
        """Dead for good: readiness goes false, new work is refused, queued callers fail now."""
        if self.fatal is None:
            self.fatal = fatal
            self.fatal_at = time.monotonic()
        self._fail_all(NotReadyError(f"{self.name} is unavailable: {fatal.message}"))

    # -- state -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_items(self) -> int:
        return self._max_items

    def set_max_items(self, n: int) -> None:
        """Adjust the batch size at run time (adaptive sizing); capped by the policy."""
        self._max_items = max(1, min(n, self.policy.max_items))
        self._wakeup.set()

    def set_limits(self, max_items: int, max_cost: int | None) -> None:
        """Replace the policy's ``max_items`` (the cap of ``set_max_items``) and ``max_cost``
        at run time: a remote provider that learned its upstream's limits (docs/router.md).
        The batch size comes down to the new cap at once; it rises only by ``set_max_items``."""
        self.policy = dataclasses.replace(self.policy, max_items=max_items, max_cost=max_cost)
        self._max_items = min(self._max_items, self.policy.max_items)
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        return not len(self._queue) and not self._in_flight

    # -- admission -------------------------------------------------------------------------

    def submit(
        self,
        payloads: Sequence[P],
        costs: Sequence[int],
        *,
        trace: object | None = None,
        tenant: Tenant = ANONYMOUS,
        priority: Priority | None = None,
        admitted: bool = False,
    ) -> list[Item[P, R]]:
        """Queue every input of one request, or none of them.

        ``trace`` is the caller's tracing context, kept on each item for observers. ``tenant``
        and ``priority`` (default: the tenant's) go on each item for the queue to schedule on.
        ``admitted``: the inputs replace ones already counted against ``max_queued`` (a
        departed caller's input queued again for those who joined it, ``models/dedupe.py``),
        so they are not refused for the room that departed one still takes.

        Raises OverloadedError at once when the queue cannot take them all, and NotReadyError when
        the batcher is closing or its backend has died.
        """
        if self._closing or self._loop_task is None:
            raise NotReadyError(f"{self.name} is not accepting requests")
        if self.fatal is not None:
            raise NotReadyError(f"{self.name} is unavailable: its backend failed")
        n = len(payloads)
        if not admitted:
            self.room(n, tenant)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        deadline = now + self.policy.queue_timeout
        progress = Progress(deadline)  # one clock for the request: _dispatch moves it on
        key = tenant.key_id
        rank = tenant.priority if priority is None else priority
        items: list[Item[P, R]] = []
        for payload, cost in zip(payloads, costs, strict=True):
            item: Item[P, R] = Item(
                payload,
                cost,
                loop.create_future(),
                now,
                deadline,
                trace=trace,
                tenant_key=key,
                priority=rank,
                weight=tenant.weight,
                progress=progress,
            )
            self._queue.push(item)
            items.append(item)
        for obs in self._observers:
            obs.on_admitted(n)
        self._last_arrival = now
        self._wakeup.set()
        return items

    def room(self, n: int, tenant: Tenant = ANONYMOUS) -> None:
        """Raise OverloadedError at once unless ``n`` inputs of ``tenant`` may queue now: room
        under ``max_queued``, and past ``SHARE_AT`` of it, within the key's fair share
        (``admission.py``). ``submit`` checks it as it queues; a caller with work to do first
        (a local model's tokenizing) asks before it, so that a refusal costs none of it."""
        self._sharing.asked(tenant.key_id, tenant.weight)
        cap = self.policy.max_queued
        queued = len(self._queue)
        if queued + n > cap and self._full(n):
            self._refused(n)
            raise OverloadedError(
                f"{self.name} queue is full ({len(self._queue)} of {cap} items)",
                retry_after=1,  # a queue drains in about a batch's time: Retry-After as docs/api.md
            )
        if queued + n <= cap * SHARE_AT:
            return
        shares = self._queue.by_key()
        if shares is None:  # a fifo queue: oldest first, whoever sent it
            return
        counts, weights = shares
        key = tenant.key_id
        held = counts.get(key, 0)
        share = past_share(
            cap=cap,
            total=len(self._queue),
            n=n,
            held=held,
            weight=tenant.weight,
            others=lambda: self._sharing.others(weights, key),
        )
        if share is not None:
            self._refused(n)
            what = f"{len(self._queue)} inputs in {self.name}'s queue"
            raise share_refusal(what, tenant, held, share)

    def _refused(self, n: int) -> None:
        for obs in self._observers:
            obs.on_refused(n)

    def rearm(self, item: Item[P, R]) -> bool:
        """Give a running item whose caller left (its future cancelled) a new future, which its
        batch's result then reaches: for others who wait on the same work (``models/dedupe.py``)
        instead of queuing it again. False when it is not running (still queued, or its batch
        is over) or its run is cancelled once abandoned (``cancel_abandoned``)."""
        if (
            self.policy.cancel_abandoned
            or not item.started_at
            or item.finished_at
            or not item.future.cancelled()
        ):
            return False
        item.future = asyncio.get_running_loop().create_future()
        return True

    def _full(self, n: int) -> bool:
        """Whether ``n`` more inputs pass ``max_queued`` once the inputs whose callers have
        gone are dropped (only here, on the way to a refusal: the loop drops them per cut, and
        until then they took room that a caller still waiting was refused)."""
        self._drop_gone()
        return len(self._queue) + n > self.policy.max_queued

    def _drop_gone(self) -> None:
        """Drop the queued inputs whose callers have gone, counted for the observers."""
        dropped = self._queue.drop_gone()
        if dropped:
            for obs in self._observers:
                obs.on_dropped(dropped)

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            now = time.perf_counter()
            self._expire(now)
            if not len(self._queue):
                if self._closing:
                    break
                await self._wait(None)
                continue
            wake_at = self._queue.next_deadline()
            if self._in_flight >= self.policy.max_concurrency:
                await self._wait(wake_at)
                continue
            oldest = self._queue.oldest_enqueued_at()
            if (
                self.policy.max_wait > 0
                and not self._closing
                and oldest is not None
                and len(self._queue) < self._max_items
                and now < oldest + self.policy.max_wait
                and not self._full_by_cost()
            ):
                flush_at = oldest + self.policy.max_wait
                quiet = self.policy.max_quiet
                if quiet > 0:  # callers that sent all they had do not wait out the window
                    flush_at = min(flush_at, self._last_arrival + quiet)
                if now < flush_at:
                    await self._wait(flush_at if wake_at is None else min(flush_at, wake_at))
                    continue
            self._drop_gone()
            batch = self._queue.cut(self._max_items, self.policy.max_cost)
            if batch:
                self._dispatch(batch, now)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _full_by_cost(self) -> bool:
        """Whether what waits fills a batch's cost budget already (``max_cost``: a remote
        lane's tokens per call): the next batch can grow no more, so it goes now, as one full
        by count does. Asked only of a batch that waits to fill (a local model's never waits,
        and its queue keeps no sum: ``BatchQueue.held_cost``)."""
        budget = self.policy.max_cost
        if budget is None:
            return False
        held = self._queue.held_cost()
        return held is not None and held >= budget

    async def _wait(self, until: float | None) -> None:
        """Sleep until woken or until ``until`` (a ``time.perf_counter`` instant)."""
        if until is None:
            await self._wakeup.wait()
            return
        delay = max(0.0, until - time.perf_counter())
        try:
            async with asyncio.timeout(delay):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _expire(self, now: float) -> None:
        expired = self._queue.pop_expired(now)
        if not expired:
            return
        error = QueueTimeoutError(
            f"request waited longer than the queue timeout ({self.policy.queue_timeout:g}s) "
            "without any of its inputs starting"
        )
        n = 0
        for item in expired:
            if not item.future.done():
                item.future.set_exception(error)
                n += 1
        gone = len(expired) - n  # callers that left before their deadline came
        for obs in self._observers:
            obs.on_expired(n)
            if gone:
                obs.on_dropped(gone)

    def _dispatch(self, batch: list[Item[P, R]], now: float) -> None:
        self._in_flight += 1
        # The requests served here made progress: their inputs still queued wait afresh.
        renewed = now + self.policy.queue_timeout
        for item in batch:
            item.started_at = now
            item.batch_size = len(batch)
            progress = item.progress
            if progress is not None and progress.deadline < renewed:
                progress.deadline = renewed
        for obs in self._observers:
            obs.on_batch_started(batch)
        # Start the run now (a local model submits to its inference thread right here), not in
        # the new task's first step, which would wait behind every callback already queued.
        running: Awaitable[Sequence[R | BaseException]] = self._run([i.payload for i in batch])
        if self.policy.cancel_abandoned:
            running = _cancel_when_abandoned(running, batch)
        task = asyncio.create_task(self._run_batch(batch, running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(
        self, batch: list[Item[P, R]], running: Awaitable[Sequence[R | BaseException]]
    ) -> None:
        start = time.perf_counter()
        error: BaseException | None = None
        released = False
        watchdog = self.policy.run_timeout
        try:
            if watchdog is None:
                results = await running
            else:
                results = await self._watched(running, watchdog)
            # Free the slot before answering: the loop cuts the next batch ahead of the
            # callers' wake-ups that the results below queue.
            self._in_flight -= 1
            released = True
            self._wakeup.set()
            if len(results) != len(batch):
                raise BackendError(
                    f"backend returned {len(results)} results for a batch of {len(batch)}"
                )
        except asyncio.CancelledError:
            if inspect.iscoroutine(running):
                running.close()  # cancelled before it started: no "never awaited" warning
            current = asyncio.current_task()
            if (current is None or not current.cancelling()) and all(
                item.future.done() for item in batch
            ):
                error = NotReadyError("every caller left; the run was cancelled")
                return  # abandoned (cancel_abandoned): nobody to answer; finally counts it
            error = NotReadyError("the server is shutting down")
            self._fail(batch, error)
            raise
        except _Hung as hung:
            error = NotReadyError(hung.message)
            self._fail(batch, error)
            self._die(hung)
        except EmbedplexError as exc:
            error = exc
            self._fail(batch, exc)
            if isinstance(exc, FatalBackendError):
                # Whoever still waits would only meet the dead backend in turn: answer now.
                self._die(exc)
        except Exception as exc:
            logger.exception("batch of %d failed in %s", len(batch), self.name)
            error = BackendError(f"inference failed ({type(exc).__name__}); see the server log")
            self._fail(batch, error)
        else:
            end = time.perf_counter()
            for item, result in zip(batch, results, strict=True):
                item.finished_at = end
                if item.future.done():
                    continue
                if isinstance(result, BaseException):  # this input failed, not the batch
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            if not released:
                self._in_flight -= 1
            self.batches_run += 1
            self._wakeup.set()
            cost_of = self._cost_of
            costs = [cost_of(i.payload) if cost_of else i.cost for i in batch]
            stats = BatchStats(
                size=len(batch),
                tokens=sum(costs),
                padded_tokens=padded_cost(costs),
                duration=time.perf_counter() - start,
                error=error,
                items=batch,
            )
            for obs in self._observers:
                obs.on_batch_done(stats)

    @staticmethod
    async def _watched(
        running: Awaitable[Sequence[R | BaseException]], seconds: float
    ) -> Sequence[R | BaseException]:
        """``running`` within ``seconds``, else ``_Hung``. A run in a thread cannot be stopped:
        its future is cancelled, so the thread's late result is dropped by asyncio (a cancelled
        future ignores it) and never reaches a caller."""

        def hung() -> _Hung:
            logger.error("a batch ran longer than %gs: marking the backend dead", seconds)
            return _Hung(
                f"inference hung (a forward pass ran longer than {seconds:g}s); "
                "the backend is marked dead"
            )

        return await within(running, seconds, hung)  # the run's own TimeoutError passes

    def _fail(self, batch: Sequence[Item[P, R]], error: BaseException) -> None:
        end = time.perf_counter()
        for item in batch:
            item.finished_at = end
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        while len(self._queue):
            self._fail(self._queue.cut(1 << 30, None), error)


def _cancel_when_abandoned(
    running: Awaitable[Sequence[R | BaseException]], batch: Sequence[Item[Any, Any]]
) -> asyncio.Future[Sequence[R | BaseException]]:
    """``running`` as a task that is cancelled once every item's future is done before it
    (their callers cancelled them on leaving; results set by the run itself come after)."""
    run = asyncio.ensure_future(running)
    left = len(batch)

    def gone(_: object) -> None:
        nonlocal left
        left -= 1
        if not left and not run.done():
            run.cancel()

    for item in batch:
        item.future.add_done_callback(gone)
    return run


class _Hung(FatalBackendError):
    """The watchdog's verdict on a run that outlived ``run_timeout``."""
