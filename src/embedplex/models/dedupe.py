"""Identical inputs in flight share one slot in the batch and one result.

A ``Flight`` is one queued or running ``Item`` registered under what its result depends on.
The caller that queued it (the leader) waits on the item's own future, exactly as without
dedupe, so an input nobody shares costs one registry entry and nothing more. A caller that
finds the key registered joins: it gets a future of its own, resolved from the item's outcome.

Leaving: a joiner that leaves (a disconnect, a deadline) gives up its share only. When the
leader leaves, its await cancels the item; if joiners still wait, the item is queued again for
them (the same payload, at the back of the queue), so no caller ever fails because another
left. The work is dropped once every caller has left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from embedplex.batching import Item
from embedplex.core.errors import EmbedplexError
from embedplex.core.tenant import Tenant

R = TypeVar("R")

Flights = dict[Hashable, "Flight[Any]"]
# Queue an item's payload again for the tenant given (the model's batcher).
Requeue = Callable[[Item[Any, Any], Tenant], Item[Any, Any]]


class Flight(Generic[R]):
    """One computation, registered under ``key`` until it is done or dropped."""

    __slots__ = (
        "item",
        "key",
        "leader",
        "live",
        "registry",
        "requeue",
        "stored",
        "tenant",
        "waiters",
    )

    def __init__(
        self,
        registry: Flights,
        key: Hashable,
        item: Item[Any, R],
        requeue: Requeue,
        tenant: Tenant,
    ) -> None:
        self.registry = registry
        self.key = key
        self.item = item
        self.requeue = requeue
        self.tenant = tenant
        self.leader = True  # the caller that queued it still waits on the item's future
        self.live = 0  # joiners still waiting
        self.stored = False  # its result went to the cache (by the first caller that could)
        self.waiters: list[asyncio.Future[R]] | None = None
        if key not in registry:  # one submitted while we tokenized stays the one others join
            registry[key] = self

    def join(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[R]:
        """A future of the joining caller's own that gets this input's outcome."""
        waiter: asyncio.Future[R] = loop.create_future()
        if self.waiters is None:
            self.waiters = []
            self.item.future.add_done_callback(self._done)
        self.waiters.append(waiter)
        self.live += 1
        return waiter

    def leave(self) -> None:
        """A joiner gave up its wait: with the leader gone too, the last one out drops it."""
        self.live -= 1
        if self.live <= 0 and not self.leader and not self.item.future.done():
            self._unregister()  # nobody may join work that is being dropped
            self.item.future.cancel()

    def release(self) -> None:
        """The leader is done waiting (answered, failed or gone)."""
        self.leader = False
        if self.live <= 0:
            if not self.item.future.done():
                self.item.future.cancel()
            self._unregister()

    def _unregister(self) -> None:
        if self.registry.get(self.key) is self:
            del self.registry[self.key]

    def _done(self, future: asyncio.Future[R]) -> None:
        if future is not self.item.future:  # an item queued again since: it answers
            return
        if future.cancelled():  # only the leader's leaving cancels it while joiners wait
            if self.live > 0:
                try:
                    self.item = self.requeue(self.item, self.tenant)
                except EmbedplexError as exc:
                    self._unregister()
                    self._settle(exc, None)
                    return
                self.leader = False
                self.item.future.add_done_callback(self._done)
                return
            self._unregister()
            return
        self._unregister()
        error = future.exception()
        self._settle(error, None if error is not None else future.result())

    def _settle(self, error: BaseException | None, result: R | None) -> None:
        for waiter in self.waiters or ():
            if waiter.done():
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)  # type: ignore[arg-type]  # set when no error
