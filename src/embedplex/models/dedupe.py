"""Identical inputs in flight share one slot in the batch and one result.

A ``Flight`` is one queued or running ``Item`` that any number of callers wait on, each through
a future of its own: a caller that leaves (a disconnect, a deadline) cancels only its own future
and gives up its share; the item is dropped from the queue (or its result ignored, if it is
already running) only once every caller waiting on it has left. The item's outcome, a result
or an error, reaches every caller still waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from embedplex.batching import Item
from embedplex.core.errors import NotReadyError

R = TypeVar("R")

Flights = dict[Hashable, "Flight[Any]"]


class Flight(Generic[R]):
    """One computation and the callers that wait on it, registered under ``key`` until done.

    ``store``: keep the result (``on_store``) once it comes; set when any caller allows it.
    """

    __slots__ = ("item", "key", "live", "on_store", "registry", "store", "waiters")

    def __init__(
        self,
        registry: Flights,
        key: Hashable,
        item: Item[Any, R],
        on_store: Callable[[Hashable, R], None] | None = None,
    ) -> None:
        self.registry = registry
        self.key = key
        self.item = item
        self.on_store = on_store
        self.store = False
        self.live = 0
        self.waiters: list[asyncio.Future[R]] = []
        if key not in registry:  # one submitted while we tokenized stays the one others join
            registry[key] = self
        item.future.add_done_callback(self._done)

    def join(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[R]:
        """A future of the caller's own that gets this input's outcome."""
        waiter: asyncio.Future[R] = loop.create_future()
        self.waiters.append(waiter)
        self.live += 1
        return waiter

    def leave(self) -> None:
        """A caller gave up its wait: the last one out drops the work."""
        self.live -= 1
        if self.live <= 0 and not self.item.future.done():
            self._unregister()  # nobody may join work that is being dropped
            self.item.future.cancel()

    def _unregister(self) -> None:
        if self.registry.get(self.key) is self:
            del self.registry[self.key]

    def _done(self, future: asyncio.Future[R]) -> None:
        self._unregister()
        if future.cancelled():  # only ``leave`` cancels it: whoever joined since still waits
            error: BaseException | None = NotReadyError("the input's work was dropped; retry")
        else:
            error = future.exception()
        if error is not None:
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            return
        result = future.result()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(result)
        if self.store and self.on_store is not None:
            self.on_store(self.key, result)
