"""``core/spend.py``: one request's reservations, taken one at a time and counted once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from embedplex.core.errors import KeyRateLimitedError
from embedplex.core.spend import Spend
from embedplex.core.tenant import KeyLimits
from embedplex.limits import LocalLimits

TPM_1000 = KeyLimits(tpm=1000)


@dataclass
class _Payload:
    tokens: int
    reads: list[int] = field(default_factory=lambda: [0])  # shared by a test's payloads

    @property
    def cost(self) -> int:
        self.reads[0] += 1
        return self.tokens

    @property
    def bound(self) -> int:
        self.reads[0] += 1
        return self.tokens


@dataclass
class _Item:
    payload: _Payload
    future: asyncio.Future[object]
    started_at: float = 0.0


def _items(*tokens: int, reads: list[int] | None = None) -> list[_Item]:
    loop = asyncio.get_running_loop()
    return [_Item(_Payload(t, reads or [0]), loop.create_future()) for t in tokens]


class _ReversedStore(Spend):
    """A shared store (the local rules, a frozen clock) that runs the calls in flight
    together in the reverse of the order they were made, as Redis may run two connections'
    scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = LocalLimits(lambda: 1000.0)
        self.waiting: list[tuple[int, int, asyncio.Future[None]]] = []

    async def _reserve(self, tokens: int, held: int) -> None:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((tokens, held, done))
        await done

    async def run(self) -> None:
        for _ in range(20):  # let every call that is going to be in flight get there
            await asyncio.sleep(0)
        waiting, self.waiting = self.waiting, []
        for tokens, held, done in reversed(waiting):
            verdict = self.limits.reserve("k", TPM_1000, tokens, held)
            if verdict.refused is None:
                done.set_result(None)
            else:
                done.set_exception(KeyRateLimitedError("refused", retry_after=1.0))


async def test_parallel_parts_of_one_request_never_refuse_each_other() -> None:
    """The review's batch route on Redis: parts queuing in parallel each counted what the
    request held before its call; run in the other order, a part counted its sibling's
    reservation as someone else's and was refused on a fresh bucket. Now one request's
    reservations are taken one at a time, whatever order the store runs calls in."""
    spend = _ReversedStore()

    async def part(tokens: int) -> list[_Item]:
        return await spend.queue(tokens, lambda: _items(tokens))

    async def store() -> None:
        while not all(p.done() for p in parts):
            await spend.run()

    parts = [asyncio.ensure_future(part(t)) for t in (100, 1000)]
    await asyncio.gather(store(), *parts)
    assert spend.reserved == 1100  # both taken: the second part overspent what was left
    assert spend.limits.reserve("k", TPM_1000, 1).refused == "tpm"  # and others wait


class _Counting(Spend):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    async def _reserve(self, tokens: int, held: int) -> None:
        self.calls.append((tokens, held))


async def test_a_request_of_many_parts_looks_at_each_input_once() -> None:
    """The held total is kept as parts queue, not summed again at every part: 2048 parts cost
    O(2048) reads of their items (each part read over all the earlier ones: 2 million). It
    still lets go of an input whose batch failed at once (its batch's failure just now,
    callbacks not run yet), so a failover queuing it again is covered by what the request
    reserved for it; an input that ran keeps holding its share."""
    reads = [0]
    spend = _Counting()
    parts = [await spend.queue(1, lambda: _items(1, reads=reads)) for _ in range(2048)]
    assert reads[0] <= 2 * 2048
    assert spend.reserved == 2048 and spend.calls[-1] == (1, 2047)
    parts[0][0].future.set_exception(RuntimeError("batch failed"))
    parts[1][0].started_at = 1.0
    parts[1][0].future.cancel()  # its caller left while it ran: it ran, and holds
    again = await spend.queue(1, lambda: _items(1))  # the failed one, on the next provider
    assert spend.reserved == 2048  # nothing more to reserve
    more = await spend.queue(4, lambda: _items(4))
    assert spend.calls[-1] == (4, 2048)
    for item in (*(p[0] for p in parts[2:]), *again, *more):
        item.future.set_result(None)
