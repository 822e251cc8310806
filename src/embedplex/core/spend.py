"""What a request has made the server compute, for a key's tokens per minute however it ends.

A limited key's request *reserves* the tokens of its inputs just before it queues them, and is
*settled* when it finishes (``api/ratelimit.py``, ``docs/limits.md``): charged what it spent
less what it reserved (a refund when the estimate was over). What it spent: on an answer, the
tokens the answer reports; for a request that ends without one (client gone, task cancelled, a
deadline), the tokens of its inputs that ran. The pipeline's ``RateLimit`` stage puts a
``Spend`` in ``REQUEST_SPEND`` for a request whose key has a ``tpm``; a local model or remote
provider queues a request's batcher items through it (``Spend.queue``: reserve, queue, note;
each input reserved at its payload's ``bound``: its count when tokenized, one token a character
for a local text queued untokenized, the estimate for a remote one), and a Ray-served model its
call to a replica, as one item (``models/ray_spend.py``: stamped when sent),
and at the finish ``tokens()`` sums the inputs whose batch reached the backend or went upstream
(an item the batcher stamped ``started_at``) and did not fail. Inputs dropped from the queue
before they ran, or whose batch failed, cost nothing. A context variable, as the deadline
(``core/deadline.py``): no route and no model signature carries it, and a request without a
limited key pays one ``ContextVar.get`` per queued request, nothing more (each request runs in
its own task, so it finds none set).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any, Protocol, TypeVar


class _Costed(Protocol):
    @property
    def cost(self) -> int: ...

    @property
    def bound(self) -> int: ...


class Queued(Protocol):
    """A queued input as ``Spend`` reads it (``batching.item.Item``): its payload's token
    count (``cost``: a remote text's ``estimated_tokens``; a local deferred text's estimate
    until its batch tokenizes it, then its count) and what a reservation holds for it
    (``bound``: at least its count where that is known), when its batch started (0: never),
    and its future (a batch that failed set an exception there)."""

    @property
    def payload(self) -> _Costed: ...

    @property
    def started_at(self) -> float: ...

    @property
    def future(self) -> asyncio.Future[Any]: ...


S = TypeVar("S", bound=Sequence[Queued])


class Spend:
    """The inputs one request queued, and the tokens it reserved for them; ``tokens()`` the
    tokens of those that ran.

    ``queue`` reserves before it queues, and only what the request does not hold already: a
    request that queues again (a route failing over to its next provider re-queues the inputs
    whose batch failed; a route that embeds in parts) reserves the inputs it will have queued
    or running, less what it reserved before, so the same inputs are never reserved twice.
    One request's reservations are taken one at a time (a lock, made by the first that
    reserves): parts queuing in parallel would otherwise each count what the others hold from
    before their calls, and a shared store running those calls in another order would count a
    sibling's reservation as someone else's and refuse the request its own tokens.

    What the noted inputs hold is kept as a running total: each item is looked at once, when a
    later ``queue`` call first needs it, and an item still pending then gets a done-callback
    that takes its share off if its batch fails or it is dropped unrun. A request that queues
    once looks at none of them; one of n parts does O(n) work in all, not O(n^2).
    This base reserves nothing (no limiter): ``api.ratelimit._Release`` takes them.
    """

    __slots__ = ("_claimed", "_held", "_lock", "_queued", "_tracked", "_watched", "reserved")

    def __init__(self) -> None:
        self._queued: list[Sequence[Queued]] | None = []
        self._tracked = 0  # parts of _queued counted in _held (those after it: not looked at)
        self._held = 0  # what the counted items still hold (queued, running or ran)
        self._watched = 0  # counted items whose done-callback has not run yet
        self._claimed = 0  # tokens of inputs being queued now: reserved, not noted yet
        self._lock: asyncio.Lock | None = None
        self.reserved = 0  # tokens this request took from its key's bucket before running

    async def queue(self, cost: int, submit: Callable[[], S]) -> S:
        """Reserve what queuing inputs of ``cost`` tokens needs, then ``submit`` them and note
        the items; a refusal (``_reserve`` raises) queues nothing."""
        if self._queued is None:  # charged already: a later request's work, in its context
            return submit()
        self._claimed += cost  # a sibling reserving meanwhile counts these as held
        try:
            if cost > 0:
                if self._lock is None:
                    self._lock = asyncio.Lock()
                async with self._lock:
                    await self._reserve_needed()
            items = submit()
        finally:
            self._claimed -= cost
        self.note(items)
        return items

    async def _reserve_needed(self) -> None:
        """Under the lock: reserve what the held, claimed and noted inputs lack."""
        self._track()
        need = self._held + self._claimed - self.reserved
        if need > 0 and self._watched:
            # A batch that failed just now has its callbacks queued, not run: let them take
            # its items off first (a failover re-queuing them would reserve them again).
            await asyncio.sleep(0)
            need = self._held + self._claimed - self.reserved
        if need <= 0:
            return
        held = self.reserved
        self.reserved += need
        try:
            await self._reserve(need, held)
        except BaseException:
            self.reserved -= need
            raise

    async def _reserve(self, tokens: int, held: int) -> None:
        """Take ``tokens`` for this request (which holds ``held`` already) or raise."""

    def note(self, items: Sequence[Queued]) -> None:
        """Items just queued for this request (kept, not copied: read at the finish); nothing
        once the request was charged."""
        if self._queued is not None:
            self._queued.append(items)

    def forget(self) -> None:
        """Drop the noted items once charged, and note none from now on: a task started inside
        the request keeps the request's context, and this with it (a model loaded on its first
        request; the next request pipelined on its connection, which uvicorn starts from the
        finishing request's task)."""
        self._queued = None

    def tokens(self) -> int:
        """Tokens of the noted inputs whose batch started and did not fail: the payload's
        count (a text tokenized in the inference thread has its real count once its batch
        tokenized it). A failed batch (the backend's error, an upstream's refusal or outage)
        did the caller no work it pays for: a 5xx, or an upstream's 429 passed on, is not the
        key's spending, and a route failing over would otherwise pay once per provider."""
        queued = self._queued or ()
        return sum(i.payload.cost for part in queued for i in part if i.started_at and _ran(i))

    def _track(self) -> None:
        """Count the parts noted since the last call in ``_held``: the bound of each input a
        reservation still covers (queued, running, or ran; not one dropped unrun or whose
        batch failed: a failover queues it again). A pending one is watched until done."""
        queued = self._queued
        if queued is None or self._tracked == len(queued):
            return
        for part in queued[self._tracked :]:
            for item in part:
                bound = item.payload.bound
                if not item.future.done():
                    self._held += bound
                    self._watched += 1
                    item.future.add_done_callback(partial(self._done, item, bound))
                elif _holds(item):
                    self._held += bound
        self._tracked = len(queued)

    def _done(self, item: Queued, bound: int, _: object) -> None:
        self._watched -= 1
        if not _holds(item):
            self._held -= bound


def _ran(item: Queued) -> bool:
    """Whether ``item``'s batch did its work: answered, or still running when its caller left
    (a cancelled future); not when the batch failed."""
    future = item.future
    return not future.done() or future.cancelled() or future.exception() is None


def _holds(item: Queued) -> bool:
    future = item.future
    if not future.done():
        return True
    if future.cancelled():
        return item.started_at > 0
    return future.exception() is None


REQUEST_SPEND: ContextVar[Spend | None] = ContextVar("embedplex_spend", default=None)


def estimated_tokens(chars: int) -> int:
    """Tokens of a text not tokenized here, from its length: about 4 characters a token, plus
    the special tokens around it (English; other scripts count more, up to about one token a
    character). Sizes a local model's deferred texts until the inference thread tokenizes
    them, and is what a remote provider's texts are reserved, and charged when their request
    ends without an answer (the upstream's own count comes with its answer)."""
    return chars // 4 + 2


def bounded_tokens(chars: int) -> int:
    """At most how many tokens a text of ``chars`` characters makes for a WordPiece or
    unigram tokenizer (each token covers at least one character), plus its special tokens:
    what a local model's deferred text reserves (a model's own cap bounds it too)."""
    return chars + 2
