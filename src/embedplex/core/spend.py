"""What a request has made the server compute, for a key's tokens per minute however it ends.

A limited key is charged its tokens when its request finishes (``api/ratelimit.py``): on an
answer, the tokens the answer reports. A request that ends without one (client gone, task
cancelled, a deadline) may still have had its inputs run, and those tokens are charged too: the
pipeline's ``RateLimit`` stage puts a ``Spend`` in ``REQUEST_SPEND`` for the request, a local
model or remote provider notes the batcher items it queues for it (``note_queued``), and at
the finish ``tokens()`` sums the inputs whose batch reached the backend or went upstream (an
item the batcher stamped ``started_at``) and did not fail. Inputs dropped from the queue before
they ran, or whose batch failed, cost nothing. A context variable, as the deadline
(``core/deadline.py``): no route and no model signature carries it, and a request without a
limited key pays one ``ContextVar.get`` per queued request, nothing more (each request runs in
its own task, so it finds none set).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Protocol


class _Costed(Protocol):
    @property
    def cost(self) -> int: ...


class Queued(Protocol):
    """A queued input as ``Spend`` reads it (``batching.item.Item``): its payload's token
    count (a remote text's: ``estimated_tokens``), when its batch started (0: never), and its
    future (a batch that failed set an exception there)."""

    @property
    def payload(self) -> _Costed: ...

    @property
    def started_at(self) -> float: ...

    @property
    def future(self) -> asyncio.Future[Any]: ...


class Spend:
    """The inputs one request queued; ``tokens()`` the tokens of those that ran."""

    __slots__ = ("_queued",)

    def __init__(self) -> None:
        self._queued: list[Sequence[Queued]] | None = []

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


def _ran(item: Queued) -> bool:
    """Whether ``item``'s batch did its work: answered, or still running when its caller left
    (a cancelled future); not when the batch failed."""
    future = item.future
    return not future.done() or future.cancelled() or future.exception() is None


REQUEST_SPEND: ContextVar[Spend | None] = ContextVar("embedplex_spend", default=None)


def note_queued(items: Sequence[Queued]) -> None:
    """Note ``items``, just queued, for the current request's ``Spend`` if it has one."""
    spend = REQUEST_SPEND.get()
    if spend is not None:
        spend.note(items)


def estimated_tokens(chars: int) -> int:
    """Tokens of a text not tokenized here (yet), from its length: about 4 characters a token,
    plus the special tokens around it. Sizes a local model's deferred texts until the inference
    thread tokenizes them, and is what a remote provider's texts are charged when their request
    ends without an answer (the upstream's own count comes with its answer)."""
    return chars // 4 + 2
