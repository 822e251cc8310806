"""The batching engine with fake run functions: cutting, ordering, failure, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from embedplex.batching import (
    Batcher,
    BatchPolicy,
    BatchStats,
    FifoQueue,
    LengthBucketQueue,
    make_queue,
)
from embedplex.core.errors import (
    BackendError,
    FatalBackendError,
    NotReadyError,
    OverloadedError,
    QueueTimeoutError,
)
from embedplex.core.tenant import ANONYMOUS, Priority, Tenant


class Recorder:
    """A run function that records batches and can block, fail, or answer wrongly."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.short = False

    async def __call__(self, payloads: list[str]) -> Sequence[str]:
        self.batches.append(list(payloads))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        out = [p.upper() for p in payloads]
        return out[:-1] if self.short else out


class StatsLog:
    def __init__(self) -> None:
        self.done: list[BatchStats] = []
        self.counts = {"admitted": 0, "refused": 0, "expired": 0, "dropped": 0}

    def on_admitted(self, n: int) -> None:
        self.counts["admitted"] += n

    def on_refused(self, n: int) -> None:
        self.counts["refused"] += n

    def on_expired(self, n: int) -> None:
        self.counts["expired"] += n

    def on_dropped(self, n: int) -> None:
        self.counts["dropped"] += n

    def on_batch_started(self, items: object) -> None:
        pass

    def on_batch_done(self, stats: BatchStats) -> None:
        self.done.append(stats)


def costs(payloads: list[str]) -> list[int]:
    return [len(p) for p in payloads]


async def submit(b: Batcher[str, str], payloads: list[str]) -> list[str]:
    items = b.submit(payloads, costs(payloads))
    return list(await asyncio.gather(*(i.future for i in items)))


async def test_results_return_in_input_order() -> None:
    run = Recorder()
    async with Batcher("t", run, BatchPolicy(max_items=8)) as b:
        assert await submit(b, ["a", "b", "c"]) == ["A", "B", "C"]


async def test_concurrent_callers_share_a_batch_and_get_their_own_results() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    async with Batcher("t", run, BatchPolicy(max_items=64)) as b:
        first = asyncio.create_task(submit(b, ["x"]))
        await asyncio.sleep(0.01)  # "x" is now in flight, holding the only slot
        callers = [asyncio.create_task(submit(b, [f"c{i}", f"d{i}"])) for i in range(5)]
        await asyncio.sleep(0.01)
        run.gate.set()
        assert await first == ["X"]
        results = await asyncio.gather(*callers)
    assert results == [[f"C{i}", f"D{i}"] for i in range(5)]
    # The five callers queued behind the first batch went out together in one batch.
    assert [len(batch) for batch in run.batches] == [1, 10]


async def test_batches_are_split_by_max_items() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    async with Batcher("t", run, BatchPolicy(max_items=4)) as b:
        task = asyncio.create_task(submit(b, [f"p{i}" for i in range(10)]))
        await asyncio.sleep(0.01)
        run.gate.set()
        assert await task == [f"P{i}" for i in range(10)]
    assert [len(batch) for batch in run.batches] == [4, 4, 2]


async def test_token_budget_counts_padded_size() -> None:
    run = Recorder()
    policy = BatchPolicy(max_items=100, max_cost=12)
    async with Batcher("t", run, policy, queue=LengthBucketQueue()) as b:
        # Padded cost of four 3-token items is 12: one batch. A 6-token item pads to 6 each.
        await submit(b, ["aaa", "bbb", "ccc", "ddd"])
        assert run.batches[-1] == ["aaa", "bbb", "ccc", "ddd"]
        run.batches.clear()
        run.gate = asyncio.Event()
        task = asyncio.create_task(submit(b, ["aaaaaa", "b", "c", "dddddd"]))
        await asyncio.sleep(0.01)
        run.gate.set()
        await task
    for batch in run.batches:
        assert max(map(len, batch)) * len(batch) <= 12


async def test_an_input_over_the_budget_still_runs_alone() -> None:
    run = Recorder()
    async with Batcher(
        "t", run, BatchPolicy(max_items=8, max_cost=4), queue=LengthBucketQueue()
    ) as b:
        assert await submit(b, ["toolong"]) == ["TOOLONG"]


async def test_failed_batch_fails_every_waiter_with_a_clear_error() -> None:
    run = Recorder()
    run.error = RuntimeError("secret detail")
    async with Batcher("t", run, BatchPolicy(max_items=8)) as b:
        items = b.submit(["a", "b"], [1, 1])
        for item in items:
            with pytest.raises(BackendError) as info:
                await item.future
            assert "RuntimeError" in info.value.message
            assert "secret detail" not in info.value.message  # internals stay in the log


async def test_wrong_result_count_fails_the_batch() -> None:
    run = Recorder()
    run.short = True
    async with Batcher("t", run, BatchPolicy(max_items=8)) as b:
        with pytest.raises(BackendError, match="2 results for a batch of 3"):
            await submit(b, ["a", "b", "c"])


async def test_fatal_error_marks_the_batcher_dead() -> None:
    run = Recorder()
    run.error = FatalBackendError("gpu fell off")
    async with Batcher("t", run, BatchPolicy(max_items=8)) as b:
        with pytest.raises(FatalBackendError):
            await submit(b, ["a"])
        assert b.fatal is not None
        with pytest.raises(NotReadyError):
            b.submit(["b"], [1])


async def test_full_queue_refuses_at_once() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    log = StatsLog()
    async with Batcher("t", run, BatchPolicy(max_items=2, max_queued=3), observers=[log]) as b:
        first = asyncio.create_task(submit(b, ["a", "b"]))  # in flight, queue empty
        await asyncio.sleep(0.01)
        queued = b.submit(["c", "d", "e"], [1, 1, 1])  # fills the queue
        with pytest.raises(OverloadedError) as full:
            b.submit(["f"], [1])
        assert log.counts["refused"] == 1
        run.gate.set()
        await first
        assert full.value.retry_after == 1  # sent as Retry-After: 1 (docs/api.md)
        assert [await i.future for i in queued] == ["C", "D", "E"]


async def test_departed_inputs_take_no_room_and_a_requeue_for_joiners_is_never_refused() -> None:
    """A caller that left still took its queue slot until the next cut, so a caller waiting was
    refused for it; and the departed input queued again for the callers who joined it
    (``models/dedupe.py``) got them a late 429 (review: "queue is full (2 of 2)", one waiting)."""
    run = Recorder()
    run.gate = asyncio.Event()
    log = StatsLog()
    async with Batcher("t", run, BatchPolicy(max_items=1, max_queued=2), observers=[log]) as b:
        first = asyncio.create_task(submit(b, ["a"]))  # in flight
        await asyncio.sleep(0.01)
        try:
            left, kept = b.submit(["b", "c"], [1, 1])  # the queue is full
            left.future.cancel()  # b's caller goes
            (late,) = b.submit(["d"], [1])  # the room b took is free
            assert log.counts.get("refused", 0) == 0 and log.counts["dropped"] == 1
            with pytest.raises(OverloadedError):
                b.submit(["e"], [1])  # full again, with two callers waiting
            (again,) = b.submit(["b"], [1], admitted=True)  # b again, for its joiners
        finally:
            run.gate.set()  # a failure above must not leave the batch, and the test, hanging
        await first
        assert [await i.future for i in (kept, late, again)] == ["C", "D", "B"]


async def test_a_request_is_admitted_whole_or_not_at_all() -> None:
    async with Batcher("t", Recorder(), BatchPolicy(max_items=2, max_queued=3)) as b:
        with pytest.raises(OverloadedError):
            b.submit(["a", "b", "c", "d"], [1, 1, 1, 1])
        assert b.queued == 0


async def test_queue_timeout_gives_503_error_and_never_hangs() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    log = StatsLog()
    policy = BatchPolicy(max_items=1, queue_timeout=0.05)
    async with Batcher("t", run, policy, observers=[log]) as b:
        blocker = asyncio.create_task(submit(b, ["a"]))
        await asyncio.sleep(0.01)
        waiting = b.submit(["b"], [1])
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(waiting[0].future, 1.0)
        assert log.counts["expired"] == 1
        run.gate.set()
        await blocker
    assert run.batches == [["a"]]  # the expired item never reached the backend


async def test_a_request_served_in_turns_does_not_time_out_behind_its_own_inputs() -> None:
    """The timeout bounds a wait without progress: a request bigger than one batch waits for
    its own earlier inputs, and each batch of it renews the rest's wait (review: 2,048 inputs
    of 960 tokens got 503 after 30.7 s, 368 computed and thrown away, 1,680 expired)."""
    run = Recorder(delay=0.05)
    log = StatsLog()
    policy = BatchPolicy(max_items=2, queue_timeout=0.3)
    async with Batcher("t", run, policy, observers=[log]) as b:
        payloads = [f"p{k}" for k in range(20)]  # 10 batches of 0.05 s: past the timeout
        assert await submit(b, payloads) == [p.upper() for p in payloads]
    assert log.counts["expired"] == 0
    assert len(run.batches) == 10


async def test_a_request_that_stops_progressing_still_times_out() -> None:
    """Progress renews the wait; a stall past the timeout after it still gets 503, and another
    request's progress renews nothing of this one."""
    run = Recorder()
    log = StatsLog()
    policy = BatchPolicy(max_items=1, queue_timeout=0.1)
    async with Batcher("t", run, policy, observers=[log]) as b:
        run.gate = asyncio.Event()
        first, *rest = b.submit(["a", "b", "c"], [1, 1, 1])
        try:
            await asyncio.sleep(0.01)  # "a" runs and holds the backend
            other = b.submit(["z"], [1])
            started = asyncio.get_running_loop().time()
            with pytest.raises(QueueTimeoutError, match="without any of its inputs starting"):
                await asyncio.wait_for(rest[0].future, 1.0)
            assert asyncio.get_running_loop().time() - started < 0.5
            assert rest[1].future.exception() is not None  # one request, one clock
            with pytest.raises(QueueTimeoutError):
                await asyncio.wait_for(other[0].future, 1.0)
        finally:
            run.gate.set()  # a failure above must not leave the batch, and the test, hanging
        assert await first.future == "A"
    assert log.counts["expired"] == 3
    assert run.batches == [["a"]]


async def test_callers_that_left_are_dropped_before_the_backend() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    log = StatsLog()
    async with Batcher("t", run, BatchPolicy(max_items=8), observers=[log]) as b:
        blocker = asyncio.create_task(submit(b, ["a"]))
        await asyncio.sleep(0.01)
        leaving = asyncio.create_task(submit(b, ["gone1", "gone2"]))
        staying = asyncio.create_task(submit(b, ["kept"]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0)
        run.gate.set()
        await blocker
        assert await staying == ["KEPT"]
    assert run.batches == [["a"], ["kept"]]
    assert log.counts["dropped"] == 2


async def test_max_wait_flushes_a_partial_batch_after_the_wait() -> None:
    run = Recorder()
    policy = BatchPolicy(max_items=100, max_wait=0.05)
    async with Batcher("t", run, policy) as b:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = [asyncio.create_task(submit(b, [f"x{i}"])) for i in range(3)]
        await asyncio.gather(*tasks)
        assert loop.time() - start >= 0.045
    assert [len(batch) for batch in run.batches] == [3]


async def test_max_wait_flushes_at_once_when_the_batch_is_full() -> None:
    run = Recorder()
    policy = BatchPolicy(max_items=4, max_wait=10.0)
    async with Batcher("t", run, policy) as b:
        result = await asyncio.wait_for(submit(b, ["a", "b", "c", "d"]), 1.0)
    assert result == ["A", "B", "C", "D"]


@pytest.mark.parametrize("policy", ["fifo", "fair"])
async def test_max_wait_flushes_at_once_when_the_batch_is_full_by_cost(policy: str) -> None:
    """A remote lane's batch that its token budget fills goes at once, as one full by count
    does: waiting out max_wait (and max_quiet) could not make it any larger."""
    run = Recorder()
    window = BatchPolicy(max_items=100, max_cost=10, max_wait=10.0, max_quiet=5.0)
    queue = make_queue(policy, lengths=False)  # type: ignore[arg-type]
    async with Batcher("t", run, window, queue=queue) as b:
        # 4 + 4 of a budget of 10 waits: 2 more could still join.
        first = b.submit(["aaaa", "bbbb"], [4, 4])
        await asyncio.sleep(0.2)
        assert run.batches == []
        # 4 more pass the budget: the batch that fits goes now, the rest waits.
        rest = b.submit(["cccc"], [4])
        done = await asyncio.wait_for(asyncio.gather(*(i.future for i in first)), 1.0)
        assert done == ["AAAA", "BBBB"]
        await asyncio.sleep(0.2)
        assert run.batches == [["aaaa", "bbbb"]]
        assert not rest[0].future.done()
        # What waits is counted afresh after the cut: 4 + 6 fills the budget exactly.
        last = b.submit(["dddddd"], [6])
        answers = await asyncio.wait_for(asyncio.gather(rest[0].future, last[0].future), 1.0)
        assert answers == ["CCCC", "DDDDDD"]
    assert run.batches == [["aaaa", "bbbb"], ["cccc", "dddddd"]]


async def test_concurrency_bounds_batches_in_flight() -> None:
    active = 0
    peak = 0

    async def run(payloads: list[str]) -> list[str]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return payloads

    async with Batcher("t", run, BatchPolicy(max_items=1, max_concurrency=3)) as b:
        await asyncio.gather(*(submit(b, [str(i)]) for i in range(10)))
    assert peak == 3


async def test_set_max_items_changes_the_cut_and_is_capped_by_policy() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    async with Batcher("t", run, BatchPolicy(max_items=8)) as b:
        b.set_max_items(3)
        assert b.max_items == 3
        task = asyncio.create_task(submit(b, [str(i) for i in range(7)]))
        await asyncio.sleep(0.01)
        run.gate.set()
        await task
        b.set_max_items(1000)
        assert b.max_items == 8
    assert [len(batch) for batch in run.batches] == [3, 3, 1]


async def test_close_drains_queued_work_then_refuses() -> None:
    run = Recorder(delay=0.01)
    b: Batcher[str, str] = Batcher("t", run, BatchPolicy(max_items=2))
    await b.start()
    items = b.submit(["a", "b", "c", "d", "e"], [1] * 5)
    await b.close(drain=True)
    assert [i.future.result() for i in items] == ["A", "B", "C", "D", "E"]
    with pytest.raises(NotReadyError):
        b.submit(["f"], [1])


async def test_close_without_drain_fails_queued_work() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    b: Batcher[str, str] = Batcher("t", run, BatchPolicy(max_items=1))
    await b.start()
    items = b.submit(["a", "b", "c"], [1] * 3)
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(b.close(drain=False))
    await asyncio.sleep(0.01)
    run.gate.set()
    await closing
    assert items[0].future.result() == "A"
    for item in items[1:]:
        assert isinstance(item.future.exception(), NotReadyError)


async def test_stats_describe_each_batch() -> None:
    log = StatsLog()
    async with Batcher("t", Recorder(), BatchPolicy(max_items=8), observers=[log]) as b:
        await submit(b, ["aa", "bbbb"])
    (stats,) = log.done
    assert (stats.size, stats.tokens, stats.padded_tokens, stats.error) == (2, 6, 8, None)


def test_fifo_queue_respects_cost_budget() -> None:
    loop = asyncio.new_event_loop()
    try:
        from embedplex.batching import Item

        q = FifoQueue()
        for cost in (3, 3, 3):
            q.push(Item("x", cost, loop.create_future(), 0.0, 10.0))
        assert len(q.cut(10, 7)) == 2
        assert len(q) == 1
    finally:
        loop.close()


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BatchPolicy(max_items=0)
    with pytest.raises(ValueError, match="max_wait"):
        BatchPolicy(max_items=1, max_wait=-1)
    with pytest.raises(ValueError, match="max_quiet"):
        BatchPolicy(max_items=1, max_wait=1, max_quiet=-1)


async def test_items_carry_the_tenant_and_priority() -> None:
    """What a fair queue will schedule on: each item's tenant key and priority."""
    run = Recorder()
    async with Batcher("t", run, BatchPolicy(max_items=8)) as batcher:
        team = Tenant(key_id="team-a", priority=Priority.BATCH)
        default = batcher.submit(["a"], [1])
        theirs = batcher.submit(["b", "c"], [1, 1], tenant=team)
        urgent = batcher.submit(["d"], [1], tenant=team, priority=Priority.INTERACTIVE)
        await asyncio.gather(*(i.future for i in [*default, *theirs, *urgent]))
    assert [(i.tenant_key, i.priority) for i in default] == [
        (ANONYMOUS.key_id, Priority.INTERACTIVE)
    ]
    assert [(i.tenant_key, i.priority) for i in theirs] == [("team-a", Priority.BATCH)] * 2
    assert [(i.tenant_key, i.priority) for i in urgent] == [("team-a", Priority.INTERACTIVE)]
