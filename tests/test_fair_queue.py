"""The fair queues: weighted fair order across keys, priority lanes, aging, no starvation.

Driven directly (push, cut) with a fake clock; ``tests/test_batcher.py`` drives one through the
batch loop.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import cast

import pytest

from embedplex.batching import (
    Batcher,
    BatchPolicy,
    FairFifoQueue,
    FairLengthQueue,
    FifoQueue,
    Item,
    LengthBucketQueue,
    QueuePolicy,
    make_queue,
)
from embedplex.batching.queues import AnyItem, BatchQueue
from embedplex.core.tenant import Priority, Tenant

BATCH = Priority.BATCH
INTERACTIVE = Priority.INTERACTIVE


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Feed:
    """Pushes items into a queue, numbered, stamped with the fake clock's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: BatchQueue, clock: Clock) -> None:
        self.loop = loop
        self.queue = queue
        self.clock = clock
        self.n = 0

    def push(
        self,
        key: str | None,
        cost: int,
        *,
        priority: Priority = INTERACTIVE,
        weight: int = 1,
    ) -> AnyItem:
        now = self.clock.now
        item: AnyItem = Item(
            f"{key}:{self.n}",
            cost,
            self.loop.create_future(),
            now,
            now + 1000.0,
            tenant_key=key,
            priority=priority,
            weight=weight,
        )
        self.n += 1
        self.queue.push(item)
        return item


def fair(
    loop: asyncio.AbstractEventLoop, aging: float = 2.0, *, fill: bool = True
) -> tuple[Feed, Clock]:
    clock = Clock()
    return Feed(loop, FairLengthQueue(aging=aging, clock=clock, fill=fill), clock), clock


def padded_by_key(batch: list[AnyItem]) -> Counter[str | None]:
    longest = max(i.cost for i in batch)
    return Counter({k: longest * n for k, n in Counter(i.tenant_key for i in batch).items()})


# -- one key: the plain queues' batches --------------------------------------------------------


@pytest.mark.parametrize("priority", [INTERACTIVE, BATCH])
@pytest.mark.parametrize("lengths", [True, False])
def test_one_key_cuts_exactly_the_plain_queues_batches(
    loop: asyncio.AbstractEventLoop, lengths: bool, priority: Priority
) -> None:
    rng = random.Random(7)
    clock = Clock()
    plain: BatchQueue = LengthBucketQueue() if lengths else FifoQueue()
    fairq: BatchQueue = FairLengthQueue(clock=clock) if lengths else FairFifoQueue(clock=clock)
    feeds = [Feed(loop, plain, clock), Feed(loop, fairq, clock)]
    cuts: list[list[list[str]]] = [[], []]
    for _ in range(300):
        for _ in range(rng.randrange(0, 40)):
            cost = rng.choice([rng.randrange(3, 20), rng.randrange(20, 256)])
            for feed in feeds:
                feed.push("solo", cost, priority=priority)
        clock.now += 0.5  # past the aging bound sometimes: must change nothing
        budget = rng.choice([512, 2048, 16384])
        for k, q in enumerate((plain, fairq)):
            cuts[k].append([i.payload for i in q.cut(32, budget)])
    while len(plain):
        cuts[0].append([i.payload for i in plain.cut(32, 512)])
        cuts[1].append([i.payload for i in fairq.cut(32, 512)])
    assert cuts[0] == cuts[1]
    assert len(fairq) == 0
    assert sum(len(b) for b in cuts[1]) == feeds[1].n


# -- fair order across keys ---------------------------------------------------------------------


@pytest.mark.parametrize("fill", [True, False])
def test_a_light_keys_query_is_cut_into_the_next_batch(
    loop: asyncio.AbstractEventLoop, fill: bool
) -> None:
    feed, _ = fair(loop, fill=fill)
    rng = random.Random(1)
    for _ in range(2000):  # the flood: 2,000 texts of mixed lengths
        feed.push("bulk", rng.randrange(5, 256))
    for _ in range(5):
        feed.queue.cut(32, 512)
    query = feed.push("search", 12)
    batch = feed.queue.cut(32, 512)
    assert query in batch
    if fill:  # (a GPU) it rode with bulk texts as short as it, in a full batch
        assert len(batch) > 16
        assert max(i.cost for i in batch) <= 32
    else:  # (a CPU) its own short pass
        assert batch == [query]
    assert query not in feed.queue.cut(32, 512)


def test_a_light_key_does_not_wait_behind_an_earlier_flood_of_the_same_length(
    loop: asyncio.AbstractEventLoop,
) -> None:
    feed, _ = fair(loop)
    for _ in range(500):
        feed.push("bulk", 10)
    assert {i.tenant_key for i in feed.queue.cut(32, 4096)} == {"bulk"}  # the flood runs
    queries = [feed.push("search", 10) for _ in range(3)]
    batch = feed.queue.cut(32, 4096)
    assert all(q in batch for q in queries)  # FIFO would serve them after 500 others


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (1, 4)])
def test_backlogged_keys_share_padded_tokens_in_proportion_to_their_weights(
    loop: asyncio.AbstractEventLoop, weights: tuple[int, int]
) -> None:
    feed, _ = fair(loop)
    rng = random.Random(3)
    served: Counter[str | None] = Counter()
    # "a" keeps ten times as much waiting as "b": the share must not follow the backlog.
    backlog = {"a": 400, "b": 40}
    weight = dict(zip(("a", "b"), weights, strict=True))
    waiting: Counter[str] = Counter()
    for _ in range(400):
        for key in ("a", "b"):
            while waiting[key] < backlog[key]:
                feed.push(key, rng.randrange(5, 128), weight=weight[key])
                waiting[key] += 1
        batch = feed.queue.cut(32, 1024)
        for item in batch:
            waiting[str(item.tenant_key)] -= 1
        served += padded_by_key(batch)
    ratio = served["a"] / served["b"]
    expected = weights[0] / weights[1]
    assert expected * 0.85 <= ratio <= expected * 1.15, (served, expected)


def test_length_grouping_is_kept_between_two_flooding_keys(
    loop: asyncio.AbstractEventLoop,
) -> None:
    feed, _ = fair(loop)
    rng = random.Random(5)
    for _ in range(600):
        feed.push(rng.choice("ab"), rng.randrange(5, 256))
    plain = LengthBucketQueue()
    rng = random.Random(5)
    for n in range(600):
        cost = rng.randrange(5, 256)
        rng.choice("ab")
        plain.push(Item(n, cost, loop.create_future(), 0.0, 1000.0))

    def padding(q: BatchQueue) -> float:
        real = padded = 0
        while len(q):
            batch = q.cut(32, 512)
            real += sum(i.cost for i in batch)
            padded += max(i.cost for i in batch) * len(batch)
        return padded / real

    # Grouping within each key's turn pads barely more than grouping across everything.
    assert padding(feed.queue) <= padding(plain) * 1.15


# -- priority lanes and aging --------------------------------------------------------------------


def test_interactive_items_go_before_batch_items(loop: asyncio.AbstractEventLoop) -> None:
    feed, _ = fair(loop)
    bulk = [feed.push("nightly", 10, priority=BATCH) for _ in range(8)]
    queries = [feed.push("search", 10) for _ in range(4)]
    assert feed.queue.cut(4, 4096) == queries
    # Room left in a batch is filled from the batch lane (with ``fill``: a GPU's pass costs
    # about the same whatever its rows).
    more = [feed.push("search", 10) for _ in range(2)]
    assert feed.queue.cut(4, 4096) == [bulk[0], bulk[1], *more]
    assert isinstance(feed.queue, FairLengthQueue)
    feed.queue.fill = False
    last = [feed.push("search", 10) for _ in range(2)]
    assert feed.queue.cut(4, 4096) == last


def test_the_same_key_may_send_both_priorities(loop: asyncio.AbstractEventLoop) -> None:
    feed, _ = fair(loop)
    low = [feed.push("app", 10, priority=BATCH) for _ in range(3)]
    high = feed.push("app", 10)
    assert feed.queue.cut(1, 4096) == [high]
    assert feed.queue.cut(8, 4096) == low


def test_aging_moves_batch_work_under_a_steady_interactive_load(
    loop: asyncio.AbstractEventLoop,
) -> None:
    feed, clock = fair(loop, aging=2.0)
    waiting = feed.push("nightly", 10, priority=BATCH)
    served_at = None
    for _ in range(100):  # a batch every 50 ms, each one filled by interactive queries
        for _ in range(4):
            feed.push("search", 10)
        if waiting in feed.queue.cut(4, 4096):
            served_at = clock.now
            break
        clock.now += 0.05
    assert served_at is not None, "batch work starved"
    assert 2.0 <= served_at <= 2.5


def test_aged_batch_items_share_the_lane_fairly(loop: asyncio.AbstractEventLoop) -> None:
    feed, clock = fair(loop, aging=1.0)
    for _ in range(100):
        feed.push("nightly", 10, priority=BATCH)
    clock.now = 5.0  # every nightly item has aged
    served: Counter[str | None] = Counter()
    for _ in range(20):
        for _ in range(8):
            feed.push("search", 10)
        served += Counter(i.tenant_key for i in feed.queue.cut(8, 4096))
    assert served["nightly"] >= 60  # about half of 160 rows, not none


# -- no starvation, bookkeeping ------------------------------------------------------------------


@pytest.mark.parametrize("fill", [True, False])
def test_every_item_is_served_in_bounded_turns_under_random_load(
    loop: asyncio.AbstractEventLoop, fill: bool
) -> None:
    feed, clock = fair(loop, aging=1.0, fill=fill)
    rng = random.Random(11)
    keys = ["a", "b", "c", None]
    pushed_at: dict[str, int] = {}
    worst = 0
    for turn in range(600):
        for _ in range(rng.randrange(0, 12) if turn < 500 else 0):
            key = rng.choice(keys)
            item = feed.push(
                key,
                rng.randrange(1, 300),
                priority=rng.choice([INTERACTIVE, BATCH]),
                weight=rng.choice([1, 2, 5]),
            )
            pushed_at[item.payload] = turn
        clock.now += 0.02
        for item in feed.queue.cut(16, 1024):
            worst = max(worst, turn - pushed_at.pop(item.payload))
    assert not pushed_at and len(feed.queue) == 0
    assert worst < 150  # turns; FIFO-like bound here (the load is near the capacity)


@pytest.mark.parametrize("fill", [True, False])
def test_one_at_a_time_clients_do_not_shut_out_a_backlogged_key(
    loop: asyncio.AbstractEventLoop, fill: bool
) -> None:
    """Three clients that each send their next short request as soon as the last is served
    (closed loop) came back at the clock every time, kept it still, and a bulk key waited
    for ever: 64 of its 200 items in 5,000 cuts. Each keeps where its work ended now, so the
    bulk key is served its share: every batch once the others have had as many tokens."""
    feed, clock = fair(loop, fill=fill)
    for _ in range(200):
        feed.push("bulk", 256)
    lights = ["l0", "l1", "l2"]
    served: Counter[str | None] = Counter()
    tokens: Counter[str | None] = Counter()
    back: list[str] = []
    for cut in range(20_000):
        clock.now += 0.001
        if cut < len(lights):
            feed.push(lights[cut], 12)
        batch = feed.queue.cut(64, 16_384)
        for key in back:  # answered after this cut: back with the next request
            feed.push(key, 12)
        for key, tok in padded_by_key(batch).items():
            tokens[key] += tok
        served.update(i.tenant_key for i in batch)
        back = sorted({i.tenant_key for i in batch} - {"bulk"})  # type: ignore[arg-type]
        if served["bulk"] == 200:
            break
    assert served["bulk"] == 200, served
    # Shared by padded tokens: no client got much more than the bulk key's 200 x 256.
    assert all(tokens[key] <= 200 * 256 + 16_384 for key in lights), tokens


def test_expired_and_gone_items_keep_the_bookkeeping_right(
    loop: asyncio.AbstractEventLoop,
) -> None:
    feed, _ = fair(loop)
    a = [feed.push("a", 5) for _ in range(3)]
    b = feed.push("b", 5, priority=BATCH)
    a[0].future.cancel()
    b.future.cancel()
    assert feed.queue.drop_gone() == 2
    assert feed.queue.pop_expired(2000.0) == a[1:]
    assert len(feed.queue) == 0 and feed.queue.cut(8, 100) == []
    fresh = [feed.push("b", 5), feed.push("c", 5, priority=BATCH)]
    assert feed.queue.cut(8, 100) == fresh


def test_the_oldest_item_of_the_leading_key_always_goes(loop: asyncio.AbstractEventLoop) -> None:
    feed, _ = fair(loop)
    old = feed.push("a", 300)  # alone past the budget
    for _ in range(20):
        feed.push("a", 5)
    assert feed.queue.cut(8, 100) == [old]


# -- the remote lanes' fair FIFO ----------------------------------------------------------------


def test_remote_lanes_serve_a_light_key_next_and_share_by_weight(
    loop: asyncio.AbstractEventLoop,
) -> None:
    clock = Clock()
    feed = Feed(loop, FairFifoQueue(clock=clock), clock)
    for _ in range(1000):
        feed.push("bulk", 1, weight=2)
    feed.queue.cut(64, None)
    query = feed.push("search", 1)
    assert query in feed.queue.cut(64, None)
    for _ in range(300):
        feed.push("other", 1)
    # A key that starts waiting leads (with at most about a batch of head start)...
    assert {i.tenant_key for i in feed.queue.cut(30, None)} == {"other"}
    for _ in range(3):
        feed.queue.cut(30, None)
    # ...then both backlogged keys share by weight, 2:1, item by item.
    served: Counter[str | None] = Counter()
    for _ in range(6):
        served += Counter(i.tenant_key for i in feed.queue.cut(30, None))
    assert served == {"bulk": 120, "other": 60}


def test_remote_lanes_keep_the_cost_budget(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    feed = Feed(loop, FairFifoQueue(clock=clock), clock)
    for _ in range(10):
        feed.push("a", 30)
        feed.push("b", 30, priority=BATCH)
    batch = feed.queue.cut(10, 100)
    assert [i.tenant_key for i in batch] == ["a", "a", "a"]
    assert len(feed.queue.cut(100, None)) == 17


@pytest.mark.parametrize("policy", ["fifo", "fair"])
def test_remote_lanes_keep_the_sum_of_what_waits(
    loop: asyncio.AbstractEventLoop, policy: QueuePolicy
) -> None:
    """``held_cost`` (what tells the batcher a batch is full by cost) stays the sum of the
    waiting items' costs through pushes, cuts, callers leaving and timeouts; local queues
    keep none."""
    rng = random.Random(3)
    clock = Clock()
    queue = make_queue(policy, lengths=False)
    feed = Feed(loop, queue, clock)
    waiting: list[AnyItem] = []  # every item pushed (some cut, some gone since)
    for _ in range(200):
        for _ in range(rng.randrange(0, 6)):
            key = rng.choice(["a", "b", None])
            prio = rng.choice([INTERACTIVE, BATCH])
            waiting.append(feed.push(key, rng.randrange(1, 50), priority=prio))
        step = rng.random()
        if step < 0.4:
            queue.cut(rng.randrange(1, 8), rng.choice([None, 60, 200]))
        elif step < 0.6 and waiting:
            rng.choice(waiting).future.cancel()  # its caller left
            queue.drop_gone()
        elif step < 0.7 and waiting:
            rng.choice(waiting).deadline = -1.0  # timed out
            queue.pop_expired(0.0)
        assert queue.held_cost() == sum(i.cost for i in _queued(queue))
    assert LengthBucketQueue().held_cost() is None
    assert FairLengthQueue().held_cost() is None


def _queued(queue: BatchQueue) -> list[AnyItem]:
    return list(queue._items)  # type: ignore[attr-defined]  # the list every queue keeps


def test_make_queue_names_the_policies() -> None:
    assert isinstance(make_queue("fair", lengths=True), FairLengthQueue)
    assert not cast(FairLengthQueue, make_queue("fair", lengths=True, fill=False)).fill
    assert isinstance(make_queue("fair", lengths=False), FairFifoQueue)
    assert type(make_queue("fifo", lengths=True)) is LengthBucketQueue
    assert type(make_queue("fifo", lengths=False)) is FifoQueue
    with pytest.raises(ValueError, match="queue policy"):
        make_queue("lottery", lengths=True)  # type: ignore[arg-type]


# -- through the batch loop ----------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "fair_order"), [("fair", True), ("fifo", False)])
async def test_through_the_batcher_a_light_tenant_rides_the_next_batch(
    policy: QueuePolicy, fair_order: bool
) -> None:
    batches: list[list[str]] = []
    gate = asyncio.Event()

    async def run(payloads: list[str]) -> list[str]:
        batches.append(payloads)
        await gate.wait()
        return payloads

    queue = make_queue(policy, lengths=True)
    policy_ = BatchPolicy(max_items=16, max_cost=4096, max_queued=4096)
    async with Batcher("t", run, policy_, queue=queue) as b:
        bulk = Tenant(key_id="bulk", priority=BATCH)
        flood = b.submit([f"bulk{n}" for n in range(320)], [12] * 320, tenant=bulk)
        try:
            for _ in range(100):  # the loop dispatches the first batch; it waits at the gate
                if batches:
                    break
                await asyncio.sleep(0)
            assert len(batches) == 1
            query = b.submit(["query"], [12], tenant=Tenant(key_id="search"))
        finally:
            gate.set()
        assert await query[0].future == "query"
        await asyncio.gather(*(i.future for i in flood))
    where = next(n for n, batch in enumerate(batches) if "query" in batch)
    assert where == 1 if fair_order else where == 20


def test_remembered_ends_are_swept_now_and_then_not_every_cut(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New keys arriving while a backlog holds the clock still leave ends nothing can drop:
    a sweep that found nothing to drop ran again on every cut (984 of 1,000)."""
    feed, _ = fair(loop, fill=False)
    queue = cast(FairLengthQueue, feed.queue)
    sweeps: list[int] = []
    sweep = queue._forget_settled

    def counted() -> None:
        sweeps.append(len(queue._ended))
        sweep()

    monkeypatch.setattr(queue, "_forget_settled", counted)
    for _ in range(300):
        feed.push("bulk", 256)
    for cut in range(1_000):
        for k in range(4):
            feed.push(f"new-{cut}-{k}", 12)
        queue.cut(64, 16_384)
    assert len(queue._ended) > 2_000  # their debts are kept (the clock has not passed them)
    assert len(sweeps) < 20, len(sweeps)
